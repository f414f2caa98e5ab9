//! The read models in PostgreSQL: the projections' writers ([`project`]),
//! the runner that keeps each one live under a lease ([`runner`]), rebuilds
//! into fresh tables ([`rebuild`]) and the queries ([`PostgresReadModels`]).

pub mod project;
pub mod rebuild;
pub mod runner;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use agentledger_domain::workflow::WorkflowState;
use agentledger_eventstore::StoreError;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use tokio::sync::watch;
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;
use uuid::Uuid;

use crate::model::audit::AuditEntry;
use crate::model::metrics::AgentMetrics;
use crate::model::status::{
    parse_enum, parse_state, state_name, Ethics, SubtaskStatus, WorkflowStatus,
};
use crate::query::{wait_all, AuditFilter, ReadError, ReadModels, WorkflowCursor, PROJECTIONS};
use crate::AgentRole;

/// The channel on which runners announce their checkpoints (`name:position`).
pub const CHECKPOINT_CHANNEL: &str = "agentledger_checkpoints";

/// Why a projection could not apply a batch.
#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    /// The database failed; the batch was rolled back and will be retried.
    #[error("database: {}", describe(.0))]
    Database(#[from] tokio_postgres::Error),
    /// Reading from the event store failed; retried.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An event cannot be read: a bug or a newer writer; the projection stops.
    #[error("{0}")]
    Corrupt(String),
    /// Another runner holds the lease (the checkpoint's token moved).
    #[error("the lease moved to another runner")]
    LeaseLost,
    /// A named fault point stopped the runner (tests).
    #[error("stopped at a fault point")]
    Fault,
    /// Unknown projection name.
    #[error("no projection named {0:?}")]
    Unknown(String),
    /// Applying a batch panicked (a bug); the runner starts over.
    #[error("panicked: {0}")]
    Panicked(String),
}

/// The server's message and SQLSTATE when there is one (tokio-postgres's
/// `Display` says only "db error").
fn describe(e: &tokio_postgres::Error) -> String {
    agentledger_eventstore::describe_db_error(e)
}

/// Queries over the PostgreSQL read models, with checkpoint watches fed by
/// the runners' announcements (so a process not running a projection can
/// still wait for it).
#[derive(Clone)]
pub struct PostgresReadModels {
    pool: Pool,
    watches: HashMap<&'static str, watch::Receiver<u64>>,
    checkpoints: runner::Checkpoints,
}

impl PostgresReadModels {
    /// Queries on `pool`; `watches` are the checkpoint positions per
    /// projection (from [`runner::Checkpoints`]).
    pub fn new(pool: Pool, checkpoints: &runner::Checkpoints) -> Self {
        Self {
            pool,
            watches: checkpoints.receivers(),
            checkpoints: checkpoints.clone(),
        }
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, ReadError> {
        self.pool.get().await.map_err(|e| match e {
            deadpool_postgres::PoolError::Backend(e) => ReadError::Unavailable(describe(&e)),
            other => ReadError::Unavailable(other.to_string()),
        })
    }

    async fn with_subtasks(&self, rows: Vec<Row>) -> Result<Vec<WorkflowStatus>, ReadError> {
        let mut statuses: Vec<WorkflowStatus> =
            rows.iter().map(status_of).collect::<Result<_, _>>()?;
        if statuses.is_empty() {
            return Ok(statuses);
        }
        let ids: Vec<Uuid> = statuses.iter().map(|s| s.id).collect();
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT workflow_id, subtask_id, ordinal, title, tool, depends_on, state, attempts,
                        output, started_at, finished_at
                   FROM workflow_subtasks WHERE workflow_id = ANY($1) ORDER BY workflow_id, ordinal",
                &[&ids],
            )
            .await
            .map_err(unavailable)?;
        let mut by_workflow: HashMap<Uuid, Vec<SubtaskStatus>> = HashMap::new();
        for row in rows {
            by_workflow
                .entry(row.get(0))
                .or_default()
                .push(subtask_of(&row, 1)?);
        }
        for status in &mut statuses {
            status.subtasks = by_workflow.remove(&status.id).unwrap_or_default();
        }
        Ok(statuses)
    }
}

