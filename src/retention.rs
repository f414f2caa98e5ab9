//! Retention (`[retention]`, `agentledger retain`): read-model rows past
//! the window are written to archive segments and then pruned.
//!
//! - **What goes.** The audit trail of every workflow that finished (a
//!   final state) before the cutoff, and the agent metrics of the minutes
//!   before it. Workflow status rows stay (one small row per workflow);
//!   the ledger itself is never pruned: every archived row can be derived
//!   again from it, and its hash chains and tree stay whole.
//! - **Segments.** One JSONL file per batch, written beside the others as
//!   a `.partial` file, synced, and renamed; only then are its rows deleted,
//!   in one transaction with a row in `retention_segments` that records the
//!   file's SHA-256. A file with no such row was written by a run that
//!   stopped before it pruned: its rows are in a later segment too.
//! - **Proofs.** Each workflow's line holds its receipt (its events, their
//!   inclusion proofs, a signed checkpoint), and every archived audit row
//!   names the hash of an event in it: `agentledger verify --archive FILE
//!   --public-key KEY` checks a segment with no database.
//! - **The floor.** The window is never under `min_window_days` (183 days,
//!   six months, unless set lower on purpose): a shorter one is refused
//!   before anything is read.
//!
//! One node runs at a time (a PostgreSQL advisory lock); the others skip.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use agentledger_eventstore::receipt::{self, Receipt};
use agentledger_eventstore::signing::LedgerKeys;
use agentledger_eventstore::tlog::TreeTiles;
use agentledger_eventstore::{EventStore, RecordedEvent};
use agentledger_projections::model::audit::AuditEntry;
use agentledger_projections::model::Fact;
use anyhow::{bail, Context};
use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// The `format` of the segments this build writes and reads.
pub const ARCHIVE_FORMAT: &str = "agentledger-archive-1";
/// Six months: the shortest window unless one is set lower on purpose.
pub const LEGAL_FLOOR_DAYS: u32 = 183;
/// The window when none is set: a year.
pub const DEFAULT_WINDOW_DAYS: u32 = 365;
/// Workflows per segment.
const WORKFLOWS_PER_SEGMENT: i64 = 200;
/// Metric rows per segment.
const METRICS_PER_SEGMENT: i64 = 10_000;
/// The advisory lock one retention run holds.
const LOCK: i64 = 0x6167_6c65_6467_6572; // "agledger" in ASCII

/// What to keep and where archives go.
#[derive(Debug, Clone)]
pub struct Policy {
    pub archive_dir: PathBuf,
    pub window_days: u32,
    /// How often `serve` runs it.
    pub interval: std::time::Duration,
}

impl Policy {
    /// A policy, refused when the window is under the floor or the
    /// directory cannot be written.
    pub fn new(
        archive_dir: PathBuf,
        window_days: Option<u32>,
        min_window_days: Option<u32>,
    ) -> anyhow::Result<Self> {
        let floor = min_window_days.unwrap_or(LEGAL_FLOOR_DAYS);
        let window_days = window_days.unwrap_or(DEFAULT_WINDOW_DAYS.max(floor));
        if window_days < floor {
            bail!(
                "[retention] window_days = {window_days} is under the floor of {floor} days \
                 (min_window_days; six months unless set lower where the law allows): \
                 nothing was archived or pruned"
            );
        }
        std::fs::create_dir_all(&archive_dir)
            .with_context(|| format!("creating the archive directory {}", archive_dir.display()))?;
        Ok(Self {
            archive_dir,
            window_days,
            interval: std::time::Duration::from_secs(24 * 3600),
        })
    }
}

/// Where a run reads from.
pub struct Sources<'a> {
    /// The read models' database (a role that may delete their rows).
    pub pool: &'a Pool,
    pub store: &'a dyn EventStore,
    pub tree: &'a dyn TreeTiles,
    pub keys: &'a dyn LedgerKeys,
    /// The checkpoint origin receipts are signed under.
    pub origin: &'a str,
}

