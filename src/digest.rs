//! `agentledger digest`: signs the ledger's tree head at a position and
//! prints it as JSON for a reviewer to keep outside the system (see
//! docs/audit.md); `--keys` lists the deployment's public keys and
//! `--rotate-key` retires the active key.

use agentledger_eventstore::signing::{self, LedgerKeys, PostgresLedgerKeys};
use agentledger_eventstore::{PostgresEventStore, PostgresOptions};
use anyhow::Context;

use crate::DatabaseArgs;

#[derive(clap::Args)]
pub struct DigestArgs {
    /// The last position covered (default: the head).
    #[arg(long)]
    at: Option<u64>,
    /// Write the digest here instead of standard output (not overwritten).
    #[arg(long)]
    output: Option<std::path::PathBuf>,
    /// List the deployment's public keys (JSON) instead.
    #[arg(long, conflicts_with_all = ["at", "output", "rotate_key"])]
    keys: bool,
    /// Retire the active signing key and create a new one; prints the new key.
    #[arg(long, conflicts_with_all = ["at", "output"])]
    rotate_key: bool,
    #[command(flatten)]
    database: DatabaseArgs,
}

pub async fn run(args: DigestArgs) -> anyhow::Result<()> {
    // Signing reads the key's secret half: the owner role's to read.
    let url = args
        .database
        .admin_url()
        .context("AGENTLEDGER_ADMIN_DATABASE_URL or DATABASE_URL is not set")?;
    let store = PostgresEventStore::connect(url, PostgresOptions::default()).await?;
    let keys = PostgresLedgerKeys::new(store.pool().clone());
    if args.keys {
        println!(
            "{}",
            serde_json::to_string_pretty(&keys.public_keys().await?)?
        );
        return Ok(());
    }
    if args.rotate_key {
        println!("{}", serde_json::to_string_pretty(&keys.rotate().await?)?);
        return Ok(());
    }
    let digest = signing::sign_ledger(&store, &keys, args.at).await?;
    let json = serde_json::to_string_pretty(&digest)? + "\n";
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
                "digest of {} events up to position {} signed by {}: {}",
                digest.events,
                digest.position,
                digest.key_id,
                path.display()
            );
        }
        None => print!("{json}"),
    }
    Ok(())
}
