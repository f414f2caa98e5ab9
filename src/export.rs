//! `agentledger export`: the audit trail of a workflow or a time range, with
//! hashes, for a reviewer to keep and check offline. JSONL lines carry the
//! stored event whole (so `agentledger verify --export FILE` can recompute
//! every hash without the database) beside its reading in a reviewer's
//! words; CSV carries the reading and the hashes, for spreadsheets.

use std::io::Write;

use agentledger_domain::workflow::read_column;
use agentledger_eventstore::{EventStore, PostgresEventStore, PostgresOptions, RecordedEvent};
use agentledger_projections::model::audit::AuditEntry;
use agentledger_projections::model::Fact;
use anyhow::{bail, Context};
use chrono::{DateTime, Utc};
use clap::ValueEnum;
use serde_json::json;
use uuid::Uuid;

use crate::DatabaseArgs;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Jsonl,
    Csv,
}

#[derive(clap::Args)]
pub struct ExportArgs {
    /// One workflow's events.
    #[arg(long, conflicts_with_all = ["from", "to"])]
    workflow: Option<Uuid>,
    /// Events recorded at or after this time (RFC 3339).
    #[arg(long)]
    from: Option<DateTime<Utc>>,
    /// Events recorded before this time (RFC 3339).
    #[arg(long)]
    to: Option<DateTime<Utc>>,
    #[arg(long, value_enum, default_value = "jsonl")]
    format: Format,
    /// Write here instead of standard output.
    #[arg(long)]
    output: Option<std::path::PathBuf>,
    #[command(flatten)]
    database: DatabaseArgs,
}

pub async fn run(args: ExportArgs) -> anyhow::Result<()> {
    if args.workflow.is_none() && args.from.is_none() && args.to.is_none() {
        bail!("choose what to export: --workflow ID, or --from and/or --to");
    }
    let url = args
        .database
        .database_url
        .as_deref()
        .context("DATABASE_URL is not set")?;
    let store = PostgresEventStore::connect(url, PostgresOptions::default()).await?;
    let mut out: Box<dyn Write> = match &args.output {
        Some(path) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    if args.format == Format::Csv {
        writeln!(out, "position,workflow_id,version,event_type,kind,actor_kind,actor,actor_version,role,summary,rationale,policy_fingerprint,recorded_at,prev_hash,hash")?;
    }
    let mut written = 0u64;
    let mut skipped = 0u64;
    let mut emit = |event: &RecordedEvent| -> anyhow::Result<()> {
        match args.format {
            Format::Jsonl => {
                writeln!(
                    out,
                    "{}",
                    json!({ "event": event, "audit": reading(event)? })
                )?;
            }
            Format::Csv => {
                let Some(e) = Fact::decode(event)?.map(|fact| AuditEntry::of(&fact)) else {
                    // e.g. the privacy-keys stream: JSONL carries those.
                    skipped += 1;
                    return Ok(());
                };
                let fields = [
                    e.position.to_string(),
                    e.workflow_id.to_string(),
                    e.version.to_string(),
                    e.event_type,
                    e.kind,
                    e.actor_kind,
                    e.actor,
                    e.actor_version,
                    e.role.map(|r| r.as_str().to_string()).unwrap_or_default(),
                    e.summary,
                    shown(&e.rationale),
                    e.policy_fingerprint.unwrap_or_default(),
                    e.recorded_at.to_rfc3339(),
                    hex::encode(event.prev_hash),
                    e.hash,
                ];
                let quoted: Vec<String> = fields.iter().map(|f| csv_field(f)).collect();
                writeln!(out, "{}", quoted.join(","))?;
            }
        }
        written += 1;
        Ok(())
    };
    match args.workflow {
        Some(id) => {
            let events = store
                .read_stream(&agentledger_agents::stream_of(id), 0, 1_000_000)
                .await?;
            if events.is_empty() {
                bail!("no workflow {id} in the ledger");
            }
            events.iter().try_for_each(&mut emit)?;
        }
        None => {
            // In position order, in pages; the time range is checked per event.
            let head = store.head_position().await?;
            let mut from = 1;
            while from <= head {
                let page = store.read_all(from, 10_000).await?;
                let Some(last) = page.last().map(|e| e.global_position) else {
                    break;
                };
                for event in &page {
                    let inside = args.from.is_none_or(|f| event.recorded_at >= f)
                        && args.to.is_none_or(|t| event.recorded_at < t);
                    if inside && event.global_position <= head {
                        emit(event)?;
                    }
                }
                from = last + 1;
            }
        }
    }
    out.flush()?;
    eprintln!("{written} events exported");
    if skipped > 0 {
        eprintln!(
            "{skipped} events of other streams than workflows left out of the CSV (JSONL has them)"
        );
    }
    Ok(())
}

/// The reviewer's reading of `event`, as exported beside it.
fn reading(event: &RecordedEvent) -> anyhow::Result<Option<serde_json::Value>> {
    Ok(Fact::decode(event)?.map(|fact| {
        let e = AuditEntry::of(&fact);
        json!({
            "workflow_id": e.workflow_id, "kind": e.kind, "actor_kind": e.actor_kind,
            "actor": e.actor, "actor_version": e.actor_version,
            "role": e.role.map(|r| r.as_str()), "summary": e.summary,
            "rationale": shown(&e.rationale), "policy_fingerprint": e.policy_fingerprint,
        })
    }))
}

/// A rationale as exported: personal text stays sealed (`[sealed]` here,
/// ciphertext in the exported event), so that forgetting the subject
/// reaches exports too.
fn shown(column: &str) -> String {
    let (separator, texts) = read_column(column);
    let shown: Vec<&str> = texts.iter().map(|t| t.as_str()).collect();
    shown.join(&separator)
}

/// Verifies an exported JSONL file without the database: every event's
/// hash chain (see `ExcerptVerifier`), and every reading beside an event
/// against the reading derived from it again (the readings are not hashed;
/// they must follow from what is).
pub fn verify_file(path: &std::path::Path) -> anyhow::Result<agentledger_eventstore::Verification> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut verifier = agentledger_eventstore::ExcerptVerifier::new();
    let mut misread: Option<u64> = None;
    for (n, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let value: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("line {}: not JSON", n + 1))?;
        let event: RecordedEvent = serde_json::from_value(value["event"].clone())
            .with_context(|| format!("line {}: not an exported event", n + 1))?;
        verifier.check(&event);
        let derived = reading(&event)
            .ok()
            .flatten()
            .unwrap_or(serde_json::Value::Null);
        if misread.is_none() && derived != value["audit"] {
            misread = Some(event.global_position);
        }
    }
    let mut verification = verifier.finish();
    if let Some(position) = misread {
        if verification
            .first_broken_position
            .is_none_or(|p| position < p)
        {
            verification.ok = false;
            verification.first_broken_position = Some(position);
            verification.reason =
                Some("the reading beside the event does not follow from it".into());
        }
    }
    Ok(verification)
}

/// A CSV field, quoted (RFC 4180).
pub(crate) fn csv_field(text: &str) -> String {
    format!("\"{}\"", text.replace('"', "\"\""))
}
