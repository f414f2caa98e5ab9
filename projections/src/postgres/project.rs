//! The three projections as PostgreSQL writers: each turns a batch of facts
//! into rows and writes them inside the caller's transaction (which also
//! moves the checkpoint). Table names take a suffix so that a rebuild can
//! write fresh tables (`_rebuild`) with the same code.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use agentledger_eventstore::EventStore;
use async_trait::async_trait;
use tokio_postgres::types::Json;
use tokio_postgres::{Statement, Transaction};
use uuid::Uuid;

use crate::model::audit::AuditEntry;
use crate::model::metrics::{MetricsBatch, Timeline};
use crate::model::status::{enum_name, state_name, StatusFold, SubtaskStatus};
use crate::model::{Fact, STREAM_PREFIX};

use super::ProjectionError;

/// Workflows whose fold is kept between batches; beyond, the cache is
/// emptied and refilled from the streams on demand.
const CACHE_LIMIT: usize = 20_000;

/// Statements prepared on the connection a projection writes through,
/// by SQL text (a projection's connection changes only with `reset`).
#[derive(Default)]
struct Prepared(HashMap<String, Statement>);

impl Prepared {
    async fn get(
        &mut self,
        tx: &Transaction<'_>,
        sql: &str,
    ) -> Result<Statement, tokio_postgres::Error> {
        if let Some(statement) = self.0.get(sql) {
            return Ok(statement.clone());
        }
        let statement = tx.prepare(sql).await?;
        self.0.insert(sql.to_string(), statement.clone());
        Ok(statement)
    }
}

/// A projection writing to PostgreSQL.
#[async_trait]
pub trait Projection: Send + 'static {
    /// Its name (the checkpoint row's key).
    fn name(&self) -> &'static str;
    /// Its tables, in the order they are created and swapped.
    fn tables(&self) -> &'static [&'static str];
    /// Each table's primary key columns, and whether writing needs the key
    /// (upserts do; insert-only tables get it after a rebuild's load).
    fn key(&self, table: &str) -> (&'static str, bool);
    /// The advisory lock key of its lease.
    fn lock_key(&self) -> i64;
    /// Writes the rows for `facts` (in position order) into the tables named
    /// with `suffix`, inside `tx`.
    async fn apply(
        &mut self,
        tx: &Transaction<'_>,
        suffix: &str,
        facts: &[Fact],
    ) -> Result<(), ProjectionError>;
    /// Forgets what it remembers between batches (after a lost lease or a
    /// rollback, memory may be ahead of the tables).
    fn reset(&mut self);
}

/// The projection named `name`, reading missing history from `store`.
pub fn projection(name: &str, store: Arc<dyn EventStore>) -> Option<Box<dyn Projection>> {
    match name {
        "workflow_status" => Some(Box::new(StatusProjection {
            store,
            folds: HashMap::new(),
            prepared: Prepared::default(),
        })),
        "audit_trail" => Some(Box::new(AuditProjection {
            prepared: Prepared::default(),
        })),
        "agent_metrics" => Some(Box::new(MetricsProjection {
            store,
            timelines: HashMap::new(),
            prepared: Prepared::default(),
        })),
        _ => None,
    }
}

/// Reads the facts of `workflow` with versions below `before`.
async fn history(
    store: &dyn EventStore,
    workflow: Uuid,
    before: u64,
) -> Result<Vec<Fact>, ProjectionError> {
    let stream = agentledger_eventstore::StreamId::new(format!("{STREAM_PREFIX}{workflow}"))
        .map_err(|e| ProjectionError::Corrupt(e.to_string()))?;
    let events = store.read_stream(&stream, 0, before as usize).await?;
    events
        .iter()
        .filter_map(|e| Fact::decode(e).transpose())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ProjectionError::Corrupt(e.to_string()))
}

struct StatusProjection {
    store: Arc<dyn EventStore>,
    folds: HashMap<Uuid, StatusFold>,
    prepared: Prepared,
}

