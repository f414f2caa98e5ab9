//! The `agentledger` command: runs the service and the operational verbs.

mod bench;
mod demo;
mod rebuild;

use std::net::SocketAddr;

use agentledger_eventstore::{
    migrate, EventStore, InMemoryEventStore, PostgresEventStore, PostgresOptions,
};
use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use tokio::net::TcpListener;

#[derive(Parser)]
#[command(
    version,
    about = "Multi-agent workflows where every decision is an immutable, hash-chained event"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service. Without DATABASE_URL it keeps everything in memory (dev mode).
    Serve(ServeArgs),
    /// Apply pending database migrations and exit.
    Migrate(DatabaseArgs),
    /// Replay projections from position 0 into fresh tables and swap them in.
    Rebuild(rebuild::RebuildArgs),
    /// Run a few varied requests end to end in memory and show each stage live.
    Demo(demo::DemoArgs),
    /// Measure the service against the database (see docs/performance.md).
    #[command(subcommand)]
    Bench(bench::Bench),
}

#[derive(clap::Args)]
struct DatabaseArgs {
    /// The service's database (its least-privileged role).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// The owner role for migrations; defaults to DATABASE_URL.
    #[arg(long, env = "AGENTLEDGER_ADMIN_DATABASE_URL", hide_env_values = true)]
    admin_database_url: Option<String>,
}

impl DatabaseArgs {
    fn admin_url(&self) -> Option<&str> {
        self.admin_database_url
            .as_deref()
            .or(self.database_url.as_deref())
    }
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Profile {
    Dev,
    Test,
    Staging,
    Prod,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "AGENTLEDGER_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Configuration profile.
    #[arg(long, env = "AGENTLEDGER_PROFILE", value_enum, default_value = "dev")]
    profile: Profile,
    /// Let the dev profile listen on a non-loopback address (it has no authentication).
    #[arg(long)]
    allow_non_loopback_dev: bool,
    #[command(flatten)]
    database: DatabaseArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging();
    match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Migrate(args) => {
            let url = args
                .admin_url()
                .context("DATABASE_URL (or AGENTLEDGER_ADMIN_DATABASE_URL) is not set")?;
            let applied = migrate::run(url).await?;
            println!(
                "{} migration(s) applied{}",
                applied.len(),
                if applied.is_empty() { "" } else { ":" }
            );
            applied.iter().for_each(|m| println!("  {m}"));
            Ok(())
        }
        Command::Demo(args) => demo::run(args).await,
        Command::Rebuild(args) => rebuild::run(args).await,
        Command::Bench(bench) => bench.run().await,
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var("AGENTLEDGER_LOG_FORMAT").as_deref() == Ok("json") {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let profile = args
        .profile
        .to_possible_value()
        .expect("no skipped variants")
        .get_name()
        .to_string();
    if args.profile == Profile::Dev && !args.listen.ip().is_loopback() {
        if !args.allow_non_loopback_dev {
            bail!(
                "the dev profile has no authentication and will not listen on {}; \
                 use a loopback address, another profile, or --allow-non-loopback-dev",
                args.listen
            );
        }
        tracing::warn!(listen = %args.listen, "dev profile listening on a non-loopback address WITHOUT authentication");
    }
    let (store, store_kind): (std::sync::Arc<dyn EventStore>, _) = match &args.database.database_url
    {
        Some(url) => {
            let admin = args.database.admin_url().expect("DATABASE_URL is set");
            let applied = migrate::run(admin).await.context("applying migrations")?;
            tracing::info!(applied = applied.len(), "database migrated");
            let store = PostgresEventStore::connect(url, PostgresOptions::default()).await?;
            (std::sync::Arc::new(store), "postgres")
        }
        None => {
            tracing::warn!(
                "DATABASE_URL is not set: running on the IN-MEMORY event store (dev mode). \
                 Nothing is kept when this process stops."
            );
            (
                std::sync::Arc::new(InMemoryEventStore::default()),
                "in-memory",
            )
        }
    };
    tracing::info!(head = store.head_position().await?, "event store ready");

    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let local = listener.local_addr()?;
    // Tests and scripts that pass port 0 read the chosen address from this line.
    println!("listening on http://{local}");
    tracing::info!(%local, store = store_kind, profile = %profile, "agentledger serving");
    let router = agentledger_api::router(agentledger_api::ServiceInfo {
        store: store_kind,
        profile,
    });
    agentledger_api::serve(listener, router, shutdown_signal()).await?;
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate => {}
    }
    tracing::info!("shutting down");
}
