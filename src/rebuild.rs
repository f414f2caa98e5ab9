//! `agentledger rebuild`: replays projections from position 0 into fresh
//! tables and swaps them in while the live ones keep serving, with a
//! progress bar (events/s, ETA).

use std::sync::Arc;

use agentledger_eventstore::{PostgresEventStore, PostgresOptions};
use agentledger_projections::postgres::rebuild::{rebuild, RebuildReport};
use agentledger_projections::PROJECTIONS;
use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};

use crate::DatabaseArgs;

#[derive(clap::Args)]
pub struct RebuildArgs {
    /// Projections to rebuild: workflow_status, audit_trail, agent_metrics.
    names: Vec<String>,
    /// Rebuild every projection.
    #[arg(long, conflicts_with = "names")]
    all: bool,
    #[command(flatten)]
    database: DatabaseArgs,
}

pub async fn run(args: RebuildArgs) -> anyhow::Result<()> {
    let names: Vec<String> = if args.all {
        PROJECTIONS.iter().map(|s| s.to_string()).collect()
    } else {
        args.names.clone()
    };
    if names.is_empty() {
        bail!(
            "name a projection ({}) or pass --all",
            PROJECTIONS.join(", ")
        );
    }
    if let Some(unknown) = names.iter().find(|n| !PROJECTIONS.contains(&n.as_str())) {
        bail!(
            "no projection named {unknown:?}; there are {}",
            PROJECTIONS.join(", ")
        );
    }
    let admin_url = args
        .database
        .admin_url()
        .context("DATABASE_URL (or AGENTLEDGER_ADMIN_DATABASE_URL) is not set")?
        .to_string();
    agentledger_eventstore::migrate::run(&admin_url)
        .await
        .context("applying migrations")?;
    let store = PostgresEventStore::connect(&admin_url, PostgresOptions::default()).await?;
    let mut admin = crate::bench::connect(&admin_url).await?;
    for name in names {
        let report = rebuild_one(&mut admin, &store, &name).await?;
        println!(
            "{}: {} events up to position {} in {:.1} s ({:.0} events/s), swapped in",
            report.name,
            report.events,
            report.position,
            report.seconds,
            report.events as f64 / report.seconds.max(1e-9)
        );
    }
    Ok(())
}

/// Rebuilds and swaps `name`, showing progress on stderr.
pub async fn rebuild_one(
    admin: &mut tokio_postgres::Client,
    store: &PostgresEventStore,
    name: &str,
) -> anyhow::Result<RebuildReport> {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix:>16} [{bar:30}] {pos}/{len} events, {per_sec}, ETA {eta}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    bar.set_prefix(name.to_string());
    let report = rebuild(
        admin,
        Arc::new(store.clone()),
        name,
        true,
        |position, head| {
            bar.set_length(head);
            bar.set_position(position);
        },
    )
    .await
    .with_context(|| format!("rebuilding {name}"))?;
    bar.finish_and_clear();
    Ok(report)
}