/// A subtask from the eleven subtask columns of `row` (without the
/// workflow id), the first at `at`.
fn subtask_of(row: &Row, at: usize) -> Result<SubtaskStatus, ReadError> {
    let state: String = row.get(at + 5);
    Ok(SubtaskStatus {
        id: row.get(at),
        ordinal: row.get(at + 1),
        title: row.get(at + 2),
        tool: row.get(at + 3),
        depends_on: row.get(at + 4),
        state: parse_enum(&state).ok_or_else(|| corrupt("subtask state", &state))?,
        attempts: row.get(at + 6),
        output: row.get::<_, Option<&str>>(at + 7).map(Arc::from),
        started_at: row.get(at + 8),
        finished_at: row.get(at + 9),
    })
}

fn unavailable(e: tokio_postgres::Error) -> ReadError {
    ReadError::Unavailable(describe(&e))
}

fn corrupt(what: &str, value: &str) -> ReadError {
    ReadError::Corrupt(format!("{what} {value:?}"))
}

const STATUS_COLUMNS: &str = "workflow_id, state, priority, request, round, progress_done,
    progress_total, verdict, risk, ethics, owner, tenant, created_at, updated_at, completed_at,
    last_position, version";

fn status_of(row: &Row) -> Result<WorkflowStatus, ReadError> {
    let state: String = row.get(1);
    let priority: String = row.get(2);
    let verdict: Option<String> = row.get(7);
    let ethics: Option<tokio_postgres::types::Json<Ethics>> = row.get(9);
    Ok(WorkflowStatus {
        id: row.get(0),
        state: parse_state(&state).ok_or_else(|| corrupt("state", &state))?,
        priority: parse_enum(&priority).ok_or_else(|| corrupt("priority", &priority))?,
        request: Arc::from(row.get::<_, &str>(3)),
        round: row.get(4),
        progress_done: row.get(5),
        progress_total: row.get(6),
        verdict: match verdict {
            Some(v) => Some(parse_enum(&v).ok_or_else(|| corrupt("verdict", &v))?),
            None => None,
        },
        risk: row.get(8),
        ethics: ethics.map(|j| j.0),
        owner: row.get(10),
        tenant: row.get(11),
        created_at: row.get(12),
        updated_at: row.get(13),
        completed_at: row.get(14),
        last_position: row.get::<_, i64>(15) as u64,
        version: row.get::<_, i64>(16) as u64,
        subtasks: Vec::new(),
    })
}

/// The audit trail query for `filter`: only the given conditions, so that
/// each combination is planned on its own index (workflow; actor, role or
/// kind with a time range; time range alone).
pub fn audit_query(
    filter: &AuditFilter,
    limit: usize,
) -> (String, Vec<Box<dyn ToSql + Sync + Send>>) {
    let mut conditions = Vec::new();
    let mut params: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
    let mut add = |condition: &str, param: Box<dyn ToSql + Sync + Send>| {
        params.push(param);
        conditions.push(condition.replace('?', &format!("${}", params.len())));
    };
    if let Some(tenant) = &filter.tenant {
        add("tenant = ?", Box::new(tenant.clone()));
    }
    if let Some(workflow) = filter.workflow {
        add("workflow_id = ?", Box::new(workflow));
    }
    if let Some(actor) = &filter.actor {
        add("actor = ?", Box::new(actor.clone()));
    }
    if let Some(role) = filter.role {
        add("role = ?", Box::new(role.as_str()));
    }
    if let Some(kind) = &filter.kind {
        add("kind = ?", Box::new(kind.clone()));
    }
    if let Some(from) = filter.from {
        add("recorded_at >= ?", Box::new(from));
    }
    if let Some(to) = filter.to {
        add("recorded_at < ?", Box::new(to));
    }
    if let Some(after) = filter.after {
        add("position > ?", Box::new(after as i64));
    }
    let filter = if conditions.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", conditions.join(" AND "))
    };
    params.push(Box::new(limit as i64));
    let sql = format!(
        "SELECT {AUDIT_COLUMNS} FROM audit_trail {filter} ORDER BY position LIMIT ${}",
        params.len()
    );
    (sql, params)
}

const AUDIT_COLUMNS: &str = "position, workflow_id, version, event_type, kind, actor_kind, actor,
    actor_version, role, summary, rationale, policy_fingerprint, recorded_at, hash, tenant";