/// What a run did.
#[derive(Debug, Default)]
pub struct Report {
    pub cutoff: Option<DateTime<Utc>>,
    /// Segments written and pruned, in order.
    pub segments: Vec<PathBuf>,
    pub workflows: usize,
    pub audit_rows: usize,
    pub metric_rows: usize,
    /// Workflows left in place this time, and why (a receipt that could
    /// not be built, rows that do not match the ledger). The others went on.
    pub problems: Vec<String>,
    /// Another node held the lock: nothing was done.
    pub skipped: bool,
}

/// Archives and prunes everything past the window, one segment at a time;
/// `progress` hears of each segment and of each workflow left in place.
pub async fn run_once(
    sources: &Sources<'_>,
    policy: &Policy,
    mut progress: impl FnMut(&str),
) -> anyhow::Result<Report> {
    // A connection of its own, out of the pool: the session lock ends with
    // it whatever becomes of this run (an error, a panic, a dropped future),
    // never left held on a pooled connection.
    let client = deadpool_postgres::Object::take(sources.pool.get().await?);
    let locked: bool = client
        .query_one("SELECT pg_try_advisory_lock($1)", &[&LOCK])
        .await?
        .get(0);
    if !locked {
        return Ok(Report {
            skipped: true,
            ..Report::default()
        });
    }
    let result = archive(sources, policy, &mut progress).await;
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&LOCK])
        .await;
    result
}