#[async_trait]
impl Projection for StatusProjection {
    fn name(&self) -> &'static str {
        "workflow_status"
    }

    fn tables(&self) -> &'static [&'static str] {
        &["workflow_status", "workflow_subtasks"]
    }

    fn key(&self, table: &str) -> (&'static str, bool) {
        match table {
            "workflow_status" => ("workflow_id", true),
            _ => ("workflow_id, subtask_id", true),
        }
    }

    fn lock_key(&self) -> i64 {
        0x6167_6c65_6467_0101
    }

    async fn apply(
        &mut self,
        tx: &Transaction<'_>,
        suffix: &str,
        facts: &[Fact],
    ) -> Result<(), ProjectionError> {
        if self.folds.len() > CACHE_LIMIT {
            self.folds.clear();
        }
        let mut touched: Vec<Uuid> = Vec::new();
        let mut seen = HashSet::new();
        // Each touched workflow's subtasks as the table holds them (the
        // fold before this batch), so that only changed rows are written.
        let mut before: HashMap<Uuid, Vec<SubtaskStatus>> = HashMap::new();
        for fact in facts {
            let first_in_batch = seen.insert(fact.workflow);
            if first_in_batch {
                touched.push(fact.workflow);
            }
            let known = self
                .folds
                .get(&fact.workflow)
                .is_some_and(|f| f.version() + 1 == fact.recorded.stream_version);
            if !known && fact.recorded.stream_version > 0 {
                let past =
                    history(&*self.store, fact.workflow, fact.recorded.stream_version).await?;
                let mut fold: Option<StatusFold> = None;
                for f in &past {
                    match &mut fold {
                        Some(fold) => fold.apply(f),
                        None => fold = Some(StatusFold::start(f)),
                    }
                }
                if let Some(fold) = fold {
                    self.folds.insert(fact.workflow, fold);
                }
            }
            if first_in_batch {
                let held = match self.folds.get(&fact.workflow) {
                    Some(fold) if fact.recorded.stream_version > 0 => {
                        fold.status().subtasks.clone()
                    }
                    _ => Vec::new(),
                };
                before.insert(fact.workflow, held);
            }
            match self.folds.get_mut(&fact.workflow) {
                Some(fold) if fact.recorded.stream_version > 0 => fold.apply(fact),
                _ => {
                    self.folds.insert(fact.workflow, StatusFold::start(fact));
                }
            }
        }
        if touched.is_empty() {
            return Ok(());
        }
        let statuses: Vec<_> = touched
            .iter()
            .filter_map(|id| self.folds.get(id).map(|f| f.status()))
            .collect();
        let rows = (
            statuses.iter().map(|s| s.id).collect::<Vec<_>>(),
            statuses
                .iter()
                .map(|s| state_name(s.state))
                .collect::<Vec<_>>(),
            statuses
                .iter()
                .map(|s| enum_name(&s.priority))
                .collect::<Vec<_>>(),
            statuses.iter().map(|s| &*s.request).collect::<Vec<_>>(),
            statuses.iter().map(|s| s.round).collect::<Vec<_>>(),
            statuses.iter().map(|s| s.progress_done).collect::<Vec<_>>(),
            statuses
                .iter()
                .map(|s| s.progress_total)
                .collect::<Vec<_>>(),
            statuses
                .iter()
                .map(|s| s.verdict.as_ref().map(enum_name))
                .collect::<Vec<_>>(),
            statuses.iter().map(|s| s.risk).collect::<Vec<_>>(),
            statuses
                .iter()
                .map(|s| s.ethics.as_ref().map(Json))
                .collect::<Vec<_>>(),
        );
        let more = (
            statuses
                .iter()
                .map(|s| s.owner.as_str())
                .collect::<Vec<_>>(),
            statuses
                .iter()
                .map(|s| s.tenant.as_str())
                .collect::<Vec<_>>(),
            statuses.iter().map(|s| s.created_at).collect::<Vec<_>>(),
            statuses.iter().map(|s| s.updated_at).collect::<Vec<_>>(),
            statuses.iter().map(|s| s.completed_at).collect::<Vec<_>>(),
            statuses
                .iter()
                .map(|s| s.last_position as i64)
                .collect::<Vec<_>>(),
            statuses
                .iter()
                .map(|s| s.version as i64)
                .collect::<Vec<_>>(),
        );
        let upsert = format!(
            "INSERT INTO workflow_status{suffix} AS w (workflow_id, state, priority, request, round,
                 progress_done, progress_total, verdict, risk, ethics, owner, tenant, created_at,
                 updated_at, completed_at, last_position, version)
             SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::int2[],
                 $6::int4[], $7::int4[], $8::text[], $9::float8[], $10::jsonb[], $11::text[],
                 $12::text[], $13::timestamptz[], $14::timestamptz[], $15::timestamptz[],
                 $16::int8[], $17::int8[])
             ON CONFLICT (workflow_id) DO UPDATE SET state = EXCLUDED.state,
                 priority = EXCLUDED.priority, request = EXCLUDED.request, round = EXCLUDED.round,
                 progress_done = EXCLUDED.progress_done, progress_total = EXCLUDED.progress_total,
                 verdict = EXCLUDED.verdict, risk = EXCLUDED.risk, ethics = EXCLUDED.ethics,
                 owner = EXCLUDED.owner, tenant = EXCLUDED.tenant, created_at = EXCLUDED.created_at,
                 updated_at = EXCLUDED.updated_at, completed_at = EXCLUDED.completed_at,
                 last_position = EXCLUDED.last_position, version = EXCLUDED.version"
        );
        let statement = self.prepared.get(tx, &upsert).await?;
        tx.execute(
            &statement,
            &[
                &rows.0, &rows.1, &rows.2, &rows.3, &rows.4, &rows.5, &rows.6, &rows.7, &rows.8,
                &rows.9, &more.0, &more.1, &more.2, &more.3, &more.4, &more.5, &more.6,
            ],
        )
        .await?;

        // Only the subtasks that changed are written: a start or a result
        // rewrites one row, not the plan; a revision deletes the subtasks
        // its new plan dropped.
        let mut gone: (Vec<Uuid>, Vec<&str>) = (Vec::new(), Vec::new());
        let mut subtasks: Vec<(Uuid, &crate::model::status::SubtaskStatus)> = Vec::new();
        for status in &statuses {
            let held = before.get(&status.id).map_or(&[][..], Vec::as_slice);
            for old in held {
                if !status.subtasks.iter().any(|t| t.id == old.id) {
                    gone.0.push(status.id);
                    gone.1.push(old.id.as_str());
                }
            }
            subtasks.extend(
                status
                    .subtasks
                    .iter()
                    .filter(|t| !held.contains(t))
                    .map(|t| (status.id, t)),
            );
        }
        if !gone.0.is_empty() {
            let delete = format!(
                "DELETE FROM workflow_subtasks{suffix} AS t
                  USING unnest($1::uuid[], $2::text[]) AS g(w, id)
                  WHERE t.workflow_id = g.w AND t.subtask_id = g.id"
            );
            let statement = self.prepared.get(tx, &delete).await?;
            tx.execute(&statement, &[&gone.0, &gone.1]).await?;
        }
        if subtasks.is_empty() {
            self.folds.retain(|_, f| !f.status().state.is_final());
            return Ok(());
        }
        let cols = (
            subtasks.iter().map(|(w, _)| *w).collect::<Vec<_>>(),
            subtasks
                .iter()
                .map(|(_, t)| t.id.as_str())
                .collect::<Vec<_>>(),
            subtasks.iter().map(|(_, t)| t.ordinal).collect::<Vec<_>>(),
            subtasks
                .iter()
                .map(|(_, t)| t.title.as_str())
                .collect::<Vec<_>>(),
            subtasks
                .iter()
                .map(|(_, t)| t.tool.as_str())
                .collect::<Vec<_>>(),
            subtasks
                .iter()
                .map(|(_, t)| Json(&t.depends_on))
                .collect::<Vec<_>>(),
            subtasks
                .iter()
                .map(|(_, t)| enum_name(&t.state))
                .collect::<Vec<_>>(),
            subtasks.iter().map(|(_, t)| t.attempts).collect::<Vec<_>>(),
            subtasks
                .iter()
                .map(|(_, t)| t.output.as_deref())
                .collect::<Vec<_>>(),
            subtasks
                .iter()
                .map(|(_, t)| t.started_at)
                .collect::<Vec<_>>(),
            subtasks
                .iter()
                .map(|(_, t)| t.finished_at)
                .collect::<Vec<_>>(),
        );
        let insert = format!(
            "INSERT INTO workflow_subtasks{suffix} (workflow_id, subtask_id, ordinal, title, tool,
                 depends_on, state, attempts, output, started_at, finished_at)
             SELECT w, id, o, ti, tool, ARRAY(SELECT jsonb_array_elements_text(d)), st, a, out, s, f
               FROM unnest($1::uuid[], $2::text[], $3::int4[], $4::text[], $5::text[], $6::jsonb[],
                           $7::text[], $8::int2[], $9::text[], $10::timestamptz[], $11::timestamptz[])
                    AS t(w, id, o, ti, tool, d, st, a, out, s, f)
             ON CONFLICT (workflow_id, subtask_id) DO UPDATE SET ordinal = EXCLUDED.ordinal,
                 title = EXCLUDED.title, tool = EXCLUDED.tool, depends_on = EXCLUDED.depends_on,
                 state = EXCLUDED.state, attempts = EXCLUDED.attempts, output = EXCLUDED.output,
                 started_at = EXCLUDED.started_at, finished_at = EXCLUDED.finished_at"
        );
        let statement = self.prepared.get(tx, &insert).await?;
        tx.execute(
            &statement,
            &[
                &cols.0, &cols.1, &cols.2, &cols.3, &cols.4, &cols.5, &cols.6, &cols.7, &cols.8,
                &cols.9, &cols.10,
            ],
        )
        .await?;
        // Ended workflows rarely change again; keep the cache for live ones.
        self.folds.retain(|_, f| !f.status().state.is_final());
        Ok(())
    }

    fn reset(&mut self) {
        self.folds.clear();
        self.prepared.0.clear();
    }
}