fn audit_of(row: &Row) -> Result<AuditEntry, ReadError> {
    let role: Option<String> = row.get(8);
    Ok(AuditEntry {
        position: row.get::<_, i64>(0) as u64,
        workflow_id: row.get(1),
        version: row.get::<_, i64>(2) as u64,
        event_type: row.get(3),
        kind: row.get(4),
        actor_kind: row.get(5),
        actor: row.get(6),
        actor_version: row.get(7),
        role: match role {
            Some(r) => Some(AgentRole::parse(&r).ok_or_else(|| corrupt("role", &r))?),
            None => None,
        },
        summary: row.get(9),
        rationale: row.get(10),
        policy_fingerprint: row.get(11),
        recorded_at: row.get(12),
        hash: row.get(13),
        tenant: row.get(14),
    })
}

const METRICS_COLUMNS: &str = "agent, bucket, decisions, approvals, rejections, revisions,
    escalations, retries, failures, flagged, latency_count, latency_sum_us, latency_max_us,
    latency_buckets, ethics_count, transparency_sum, collaboration_sum, autonomy_sum, fairness_sum,
    tenant";

fn metrics_of(row: &Row) -> AgentMetrics {
    AgentMetrics {
        agent: row.get(0),
        bucket: row.get(1),
        decisions: row.get(2),
        approvals: row.get(3),
        rejections: row.get(4),
        revisions: row.get(5),
        escalations: row.get(6),
        retries: row.get(7),
        failures: row.get(8),
        flagged: row.get(9),
        latency_count: row.get(10),
        latency_sum_us: row.get(11),
        latency_max_us: row.get(12),
        latency_buckets: row.get(13),
        ethics_count: row.get(14),
        transparency_sum: row.get(15),
        collaboration_sum: row.get(16),
        autonomy_sum: row.get(17),
        fairness_sum: row.get(18),
        tenant: row.get(19),
    }
}