async fn archive(
    sources: &Sources<'_>,
    policy: &Policy,
    progress: &mut impl FnMut(&str),
) -> anyhow::Result<Report> {
    let client = sources.pool.get().await?;
    let cutoff: DateTime<Utc> = client
        .query_one(
            "SELECT now() - make_interval(days => $1)",
            &[&(policy.window_days as i32)],
        )
        .await?
        .get(0);
    // The run's time and a random tag: two runs in one second (two nodes,
    // a CLI run beside serve's) never name a segment alike.
    let stamp = format!(
        "{}-{}",
        Utc::now().format("%Y%m%dT%H%M%SZ"),
        &Uuid::new_v4().simple().to_string()[..8]
    );
    let mut report = Report {
        cutoff: Some(cutoff),
        ..Report::default()
    };
    let header = |kind: &str| {
        json!({
            "kind": "header",
            "format": ARCHIVE_FORMAT,
            "contents": kind,
            "cutoff": cutoff,
            "window_days": policy.window_days,
            "written_at": Utc::now(),
        })
    };

    // Workflows finished before the cutoff that still have audit rows, in
    // keyset pages: a workflow left in place is not read again this run.
    let mut after: (Option<DateTime<Utc>>, Uuid) = (None, Uuid::nil());
    let mut seq = 0;
    loop {
        let rows = client
            .query(
                "SELECT w.workflow_id, w.completed_at FROM workflow_status w
                  WHERE w.completed_at < $1
                    AND ($2::timestamptz IS NULL OR (w.completed_at, w.workflow_id) > ($2, $3))
                    AND EXISTS (SELECT 1 FROM audit_trail a WHERE a.workflow_id = w.workflow_id)
                  ORDER BY w.completed_at, w.workflow_id
                  LIMIT $4",
                &[&cutoff, &after.0, &after.1, &WORKFLOWS_PER_SEGMENT],
            )
            .await?;
        let Some(last) = rows.last() else { break };
        after = (Some(last.get(1)), last.get(0));
        let ids: Vec<Uuid> = rows.iter().map(|r| r.get(0)).collect();
        let mut receipts = HashMap::new();
        for id in &ids {
            match receipt::build(
                sources.store,
                sources.tree,
                sources.keys,
                sources.origin,
                &agentledger_agents::stream_of(*id),
            )
            .await
            {
                Ok(built) => {
                    receipts.insert(*id, built);
                }
                Err(e) => {
                    let problem = format!("workflow {id} left in place: its receipt: {e}");
                    progress(&problem);
                    report.problems.push(problem);
                }
            }
        }
        let audit = client
            .query(
                "SELECT workflow_id, position, to_jsonb(a) FROM audit_trail a
                  WHERE workflow_id = ANY($1) ORDER BY workflow_id, position",
                &[&ids],
            )
            .await?;
        let mut by_workflow: HashMap<Uuid, Vec<Value>> = HashMap::new();
        for row in &audit {
            let (id, position, value): (Uuid, i64, Value) = (row.get(0), row.get(1), row.get(2));
            let Some(receipt) = receipts.get(&id) else {
                continue;
            };
            // Rows of events recorded after the receipt wait for the next run.
            if receipt
                .events
                .last()
                .is_some_and(|e| (position as u64) > e.event.global_position)
            {
                continue;
            }
            if let Err(e) = check_row(&value, &id, receipt) {
                let problem = format!(
                    "workflow {id} left in place: {e}: its audit trail does not match the ledger \
                     (`agentledger rebuild audit_trail` derives it again)"
                );
                progress(&problem);
                report.problems.push(problem);
                receipts.remove(&id);
                by_workflow.remove(&id);
                continue;
            }
            by_workflow.entry(id).or_default().push(value);
        }
        let kept: Vec<Uuid> = ids
            .iter()
            .copied()
            .filter(|id| receipts.contains_key(id))
            .collect();
        if kept.is_empty() {
            continue;
        }
        let mut lines = vec![header("workflows")];
        let mut archived = Vec::new();
        for id in &kept {
            let rows = by_workflow.remove(id).unwrap_or_default();
            archived.extend(rows.iter().cloned());
            lines.push(json!({
                "kind": "workflow",
                "workflow_id": id,
                "audit_trail": rows,
                "receipt": receipts.remove(id).expect("kept"),
            }));
        }
        lines.push(json!({
            "kind": "end",
            "workflows": kept.len(),
            "audit_rows": archived.len(),
            "metric_rows": 0,
        }));
        seq += 1;
        let name = format!("{stamp}-workflows-{seq:04}.jsonl");
        let positions: Vec<i64> = archived
            .iter()
            .map(|r| r["position"].as_i64().expect("checked"))
            .collect();
        let segment = write_segment(&policy.archive_dir, &name, &lines).await?;
        prune(
            sources.pool,
            &segment,
            cutoff,
            (kept.len(), archived, Vec::new()),
            |tx| {
                Box::pin(async move {
                    Ok(tx
                        .query(
                            "DELETE FROM audit_trail a WHERE position = ANY($1) RETURNING to_jsonb(a)",
                            &[&positions],
                        )
                        .await?
                        .iter()
                        .map(|r| r.get(0))
                        .collect())
                })
            },
        )
        .await?;
        report.workflows += kept.len();
        report.audit_rows += segment.audit_rows;
        progress(&format!(
            "{}: {} workflows finished before {cutoff}",
            segment.path.display(),
            kept.len()
        ));
        report.segments.push(segment.path);
    }

    // Agent metrics of the minutes before the cutoff.
    let mut after: (Option<DateTime<Utc>>, String, String) = (None, String::new(), String::new());
    for seq in 1.. {
        let rows = client
            .query(
                "SELECT bucket, tenant, agent, to_jsonb(m) FROM agent_metrics m
                  WHERE bucket < $1
                    AND ($2::timestamptz IS NULL OR (bucket, tenant, agent) > ($2, $3, $4))
                  ORDER BY bucket, tenant, agent
                  LIMIT $5",
                &[&cutoff, &after.0, &after.1, &after.2, &METRICS_PER_SEGMENT],
            )
            .await?;
        let Some(last) = rows.last() else { break };
        after = (Some(last.get(0)), last.get(1), last.get(2));
        let mut lines = vec![header("agent_metrics")];
        let (mut buckets, mut tenants, mut agents, mut archived) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for row in &rows {
            buckets.push(row.get::<_, DateTime<Utc>>(0));
            tenants.push(row.get::<_, String>(1));
            agents.push(row.get::<_, String>(2));
            let value: Value = row.get(3);
            lines.push(json!({ "kind": "agent_metrics", "row": value }));
            archived.push(value);
        }
        let count = rows.len();
        lines.push(json!({ "kind": "end", "workflows": 0, "audit_rows": 0, "metric_rows": count }));
        let name = format!("{stamp}-metrics-{seq:04}.jsonl");
        let segment = write_segment(&policy.archive_dir, &name, &lines).await?;
        prune(
            sources.pool,
            &segment,
            cutoff,
            (0, Vec::new(), archived),
            |tx| {
                Box::pin(async move {
                    Ok(tx
                        .query(
                            "DELETE FROM agent_metrics m USING
                               unnest($1::timestamptz[], $2::text[], $3::text[]) AS k(bucket, tenant, agent)
                             WHERE m.bucket = k.bucket AND m.tenant = k.tenant AND m.agent = k.agent
                             RETURNING to_jsonb(m)",
                            &[&buckets, &tenants, &agents],
                        )
                        .await?
                        .iter()
                        .map(|r| r.get(0))
                        .collect())
                })
            },
        )
        .await?;
        report.metric_rows += count;
        progress(&format!(
            "{}: {count} agent-metric rows of minutes before {cutoff}",
            segment.path.display()
        ));
        report.segments.push(segment.path);
    }
    Ok(report)
}

