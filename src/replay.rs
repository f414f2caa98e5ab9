//! `agentledger replay`: a workflow's history, event by event, with the
//! state after each one (the write side's own fold), who recorded it, what
//! it was based on and why. Nothing is re-executed.

use agentledger_eventstore::subject_keys::{PostgresSubjectKeys, SubjectKeys};
use agentledger_eventstore::{EventStore, PostgresEventStore, PostgresOptions};
use agentledger_projections::model::audit::AuditEntry;
use agentledger_projections::model::status::{enum_name, state_name, StatusFold};
use agentledger_projections::model::Fact;
use anyhow::{bail, Context};
use serde_json::json;
use uuid::Uuid;

use crate::DatabaseArgs;

#[derive(clap::Args)]
pub struct ReplayArgs {
    /// The workflow.
    workflow: Uuid,
    /// Stop at the event at this position.
    #[arg(long)]
    at: Option<u64>,
    /// One JSON object per step, for machines.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    database: DatabaseArgs,
}

pub async fn run(args: ReplayArgs) -> anyhow::Result<()> {
    let url = args
        .database
        .database_url
        .as_deref()
        .context("DATABASE_URL is not set")?;
    let store = PostgresEventStore::connect(url, PostgresOptions::default()).await?;
    let events = store
        .read_stream(&agentledger_agents::stream_of(args.workflow), 0, 100_000)
        .await?;
    if events.is_empty() {
        bail!("no workflow {} in the ledger", args.workflow);
    }
    let mut facts = Vec::new();
    for event in events
        .iter()
        .take_while(|e| args.at.is_none_or(|at| e.global_position <= at))
    {
        facts.push(Fact::decode(event)?.context("not a workflow event")?);
    }
    // Personal text opens with the subject's key while it exists.
    let mut wanted: Vec<Uuid> = facts.iter().flat_map(|f| f.event.sealed_keys()).collect();
    wanted.sort_unstable();
    wanted.dedup();
    let secrets = PostgresSubjectKeys::new(store.pool().clone())
        .secrets(&wanted)
        .await?;
    facts.iter_mut().for_each(|f| f.event.open(&secrets));
    let mut fold: Option<StatusFold> = None;
    for (fact, event) in facts.iter().zip(&events) {
        match &mut fold {
            Some(fold) => fold.apply(fact),
            None => fold = Some(StatusFold::start(fact)),
        }
        let status = fold.as_ref().expect("set above").status();
        let entry = AuditEntry::of(fact);
        if args.json {
            println!(
                "{}",
                json!({
                    "position": event.global_position,
                    "version": event.stream_version,
                    "type": event.event_type,
                    "recorded_at": event.recorded_at,
                    "actor": entry.actor,
                    "actor_kind": entry.actor_kind,
                    "role": entry.role.map(|r| r.as_str()),
                    "policy_fingerprint": entry.policy_fingerprint,
                    "inputs": fact.metadata.inputs,
                    "summary": entry.summary,
                    "rationale": entry.rationale,
                    "hash": entry.hash,
                    "state": {
                        "state": state_name(status.state),
                        "priority": enum_name(&status.priority),
                        "progress": {"done": status.progress_done, "total": status.progress_total},
                        "subtasks": status.subtasks.iter().map(|s| json!({"id": s.id, "state": enum_name(&s.state), "attempts": s.attempts})).collect::<Vec<_>>(),
                    },
                })
            );
        } else {
            println!(
                "{:>8}  {}  {:<10} {:<15} → {}",
                event.global_position,
                event.recorded_at.format("%Y-%m-%d %H:%M:%S%.3f"),
                entry.actor,
                entry.kind,
                state_name(status.state),
            );
            println!("          {}", entry.summary);
            if !entry.rationale.is_empty() && entry.rationale != entry.summary {
                println!("          why: {}", entry.rationale);
            }
            if !fact.metadata.inputs.is_empty() {
                let inputs: Vec<String> =
                    fact.metadata.inputs.iter().map(|p| p.to_string()).collect();
                println!("          based on positions {}", inputs.join(", "));
            }
        }
    }
    Ok(())
}
