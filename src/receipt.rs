//! `agentledger receipt`: one file with a workflow's events, their
//! inclusion proofs and a signed checkpoint of the ledger's tree, which
//! `agentledger verify --receipt FILE` checks with no database.

use agentledger_eventstore::postgres::PostgresTiles;
use agentledger_eventstore::signing::PostgresLedgerKeys;
use agentledger_eventstore::{PostgresEventStore, PostgresOptions};
use anyhow::Context;
use uuid::Uuid;

use crate::DatabaseArgs;

#[derive(clap::Args)]
pub struct ReceiptArgs {
    /// The workflow.
    #[arg(long)]
    workflow: Uuid,
    /// Write here (not overwritten) instead of standard output.
    #[arg(long)]
    output: Option<std::path::PathBuf>,
    /// The checkpoint's origin, as `serve` signs them (`[server]
    /// checkpoint_origin`).
    #[arg(long, env = "AGENTLEDGER_CHECKPOINT_ORIGIN", default_value = agentledger_api::DEFAULT_ORIGIN)]
    checkpoint_origin: String,
    #[command(flatten)]
    database: DatabaseArgs,
}

pub async fn run(args: ReceiptArgs) -> anyhow::Result<()> {
    agentledger_eventstore::checkpoint::check_origin(&args.checkpoint_origin)?;
    // Signing reads the key's secret half: the owner role's to read.
    let url = args
        .database
        .admin_url()
        .context("AGENTLEDGER_ADMIN_DATABASE_URL or DATABASE_URL is not set")?;
    let store = PostgresEventStore::connect(url, PostgresOptions::default()).await?;
    let receipt = agentledger_eventstore::receipt::build(
        &store,
        &PostgresTiles::new(store.pool().clone()),
        &PostgresLedgerKeys::new(store.pool().clone()),
        &args.checkpoint_origin,
        &agentledger_agents::stream_of(args.workflow),
    )
    .await?;
    let json = serde_json::to_string_pretty(&receipt)? + "\n";
    match &args.output {
        Some(path) => {
            use std::io::Write;
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
                .with_context(|| format!("creating {}", path.display()))?;
            file.write_all(json.as_bytes())?;
            file.sync_all()?;
            eprintln!(
                "receipt of workflow {} ({} events): {}; check it with `agentledger verify \
                 --receipt {} --public-key '{}'`",
                args.workflow,
                receipt.events.len(),
                path.display(),
                path.display(),
                receipt.verifier_key
            );
        }
        None => print!("{json}"),
    }
    Ok(())
}