/// The audit row the projection writes for `event`, by column, as
/// `to_jsonb` gives it; `None` for an event that is not a workflow's.
fn derived_row(event: &RecordedEvent) -> Result<Option<Value>, String> {
    let fact = Fact::decode(event).map_err(|e| e.to_string())?;
    Ok(fact.map(|fact| {
        let e = AuditEntry::of(&fact);
        json!({
            "position": e.position, "workflow_id": e.workflow_id, "tenant": e.tenant,
            "version": e.version, "event_type": e.event_type, "kind": e.kind,
            "actor_kind": e.actor_kind, "actor": e.actor, "actor_version": e.actor_version,
            "role": e.role.map(|r| r.as_str()), "summary": e.summary, "rationale": e.rationale,
            "policy_fingerprint": e.policy_fingerprint, "recorded_at": e.recorded_at,
            "hash": e.hash,
        })
    }))
}

/// An archived audit row is the row of an event of its workflow's receipt,
/// column for column: the same position, hash and version, and every
/// reading derived from that event again (times compared as instants).
fn check_row(row: &Value, workflow: &Uuid, receipt: &Receipt) -> Result<(), String> {
    let position = row["position"]
        .as_u64()
        .ok_or("an audit row has no position")?;
    let event = receipt
        .events
        .iter()
        .find(|e| e.event.global_position == position)
        .ok_or_else(|| format!("the audit row at position {position} names no event of it"))?;
    let derived = derived_row(&event.event)
        .map_err(|e| format!("the event at position {position} cannot be read: {e}"))?
        .ok_or_else(|| format!("the event at position {position} is not a workflow's"))?;
    if row["workflow_id"].as_str() != Some(workflow.to_string().as_str()) {
        return Err(format!(
            "the audit row at position {position} is of another workflow"
        ));
    }
    let (Some(row), Some(derived)) = (row.as_object(), derived.as_object()) else {
        return Err(format!(
            "the audit row at position {position} is not an object"
        ));
    };
    let instant = |v: &Value| v.as_str().and_then(|t| t.parse::<DateTime<Utc>>().ok());
    let matches = |column: &str, value: &Value| match (column, row.get(column)) {
        ("recorded_at", Some(theirs)) => {
            instant(theirs).is_some() && instant(theirs) == instant(value)
        }
        (_, theirs) => theirs == Some(value),
    };
    if row.len() != derived.len() || !derived.iter().all(|(c, v)| matches(c, v)) {
        let differ: Vec<&str> = derived
            .iter()
            .filter(|(c, v)| !matches(c, v))
            .map(|(c, _)| c.as_str())
            .collect();
        return Err(format!(
            "the audit row at position {position} differs from its event ({})",
            if differ.is_empty() {
                "its columns".to_string()
            } else {
                differ.join(", ")
            }
        ));
    }
    Ok(())
}

/// A segment as written.
struct Segment {
    path: PathBuf,
    name: String,
    sha256: String,
    audit_rows: usize,
}