struct AuditProjection {
    prepared: Prepared,
}

#[async_trait]
impl Projection for AuditProjection {
    fn name(&self) -> &'static str {
        "audit_trail"
    }

    fn tables(&self) -> &'static [&'static str] {
        &["audit_trail"]
    }

    fn key(&self, _: &str) -> (&'static str, bool) {
        ("position", false)
    }

    fn lock_key(&self) -> i64 {
        0x6167_6c65_6467_0102
    }

    async fn apply(
        &mut self,
        tx: &Transaction<'_>,
        suffix: &str,
        facts: &[Fact],
    ) -> Result<(), ProjectionError> {
        if facts.is_empty() {
            return Ok(());
        }
        let entries: Vec<AuditEntry> = facts.iter().map(AuditEntry::of).collect();
        let cols = (
            entries
                .iter()
                .map(|e| e.position as i64)
                .collect::<Vec<_>>(),
            entries.iter().map(|e| e.workflow_id).collect::<Vec<_>>(),
            entries.iter().map(|e| e.version as i64).collect::<Vec<_>>(),
            entries
                .iter()
                .map(|e| e.event_type.as_str())
                .collect::<Vec<_>>(),
            entries.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>(),
            entries
                .iter()
                .map(|e| e.actor_kind.as_str())
                .collect::<Vec<_>>(),
            entries.iter().map(|e| e.actor.as_str()).collect::<Vec<_>>(),
            entries
                .iter()
                .map(|e| e.actor_version.as_str())
                .collect::<Vec<_>>(),
            entries
                .iter()
                .map(|e| e.role.map(|r| r.as_str()))
                .collect::<Vec<_>>(),
            entries
                .iter()
                .map(|e| e.summary.as_str())
                .collect::<Vec<_>>(),
            entries
                .iter()
                .map(|e| e.rationale.as_str())
                .collect::<Vec<_>>(),
            entries
                .iter()
                .map(|e| e.policy_fingerprint.as_deref())
                .collect::<Vec<_>>(),
            entries.iter().map(|e| e.recorded_at).collect::<Vec<_>>(),
            entries.iter().map(|e| e.hash.as_str()).collect::<Vec<_>>(),
            entries
                .iter()
                .map(|e| e.tenant.as_str())
                .collect::<Vec<_>>(),
        );
        // No ON CONFLICT: an event applied twice is a bug, and fails loudly.
        let insert = format!(
            "INSERT INTO audit_trail{suffix} (position, workflow_id, version, event_type, kind,
                 actor_kind, actor, actor_version, role, summary, rationale, policy_fingerprint,
                 recorded_at, hash, tenant)
             SELECT * FROM unnest($1::int8[], $2::uuid[], $3::int8[], $4::text[], $5::text[],
                 $6::text[], $7::text[], $8::text[], $9::text[], $10::text[], $11::text[],
                 $12::text[], $13::timestamptz[], $14::text[], $15::text[])"
        );
        let statement = self.prepared.get(tx, &insert).await?;
        tx.execute(
            &statement,
            &[
                &cols.0, &cols.1, &cols.2, &cols.3, &cols.4, &cols.5, &cols.6, &cols.7, &cols.8,
                &cols.9, &cols.10, &cols.11, &cols.12, &cols.13, &cols.14,
            ],
        )
        .await?;
        Ok(())
    }

    fn reset(&mut self) {
        self.prepared.0.clear();
    }
}

