//! `agentledger verify`: recomputes hash chains from what is stored and
//! names the first event that does not match. Exits non-zero when broken.

use agentledger_eventstore::{EventStore, PostgresEventStore, PostgresOptions, Verification};
use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use uuid::Uuid;

use crate::DatabaseArgs;

#[derive(clap::Args)]
pub struct VerifyArgs {
    /// Verify one workflow's stream instead of the whole ledger.
    #[arg(long, conflicts_with = "export")]
    workflow: Option<Uuid>,
    /// Verify an exported JSONL file, without the database.
    #[arg(long)]
    export: Option<std::path::PathBuf>,
    #[command(flatten)]
    database: DatabaseArgs,
}

pub async fn run(args: VerifyArgs) -> anyhow::Result<()> {
    if let Some(path) = &args.export {
        let verification = crate::export::verify_file(path)?;
        return report(&path.display().to_string(), &verification);
    }
    let url = args
        .database
        .database_url
        .as_deref()
        .context("DATABASE_URL is not set")?;
    let store = PostgresEventStore::connect(url, PostgresOptions::default()).await?;
    let (what, verification) = match args.workflow {
        Some(id) => {
            let verification = store
                .verify_stream(&agentledger_agents::stream_of(id))
                .await?;
            if verification.checked_events == 0 {
                bail!("no workflow {id} in the ledger");
            }
            (format!("workflow {id}"), verification)
        }
        None => {
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template(
                    "verifying [{bar:30}] {pos}/{len} events, {per_sec}, ETA {eta}",
                )
                .expect("a valid template")
                .progress_chars("=> "),
            );
            let verification = agentledger_eventstore::verify_ledger(&store, |position, head| {
                bar.set_length(head);
                bar.set_position(position);
            })
            .await?;
            bar.finish_and_clear();
            ("the ledger".to_string(), verification)
        }
    };
    report(&what, &verification)
}

fn report(what: &str, v: &Verification) -> anyhow::Result<()> {
    if v.ok {
        println!("{what}: ok, {} events checked", v.checked_events);
        return Ok(());
    }
    bail!(
        "{what}: BROKEN at position {} ({}); {} events checked",
        v.first_broken_position.unwrap_or_default(),
        v.reason.as_deref().unwrap_or("no reason given"),
        v.checked_events
    )
}