/// Writes `lines` as `dir/name`, durably: a `.partial` file, synced,
/// renamed, and the directory synced, on a blocking thread.
async fn write_segment(dir: &Path, name: &str, lines: &[Value]) -> anyhow::Result<Segment> {
    let mut bytes = Vec::new();
    for line in lines {
        serde_json::to_writer(&mut bytes, line)?;
        bytes.push(b'\n');
    }
    let audit_rows = lines
        .iter()
        .map(|l| l["audit_trail"].as_array().map_or(0, Vec::len))
        .sum();
    let sha256 = hex::encode(Sha256::digest(&bytes));
    let (dir, name) = (dir.to_path_buf(), name.to_string());
    tokio::task::spawn_blocking(move || {
        let path = dir.join(&name);
        if path.exists() {
            bail!("{} exists already: nothing was pruned", path.display());
        }
        let partial = dir.join(format!(".{name}.partial"));
        let _ = std::fs::remove_file(&partial);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&partial)
            .with_context(|| format!("creating {}", partial.display()))?;
        file.write_all(&bytes)
            .and_then(|()| file.sync_all())
            .with_context(|| format!("writing {}", partial.display()))?;
        std::fs::rename(&partial, &path)?;
        std::fs::File::open(&dir)?.sync_all()?;
        Ok(Segment {
            path,
            name,
            sha256,
            audit_rows,
        })
    })
    .await?
}

type Deleting<'t> =
    std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<Vec<Value>>> + Send + 't>>;

/// In one transaction: records the segment (with its SHA-256) and deletes
/// its rows; refused, with nothing deleted, unless the rows deleted are
/// exactly the rows written (a row changed or added meanwhile stays).
async fn prune(
    pool: &Pool,
    segment: &Segment,
    cutoff: DateTime<Utc>,
    (workflows, audit, metrics): (usize, Vec<Value>, Vec<Value>),
    delete: impl for<'t> FnOnce(&'t deadpool_postgres::Transaction<'t>) -> Deleting<'t>,
) -> anyhow::Result<()> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    tx.execute(
        "INSERT INTO retention_segments (name, sha256, cutoff, workflows, audit_rows, metric_rows)
         VALUES ($1, $2, $3, $4, $5, $6)",
        &[
            &segment.name,
            &segment.sha256,
            &cutoff,
            &(workflows as i32),
            &(audit.len() as i32),
            &(metrics.len() as i32),
        ],
    )
    .await?;
    let sorted = |rows: Vec<Value>| {
        let mut texts: Vec<String> = rows.iter().map(Value::to_string).collect();
        texts.sort();
        texts
    };
    let written = sorted(audit.into_iter().chain(metrics).collect());
    let deleted = sorted(delete(&tx).await?);
    if deleted != written {
        tx.rollback().await?;
        bail!(
            "{}: the rows to delete ({}) are not the rows written ({}): they changed meanwhile \
             (a rebuild?); nothing was pruned, the next run archives them again",
            segment.name,
            deleted.len(),
            written.len()
        );
    }
    tx.commit().await?;
    Ok(())
}

/// `serve`'s schedule: a run at start and then every `policy.interval`
/// until `stop`; a failed run is logged and tried again next time.
pub async fn schedule(
    policy: Policy,
    pool: Pool,
    store: std::sync::Arc<dyn EventStore>,
    tree: std::sync::Arc<dyn TreeTiles>,
    keys: std::sync::Arc<dyn LedgerKeys>,
    origin: String,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        let sources = Sources {
            pool: &pool,
            store: &*store,
            tree: &*tree,
            keys: &*keys,
            origin: &origin,
        };
        let run = run_once(&sources, &policy, |said| tracing::info!(said, "retention"));
        tokio::select! {
            () = stop.cancelled() => return,
            report = run => match report {
                Ok(r) if r.skipped => tracing::info!("retention skipped: another node holds its lock"),
                Ok(r) => tracing::info!(
                    workflows = r.workflows,
                    audit_rows = r.audit_rows,
                    metric_rows = r.metric_rows,
                    segments = r.segments.len(),
                    left_in_place = r.problems.len(),
                    "retention run done"
                ),
                Err(e) => tracing::warn!(error = %format!("{e:#}"), "retention run failed; it runs again at the next interval"),
            },
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(policy.interval) => {}
        }
    }
}

