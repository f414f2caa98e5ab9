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

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use agentledger_eventstore::receipt::{self, Receipt};
use agentledger_eventstore::signing::LedgerKeys;
use agentledger_eventstore::tlog::TreeTiles;
use agentledger_eventstore::EventStore;
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
    /// Another node held the lock: nothing was done.
    pub skipped: bool,
}

/// Archives and prunes everything past the window, one segment at a time;
/// `progress` hears of each segment.
pub async fn run_once(
    sources: &Sources<'_>,
    policy: &Policy,
    mut progress: impl FnMut(&str),
) -> anyhow::Result<Report> {
    let client = sources.pool.get().await?;
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
    // Released on every path; a process that dies releases it with its
    // connection.
    client
        .execute("SELECT pg_advisory_unlock($1)", &[&LOCK])
        .await?;
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
    let stamp = Utc::now().format("%Y%m%dT%H%M%SZ").to_string();
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
    // keyset pages (a page that could not all be pruned is not read again).
    let mut after: (Option<DateTime<Utc>>, Uuid) = (None, Uuid::nil());
    for seq in 1.. {
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
            let built = receipt::build(
                sources.store,
                sources.tree,
                sources.keys,
                sources.origin,
                &agentledger_agents::stream_of(*id),
            )
            .await
            .with_context(|| format!("the receipt of workflow {id}"))?;
            receipts.insert(*id, built);
        }
        let audit = client
            .query(
                "SELECT workflow_id, position, to_jsonb(a) FROM audit_trail a
                  WHERE workflow_id = ANY($1) ORDER BY workflow_id, position",
                &[&ids],
            )
            .await?;
        let mut by_workflow: HashMap<Uuid, Vec<Value>> = HashMap::new();
        let mut positions = Vec::new();
        for row in &audit {
            let (id, position, value): (Uuid, i64, Value) = (row.get(0), row.get(1), row.get(2));
            let receipt = &receipts[&id];
            // Rows of events recorded after the receipt wait for the next run.
            if receipt
                .events
                .last()
                .is_some_and(|e| (position as u64) > e.event.global_position)
            {
                continue;
            }
            check_row(&value, receipt).map_err(|e| {
                anyhow::anyhow!(
                    "workflow {id}: {e}; the audit trail does not match the ledger \
                     (`agentledger rebuild audit_trail` derives it again), nothing was pruned"
                )
            })?;
            positions.push(position);
            by_workflow.entry(id).or_default().push(value);
        }
        let mut lines = vec![header("workflows")];
        for id in &ids {
            let receipt = receipts.remove(id).expect("built above");
            lines.push(json!({
                "kind": "workflow",
                "workflow_id": id,
                "audit_trail": by_workflow.remove(id).unwrap_or_default(),
                "receipt": receipt,
            }));
        }
        lines.push(json!({
            "kind": "end",
            "workflows": ids.len(),
            "audit_rows": positions.len(),
            "metric_rows": 0,
        }));
        let name = format!("{stamp}-workflows-{seq:04}.jsonl");
        let path = write_segment(&policy.archive_dir, &name, &lines)?;
        let archived = positions.len();
        prune(
            sources.pool,
            &path,
            &name,
            cutoff,
            (ids.len(), archived, 0),
            |tx| {
                Box::pin(async move {
                    Ok(tx
                        .execute(
                            "DELETE FROM audit_trail WHERE position = ANY($1)",
                            &[&positions],
                        )
                        .await?)
                })
            },
        )
        .await?;
        report.workflows += ids.len();
        report.audit_rows += archived;
        progress(&format!(
            "{}: {} workflows finished before {cutoff}",
            path.display(),
            ids.len()
        ));
        report.segments.push(path);
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
        let (mut buckets, mut tenants, mut agents) = (Vec::new(), Vec::new(), Vec::new());
        for row in &rows {
            buckets.push(row.get::<_, DateTime<Utc>>(0));
            tenants.push(row.get::<_, String>(1));
            agents.push(row.get::<_, String>(2));
            lines.push(json!({ "kind": "agent_metrics", "row": row.get::<_, Value>(3) }));
        }
        let count = rows.len();
        lines.push(json!({ "kind": "end", "workflows": 0, "audit_rows": 0, "metric_rows": count }));
        let name = format!("{stamp}-metrics-{seq:04}.jsonl");
        let path = write_segment(&policy.archive_dir, &name, &lines)?;
        prune(
            sources.pool,
            &path,
            &name,
            cutoff,
            (0, 0, count),
            |tx| {
                Box::pin(async move {
                    Ok(tx
                        .execute(
                            "DELETE FROM agent_metrics m USING
                               unnest($1::timestamptz[], $2::text[], $3::text[]) AS k(bucket, tenant, agent)
                             WHERE m.bucket = k.bucket AND m.tenant = k.tenant AND m.agent = k.agent",
                            &[&buckets, &tenants, &agents],
                        )
                        .await?)
                })
            },
        )
        .await?;
        report.metric_rows += count;
        progress(&format!(
            "{}: {count} agent-metric rows of minutes before {cutoff}",
            path.display()
        ));
        report.segments.push(path);
    }
    Ok(report)
}