struct MetricsProjection {
    store: Arc<dyn EventStore>,
    timelines: HashMap<Uuid, Timeline>,
    prepared: Prepared,
}

#[async_trait]
impl Projection for MetricsProjection {
    fn name(&self) -> &'static str {
        "agent_metrics"
    }

    fn tables(&self) -> &'static [&'static str] {
        &["agent_metrics"]
    }

    fn key(&self, _: &str) -> (&'static str, bool) {
        ("tenant, agent, bucket", true)
    }

    fn lock_key(&self) -> i64 {
        0x6167_6c65_6467_0103
    }

    async fn apply(
        &mut self,
        tx: &Transaction<'_>,
        suffix: &str,
        facts: &[Fact],
    ) -> Result<(), ProjectionError> {
        if self.timelines.len() > CACHE_LIMIT {
            self.timelines.clear();
        }
        let mut batch = MetricsBatch::default();
        for fact in facts {
            let version = fact.recorded.stream_version;
            let known = self
                .timelines
                .get(&fact.workflow)
                .is_some_and(|t| t.version.is_some_and(|v| v + 1 == version));
            if !known {
                let mut timeline = Timeline::default();
                if version > 0 {
                    for past in history(&*self.store, fact.workflow, version).await? {
                        timeline.remember(&past);
                    }
                }
                self.timelines.insert(fact.workflow, timeline);
            }
            let timeline = self
                .timelines
                .get_mut(&fact.workflow)
                .expect("inserted above");
            timeline.count(fact, &mut batch);
            if fact.event.event_type().starts_with("Workflow")
                && fact.event.event_type() != "WorkflowSubmitted"
            {
                // An outcome: the workflow is done (almost always).
                self.timelines.remove(&fact.workflow);
            }
        }
        let upsert = format!(
            "INSERT INTO agent_metrics{suffix} AS m (agent, bucket, decisions, approvals, rejections,
                 revisions, escalations, retries, failures, flagged, latency_count, latency_sum_us,
                 latency_max_us, latency_buckets, ethics_count, transparency_sum, collaboration_sum,
                 autonomy_sum, fairness_sum, tenant)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20)
             ON CONFLICT (tenant, agent, bucket) DO UPDATE SET
                 decisions = m.decisions + EXCLUDED.decisions,
                 approvals = m.approvals + EXCLUDED.approvals,
                 rejections = m.rejections + EXCLUDED.rejections,
                 revisions = m.revisions + EXCLUDED.revisions,
                 escalations = m.escalations + EXCLUDED.escalations,
                 retries = m.retries + EXCLUDED.retries,
                 failures = m.failures + EXCLUDED.failures,
                 flagged = m.flagged + EXCLUDED.flagged,
                 latency_count = m.latency_count + EXCLUDED.latency_count,
                 latency_sum_us = m.latency_sum_us + EXCLUDED.latency_sum_us,
                 latency_max_us = GREATEST(m.latency_max_us, EXCLUDED.latency_max_us),
                 latency_buckets = ARRAY(SELECT a + b FROM unnest(m.latency_buckets, EXCLUDED.latency_buckets) AS x(a, b)),
                 ethics_count = m.ethics_count + EXCLUDED.ethics_count,
                 transparency_sum = m.transparency_sum + EXCLUDED.transparency_sum,
                 collaboration_sum = m.collaboration_sum + EXCLUDED.collaboration_sum,
                 autonomy_sum = m.autonomy_sum + EXCLUDED.autonomy_sum,
                 fairness_sum = m.fairness_sum + EXCLUDED.fairness_sum"
        );
        let statement = self.prepared.get(tx, &upsert).await?;
        for row in batch.rows.values() {
            tx.execute(
                &statement,
                &[
                    &row.agent,
                    &row.bucket,
                    &row.decisions,
                    &row.approvals,
                    &row.rejections,
                    &row.revisions,
                    &row.escalations,
                    &row.retries,
                    &row.failures,
                    &row.flagged,
                    &row.latency_count,
                    &row.latency_sum_us,
                    &row.latency_max_us,
                    &row.latency_buckets,
                    &row.ethics_count,
                    &row.transparency_sum,
                    &row.collaboration_sum,
                    &row.autonomy_sum,
                    &row.fairness_sum,
                    &row.tenant,
                ],
            )
            .await?;
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.timelines.clear();
        self.prepared.0.clear();
    }
}