/// `agentledger retain`.
#[derive(clap::Args)]
pub struct RetainArgs {
    /// The service's configuration file: its `[retention]` and `[server]
    /// checkpoint_origin` apply; the flags below override them.
    #[arg(long, env = "AGENTLEDGER_CONFIG")]
    config: Option<PathBuf>,
    /// Where segments are written (created when missing).
    #[arg(long, env = "AGENTLEDGER_RETENTION_ARCHIVE_DIR")]
    archive_dir: Option<PathBuf>,
    /// Rows of workflows finished longer ago than this are archived and
    /// pruned (default 365).
    #[arg(long)]
    window_days: Option<u32>,
    /// The floor under which a window is refused (default 183: six months).
    #[arg(long)]
    min_window_days: Option<u32>,
    /// The checkpoint origin receipts are signed under, as `serve` signs
    /// them (default: the configuration's, else localhost/agentledger).
    #[arg(long, env = "AGENTLEDGER_CHECKPOINT_ORIGIN")]
    checkpoint_origin: Option<String>,
    #[command(flatten)]
    database: crate::DatabaseArgs,
}

pub async fn run(args: RetainArgs) -> anyhow::Result<()> {
    use agentledger_eventstore::postgres::PostgresTiles;
    use agentledger_eventstore::signing::PostgresLedgerKeys;
    use agentledger_eventstore::{PostgresEventStore, PostgresOptions};
    let file = match &args.config {
        Some(path) => crate::config::FileConfig::load(path)?,
        None => crate::config::FileConfig::default(),
    };
    let origin = args
        .checkpoint_origin
        .clone()
        .or_else(|| file.server.checkpoint_origin.clone())
        .unwrap_or_else(|| agentledger_api::DEFAULT_ORIGIN.to_string());
    agentledger_eventstore::checkpoint::check_origin(&origin)?;
    let section = &file.retention;
    let archive_dir = args
        .archive_dir
        .clone()
        .or_else(|| section.archive_dir.clone())
        .context("give --archive-dir (or [retention] archive_dir in --config)")?;
    let policy = Policy::new(
        archive_dir,
        args.window_days.or(section.window_days),
        args.min_window_days.or(section.min_window_days),
    )?;
    // Receipts are signed: the key's secret half is the owner role's to read.
    let url = args
        .database
        .admin_url()
        .context("AGENTLEDGER_ADMIN_DATABASE_URL or DATABASE_URL is not set")?;
    let store = PostgresEventStore::connect(url, PostgresOptions::default()).await?;
    let tree = PostgresTiles::new(store.pool().clone());
    let keys = PostgresLedgerKeys::new(store.pool().clone());
    let sources = Sources {
        pool: store.pool(),
        store: &store,
        tree: &tree,
        keys: &keys,
        origin: &origin,
    };
    let report = run_once(&sources, &policy, |line| eprintln!("{line}")).await?;
    if report.skipped {
        bail!("another retention run holds the lock (a node's [retention] schedule?): try later");
    }
    let (_, key) = keys.active().await?;
    let verifier = agentledger_eventstore::checkpoint::verifier_key(&origin, &key.verifying_key());
    println!(
        "retention: {} workflows ({} audit rows) and {} agent-metric rows from before {} \
         archived in {} segments under {} and pruned; the ledger keeps every event. Check a \
         segment with `agentledger verify --archive FILE --public-key '{verifier}'`",
        report.workflows,
        report.audit_rows,
        report.metric_rows,
        report.cutoff.map(|c| c.to_rfc3339()).unwrap_or_default(),
        report.segments.len(),
        policy.archive_dir.display(),
    );
    if !report.problems.is_empty() {
        bail!(
            "{} workflows were left in place (listed above); the others were archived",
            report.problems.len()
        );
    }
    Ok(())
}

/// What a checked segment holds.
#[derive(Debug, Default)]
pub struct SegmentCheck {
    pub contents: String,
    pub workflows: usize,
    pub events: usize,
    pub audit_rows: usize,
    pub metric_rows: usize,
    pub sha256: String,
}