/// An archived audit row names an event of the receipt: same position,
/// version and hash.
fn check_row(row: &Value, receipt: &Receipt) -> Result<(), String> {
    let position = row["position"]
        .as_u64()
        .ok_or("an audit row has no position")?;
    let event = receipt
        .events
        .iter()
        .find(|e| e.event.global_position == position)
        .ok_or_else(|| format!("the audit row at position {position} names no event of it"))?;
    if row["hash"].as_str() != Some(hex::encode(event.event.hash).as_str())
        || row["version"].as_u64() != Some(event.event.stream_version)
    {
        return Err(format!(
            "the audit row at position {position} has another hash or version than the event"
        ));
    }
    Ok(())
}

/// Writes `lines` as `dir/name`, durably: a `.partial` file, synced,
/// renamed, and the directory synced. Returns the path.
fn write_segment(dir: &Path, name: &str, lines: &[Value]) -> anyhow::Result<PathBuf> {
    let path = dir.join(name);
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
    let mut out = std::io::BufWriter::new(&mut file);
    for line in lines {
        serde_json::to_writer(&mut out, line)?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    drop(out);
    file.sync_all()
        .with_context(|| format!("syncing {}", partial.display()))?;
    std::fs::rename(&partial, &path)?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(path)
}

type Deleting<'t> =
    std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<u64>> + Send + 't>>;

/// In one transaction: records the segment (its SHA-256 from the file as
/// written) and deletes its rows; refused, and nothing deleted, when the
/// rows deleted are not the rows written.
async fn prune(
    pool: &Pool,
    path: &Path,
    name: &str,
    cutoff: DateTime<Utc>,
    (workflows, audit_rows, metric_rows): (usize, usize, usize),
    delete: impl for<'t> FnOnce(&'t deadpool_postgres::Transaction<'t>) -> Deleting<'t>,
) -> anyhow::Result<()> {
    let sha256 = hex::encode(Sha256::digest(std::fs::read(path)?));
    let name = name.to_string();
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    tx.execute(
        "INSERT INTO retention_segments (name, sha256, cutoff, workflows, audit_rows, metric_rows)
         VALUES ($1, $2, $3, $4, $5, $6)",
        &[
            &name,
            &sha256,
            &cutoff,
            &(workflows as i32),
            &(audit_rows as i32),
            &(metric_rows as i32),
        ],
    )
    .await?;
    let deleted = delete(&tx).await? as usize;
    if deleted != audit_rows + metric_rows {
        tx.rollback().await?;
        bail!(
            "{name}: {deleted} rows would be deleted for {} archived (a rebuild ran meanwhile?): \
             nothing was pruned; the next run archives them again",
            audit_rows + metric_rows
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
        let run = run_once(&sources, &policy, |segment| {
            tracing::info!(segment, "archive segment written and its rows pruned")
        });
        tokio::select! {
            () = stop.cancelled() => return,
            report = run => match report {
                Ok(r) if r.skipped => tracing::debug!("another node runs retention now"),
                Ok(r) => tracing::info!(
                    workflows = r.workflows,
                    audit_rows = r.audit_rows,
                    metric_rows = r.metric_rows,
                    segments = r.segments.len(),
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
    /// Where segments are written (created when missing).
    #[arg(long, env = "AGENTLEDGER_RETENTION_ARCHIVE_DIR")]
    archive_dir: PathBuf,
    /// Rows of workflows finished longer ago than this are archived and
    /// pruned (default 365).
    #[arg(long)]
    window_days: Option<u32>,
    /// The floor under which a window is refused (default 183: six months).
    #[arg(long)]
    min_window_days: Option<u32>,
    /// The checkpoint origin receipts are signed under, as `serve` signs
    /// them (`[server] checkpoint_origin`).
    #[arg(long, env = "AGENTLEDGER_CHECKPOINT_ORIGIN", default_value = agentledger_api::DEFAULT_ORIGIN)]
    checkpoint_origin: String,
    #[command(flatten)]
    database: crate::DatabaseArgs,
}

pub async fn run(args: RetainArgs) -> anyhow::Result<()> {
    use agentledger_eventstore::postgres::PostgresTiles;
    use agentledger_eventstore::signing::PostgresLedgerKeys;
    use agentledger_eventstore::{PostgresEventStore, PostgresOptions};
    agentledger_eventstore::checkpoint::check_origin(&args.checkpoint_origin)?;
    let policy = Policy::new(args.archive_dir, args.window_days, args.min_window_days)?;
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
        origin: &args.checkpoint_origin,
    };
    let report = run_once(&sources, &policy, |line| eprintln!("{line}")).await?;
    if report.skipped {
        bail!("another retention run holds the lock (a node's [retention] schedule?): try later");
    }
    let (_, key) = keys.active().await?;
    let verifier = agentledger_eventstore::checkpoint::verifier_key(
        &args.checkpoint_origin,
        &key.verifying_key(),
    );
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

/// Checks a segment with no database: its header and closing line, every
/// workflow's receipt under `trusted` (the verifier key kept apart), and
/// that every archived audit row names an event of its workflow's receipt.
pub fn verify_segment(path: &Path, trusted: &str) -> Result<SegmentCheck, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("reading it: {e}"))?;
    let text = std::str::from_utf8(&bytes).map_err(|_| "it is not UTF-8 text".to_string())?;
    let mut check = SegmentCheck {
        sha256: hex::encode(Sha256::digest(&bytes)),
        ..SegmentCheck::default()
    };
    let mut ended = None;
    for (n, line) in text.lines().enumerate() {
        let at = n + 1;
        if ended.is_some() {
            return Err(format!("line {at} comes after the closing line"));
        }
        let value: Value =
            serde_json::from_str(line).map_err(|e| format!("line {at} is not JSON: {e}"))?;
        match (n, value["kind"].as_str()) {
            (0, Some("header")) => {
                if value["format"] != ARCHIVE_FORMAT {
                    return Err(format!(
                        "format {}; this build reads {ARCHIVE_FORMAT}",
                        value["format"]
                    ));
                }
                check.contents = value["contents"].as_str().unwrap_or_default().to_string();
            }
            (0, _) => return Err("line 1 is not a segment's header".into()),
            (_, Some("workflow")) => {
                let id = value["workflow_id"].as_str().unwrap_or_default();
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
                let rows = value["audit_trail"].as_array().cloned().unwrap_or_default();
                for row in &rows {
                    check_row(row, &receipt)
                        .map_err(|e| format!("line {at}: workflow {id}: {e}"))?;
                }
                check.workflows += 1;
                check.events += receipt.events.len();
                check.audit_rows += rows.len();
            }
            (_, Some("agent_metrics")) => check.metric_rows += 1,
            (_, Some("end")) => ended = Some(value),
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

    #[test]
    fn a_cut_or_padded_segment_is_refused() {
        let dir = std::env::temp_dir().join(format!("retention-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let header =
            json!({ "kind": "header", "format": ARCHIVE_FORMAT, "contents": "agent_metrics" });
        let row = json!({ "kind": "agent_metrics", "row": { "agent": "sena" } });
        let end = json!({ "kind": "end", "workflows": 0, "audit_rows": 0, "metric_rows": 1 });
        let whole = write_segment(
            &dir,
            "whole.jsonl",
            &[header.clone(), row.clone(), end.clone()],
        )
        .unwrap();
        let checked = verify_segment(&whole, "unused").unwrap();
        assert_eq!(
            (checked.metric_rows, checked.contents.as_str()),
            (1, "agent_metrics")
        );
        let cut = write_segment(&dir, "cut.jsonl", &[header.clone(), row.clone()]).unwrap();
        assert!(verify_segment(&cut, "unused")
            .unwrap_err()
            .contains("cut short"));
        let padded = write_segment(&dir, "padded.jsonl", &[header, row.clone(), row, end]).unwrap();
        assert!(verify_segment(&padded, "unused")
            .unwrap_err()
            .contains("closing line counts"));
        assert!(
            write_segment(&dir, "whole.jsonl", &[]).is_err(),
            "never overwritten"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