#[async_trait]
impl ReadModels for PostgresReadModels {
    async fn workflow(&self, id: Uuid) -> Result<Option<WorkflowStatus>, ReadError> {
        // One statement: the row and its subtasks from one snapshot (two
        // reads could straddle a projection batch), in one round trip.
        let columns = STATUS_COLUMNS
            .split(',')
            .map(|c| format!("w.{}", c.trim()))
            .collect::<Vec<_>>()
            .join(", ");
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {columns}, t.subtask_id, t.ordinal, t.title, t.tool, t.depends_on,
                            t.state, t.attempts, t.output, t.started_at, t.finished_at
                       FROM workflow_status w
                       LEFT JOIN workflow_subtasks t ON t.workflow_id = w.workflow_id
                      WHERE w.workflow_id = $1
                      ORDER BY t.ordinal"
                ),
                &[&id],
            )
            .await
            .map_err(unavailable)?;
        drop(client);
        let Some(first) = rows.first() else {
            return Ok(None);
        };
        let mut status = status_of(first)?;
        let at = STATUS_COLUMNS.split(',').count();
        for row in &rows {
            if row.get::<_, Option<&str>>(at).is_some() {
                status.subtasks.push(subtask_of(row, at)?);
            }
        }
        Ok(Some(status))
    }

    async fn workflows(
        &self,
        tenant: Option<&str>,
        state: Option<WorkflowState>,
        after: Option<WorkflowCursor>,
        limit: usize,
    ) -> Result<Vec<WorkflowStatus>, ReadError> {
        let client = self.client().await?;
        let state = state.map(state_name);
        let (after_at, after_id): (Option<DateTime<Utc>>, Option<Uuid>) =
            (after.map(|c| c.created_at), after.map(|c| c.id));
        let limit = limit as i64;
        // One statement per combination, so that each is planned on its own
        // index (tenant and state, tenant, state, or none).
        let page = "($1::timestamptz IS NULL OR (created_at, workflow_id) < ($1, $2))";
        let newest = "created_at DESC, workflow_id DESC";
        let rows = match (tenant, state) {
            (Some(tenant), Some(state)) => {
                client
                    .query(
                        &format!(
                            "SELECT {STATUS_COLUMNS} FROM workflow_status
                          WHERE tenant = $4 AND state = $5 AND {page}
                          ORDER BY tenant, state, {newest} LIMIT $3"
                        ),
                        &[&after_at, &after_id, &limit, &tenant, &state],
                    )
                    .await
            }
            (Some(tenant), None) => {
                client
                    .query(
                        &format!(
                            "SELECT {STATUS_COLUMNS} FROM workflow_status
                          WHERE tenant = $4 AND {page}
                          ORDER BY tenant, {newest} LIMIT $3"
                        ),
                        &[&after_at, &after_id, &limit, &tenant],
                    )
                    .await
            }
            (None, Some(state)) => {
                client
                    .query(
                        &format!(
                            "SELECT {STATUS_COLUMNS} FROM workflow_status
                          WHERE state = $4 AND {page}
                          ORDER BY state, {newest} LIMIT $3"
                        ),
                        &[&after_at, &after_id, &limit, &state],
                    )
                    .await
            }
            (None, None) => {
                client
                    .query(
                        &format!(
                            "SELECT {STATUS_COLUMNS} FROM workflow_status
                          WHERE {page} ORDER BY {newest} LIMIT $3"
                        ),
                        &[&after_at, &after_id, &limit],
                    )
                    .await
            }
        }
        .map_err(unavailable)?;
        drop(client);
        self.with_subtasks(rows).await
    }

    async fn audit_trail(
        &self,
        filter: &AuditFilter,
        limit: usize,
    ) -> Result<Vec<AuditEntry>, ReadError> {
        let client = self.client().await?;
        let (sql, params) = audit_query(filter, limit);
        let params: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p.as_ref() as _).collect();
        let rows = client.query(&sql, &params).await.map_err(unavailable)?;
        rows.iter().map(audit_of).collect()
    }

    async fn agent_metrics(
        &self,
        tenant: Option<&str>,
        from: Option<DateTime<Utc>>,
        to: Option<DateTime<Utc>>,
    ) -> Result<Vec<AgentMetrics>, ReadError> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {METRICS_COLUMNS} FROM agent_metrics
                      WHERE ($3::text IS NULL OR tenant = $3)
                        AND ($1::timestamptz IS NULL OR bucket >= $1)
                        AND ($2::timestamptz IS NULL OR bucket < $2)
                      ORDER BY agent, bucket, tenant"
                ),
                &[&from, &to, &tenant],
            )
            .await
            .map_err(unavailable)?;
        Ok(rows.iter().map(metrics_of).collect())
    }

    async fn count_by_state(
        &self,
        tenant: Option<&str>,
    ) -> Result<Vec<(WorkflowState, u64)>, ReadError> {
        let client = self.client().await?;
        let rows = match tenant {
            Some(tenant) => client
                .query(
                    "SELECT state, count(*) FROM workflow_status WHERE tenant = $1 GROUP BY state",
                    &[&tenant],
                )
                .await,
            None => {
                client
                    .query(
                        "SELECT state, count(*) FROM workflow_status GROUP BY state",
                        &[],
                    )
                    .await
            }
        }
        .map_err(unavailable)?;
        rows.iter()
            .map(|r| {
                let state: String = r.get(0);
                Ok((
                    parse_state(&state).ok_or_else(|| corrupt("state", &state))?,
                    r.get::<_, i64>(1) as u64,
                ))
            })
            .collect()
    }

    async fn audit_of(&self, workflows: &[Uuid]) -> Result<Vec<AuditEntry>, ReadError> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {AUDIT_COLUMNS} FROM audit_trail WHERE workflow_id = ANY($1)
                      ORDER BY workflow_id, position"
                ),
                &[&workflows],
            )
            .await
            .map_err(unavailable)?;
        rows.iter().map(audit_of).collect()
    }

    async fn checkpoints(&self) -> Result<Vec<(String, u64)>, ReadError> {
        let client = self.client().await?;
        let rows = client
            .query("SELECT name, position FROM projection_checkpoints", &[])
            .await
            .map_err(unavailable)?;
        let known: HashMap<String, u64> = rows
            .iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1) as u64))
            .collect();
        Ok(PROJECTIONS
            .iter()
            .map(|p| (p.to_string(), known.get(*p).copied().unwrap_or(0)))
            .collect())
    }

    async fn wait_for(&self, position: u64, limit: Duration) -> Result<(), ReadError> {
        let watches: Vec<_> = self.watches.values().cloned().collect();
        if watches.iter().any(|w| *w.borrow() < position) {
            // Someone waits: a runner of this process lingering over a
            // batch commits it now.
            self.checkpoints.want(position);
        }
        wait_all(&watches, position, limit).await
    }
}