/// Checks a segment with no database: its header, that every line is of
/// the kind the header names, once (no workflow, position or metric minute
/// twice), every workflow's receipt under `trusted` (the verifier key kept
/// apart), every archived audit row against the event it names in that
/// receipt (column for column, readings derived again), every metric row's
/// minute before the cutoff, and the closing counts.
pub fn verify_segment(path: &Path, trusted: &str) -> Result<SegmentCheck, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("reading it: {e}"))?;
    let text = std::str::from_utf8(&bytes).map_err(|_| "it is not UTF-8 text".to_string())?;
    let mut check = SegmentCheck {
        sha256: hex::encode(Sha256::digest(&bytes)),
        ..SegmentCheck::default()
    };
    let mut cutoff: Option<DateTime<Utc>> = None;
    let mut ended = None;
    let mut workflows = HashSet::new();
    let mut positions = HashSet::new();
    let mut minutes = HashSet::new();
    for (n, line) in text.lines().enumerate() {
        let at = n + 1;
        if ended.is_some() {
            return Err(format!("line {at} comes after the closing line"));
        }
        let value: Value =
            serde_json::from_str(line).map_err(|e| format!("line {at} is not JSON: {e}"))?;
        let kind = value["kind"].as_str();
        match (n, kind) {
            (0, Some("header")) => {
                if value["format"] != ARCHIVE_FORMAT {
                    return Err(format!(
                        "format {}; this build reads {ARCHIVE_FORMAT}",
                        value["format"]
                    ));
                }
                check.contents = value["contents"].as_str().unwrap_or_default().to_string();
                if !matches!(check.contents.as_str(), "workflows" | "agent_metrics") {
                    return Err(format!(
                        "the header names unknown contents {:?}",
                        value["contents"]
                    ));
                }
                cutoff = Some(
                    serde_json::from_value(value["cutoff"].clone())
                        .map_err(|_| "the header has no cutoff".to_string())?,
                );
            }
            (0, _) => return Err("line 1 is not a segment's header".into()),
            (_, Some("end")) => ended = Some(value),
            (_, Some(kind)) if kind != line_kind(&check.contents) => {
                return Err(format!(
                    "line {at} is a {kind} line in a segment of {}",
                    check.contents
                ))
            }
            (_, Some("workflow")) => {
                let id: Uuid = value["workflow_id"]
                    .as_str()
                    .and_then(|t| t.parse().ok())
                    .ok_or_else(|| format!("line {at}: no workflow id"))?;
                if !workflows.insert(id) {
                    return Err(format!("line {at}: workflow {id} appears twice"));
                }
                let receipt: Receipt = serde_json::from_value(value["receipt"].clone())
                    .map_err(|e| format!("line {at}: the receipt of workflow {id}: {e}"))?;
                if receipt.stream_id != format!("{}{id}", agentledger_domain::names::STREAM_PREFIX)
                {
                    return Err(format!(
                        "line {at}: the receipt is of {}, not of workflow {id}",
                        receipt.stream_id
                    ));
                }
                receipt::verify(&receipt, Some(trusted))
                    .map_err(|e| format!("line {at}: workflow {id}: {e}"))?;
                let rows = value["audit_trail"]
                    .as_array()
                    .ok_or_else(|| format!("line {at}: workflow {id} has no audit_trail list"))?;
                for row in rows {
                    check_row(row, &id, &receipt)
                        .map_err(|e| format!("line {at}: workflow {id}: {e}"))?;
                    if !positions.insert(row["position"].as_u64()) {
                        return Err(format!(
                            "line {at}: the audit row at position {} appears twice",
                            row["position"]
                        ));
                    }
                }
                check.workflows += 1;
                check.events += receipt.events.len();
                check.audit_rows += rows.len();
            }
            (_, Some("agent_metrics")) => {
                let row = &value["row"];
                let minute: Option<DateTime<Utc>> =
                    serde_json::from_value(row["bucket"].clone()).ok();
                let (Some(tenant), Some(agent), Some(minute)) =
                    (row["tenant"].as_str(), row["agent"].as_str(), minute)
                else {
                    return Err(format!(
                        "line {at}: a metric row without tenant, agent and bucket"
                    ));
                };
                if cutoff.is_some_and(|c| minute >= c) {
                    return Err(format!(
                        "line {at}: the metric minute {minute} is not before the cutoff"
                    ));
                }
                if !minutes.insert((tenant.to_string(), agent.to_string(), minute)) {
                    return Err(format!("line {at}: {agent} at {minute} appears twice"));
                }
                check.metric_rows += 1;
            }
            (_, kind) => return Err(format!("line {at}: unknown kind {kind:?}")),
        }
    }
    let Some(end) = ended else {
        return Err("it has no closing line: the file was cut short".into());
    };
    let said = (
        end["workflows"].as_u64(),
        end["audit_rows"].as_u64(),
        end["metric_rows"].as_u64(),
    );
    let found = (
        Some(check.workflows as u64),
        Some(check.audit_rows as u64),
        Some(check.metric_rows as u64),
    );
    if said != found {
        return Err(format!(
            "its closing line counts {said:?} (workflows, audit rows, metric rows), the file \
             holds {found:?}"
        ));
    }
    Ok(check)
}

/// The kind of line a segment of `contents` holds.
fn line_kind(contents: &str) -> &'static str {
    if contents == "workflows" {
        "workflow"
    } else {
        "agent_metrics"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_under_the_floor_is_refused() {
        let dir = std::env::temp_dir().join(format!("retention-{}", Uuid::new_v4()));
        let err = Policy::new(dir.clone(), Some(30), None).unwrap_err();
        assert!(
            err.to_string().contains("under the floor of 183 days"),
            "{err}"
        );
        assert!(!dir.exists(), "nothing is created for a refused policy");
        let policy = Policy::new(dir.clone(), None, None).unwrap();
        assert_eq!(policy.window_days, DEFAULT_WINDOW_DAYS);
        let lowered = Policy::new(dir.clone(), Some(30), Some(30)).unwrap();
        assert_eq!(lowered.window_days, 30);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn metric_segments_that_are_cut_padded_repeated_or_mixed_are_refused() {
        let dir = std::env::temp_dir().join(format!("retention-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let header = json!({ "kind": "header", "format": ARCHIVE_FORMAT,
                             "contents": "agent_metrics", "cutoff": "2026-01-01T00:00:00Z" });
        let row = |agent: &str, bucket: &str| {
            json!({ "kind": "agent_metrics",
                    "row": { "tenant": "default", "agent": agent, "bucket": bucket } })
        };
        let end = |rows: u64| json!({ "kind": "end", "workflows": 0, "audit_rows": 0, "metric_rows": rows });
        let (sena, lubit) = (
            row("sena", "2025-06-01T10:00:00+00:00"),
            row("lubit", "2025-06-01T10:00:00+00:00"),
        );
        let check = |name: &'static str, lines: Vec<Value>| {
            let dir = dir.clone();
            async move {
                let segment = write_segment(&dir, name, &lines).await.unwrap();
                verify_segment(&segment.path, "unused")
            }
        };
        let whole = check(
            "whole",
            vec![header.clone(), sena.clone(), lubit.clone(), end(2)],
        )
        .await
        .unwrap();
        assert_eq!(
            (whole.metric_rows, whole.contents.as_str()),
            (2, "agent_metrics")
        );
        let refused = [
            ("cut", vec![header.clone(), sena.clone()], "cut short"),
            (
                "padded",
                vec![
                    header.clone(),
                    sena.clone(),
                    lubit.clone(),
                    sena.clone(),
                    end(3),
                ],
                "appears twice",
            ),
            (
                "miscounted",
                vec![header.clone(), sena.clone(), end(2)],
                "closing line counts",
            ),
            (
                "late",
                vec![header.clone(), row("sena", "2026-02-01T00:00:00Z"), end(1)],
                "not before the cutoff",
            ),
            (
                "empty row",
                vec![header.clone(), json!({ "kind": "agent_metrics" }), end(1)],
                "without tenant",
            ),
            (
                "mixed",
                vec![
                    header.clone(),
                    sena.clone(),
                    json!({ "kind": "workflow" }),
                    end(1),
                ],
                "a workflow line in a segment of agent_metrics",
            ),
            (
                "trailing",
                vec![header.clone(), sena.clone(), end(1), sena.clone()],
                "after the closing line",
            ),
        ];
        for (name, lines, said) in refused {
            let err = check(name, lines).await.unwrap_err();
            assert!(err.contains(said), "{name}: {err}");
        }
        assert!(
            write_segment(&dir, "whole", &[]).await.is_err(),
            "never overwritten"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
