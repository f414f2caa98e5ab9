//! The `agentledger` command: runs the service and the operational verbs.

mod apikey;
mod bench;
mod config;
mod demo;
mod digest;
mod export;
mod prove;
mod rebuild;
mod receipt;
mod replay;
mod retention;
mod telemetry;
mod verify;
mod witness;
mod witnessing;

use std::net::SocketAddr;

use std::sync::Arc;

use agentledger_agents::{
    InMemoryWorkQueue, PostgresWorkQueue, Runtime, SystemClock, ToolRegistry,
};
use agentledger_eventstore::api_keys::{ApiKeys, InMemoryApiKeys, PostgresApiKeys};
use agentledger_eventstore::signing::{InMemoryLedgerKeys, LedgerKeys, PostgresLedgerKeys};
use agentledger_eventstore::subject_keys::{InMemorySubjectKeys, PostgresSubjectKeys, SubjectKeys};
use agentledger_eventstore::{
    migrate, EventStore, InMemoryEventStore, PostgresEventStore, PostgresOptions,
};
use agentledger_projections::postgres::runner::{Checkpoints, ProjectionRunner, RunnerConfig};
use agentledger_projections::{InMemoryReadModels, PostgresReadModels};
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
    /// Run the service. Without DATABASE_URL it keeps the ledger in --data-dir, or nothing (dev mode).
    Serve(ServeArgs),
    /// Create, list and revoke API keys (owner role: works without a running server).
    #[command(subcommand)]
    Apikey(apikey::ApikeyCommand),
    /// Apply pending database migrations and exit.
    Migrate(DatabaseArgs),
    /// Print the GraphQL schema (SDL).
    Schema,
    /// Write the audit trail with hashes (JSONL or CSV) for offline review.
    Export(export::ExportArgs),
    /// A workflow's history, event by event, with the state after each.
    Replay(replay::ReplayArgs),
    /// Recompute the hash chains of the ledger (or of one workflow), or check a digest.
    Verify(verify::VerifyArgs),
    /// Sign the ledger's tree head at a position (JSON to keep outside the system).
    Digest(digest::DigestArgs),
    /// Prove an event is in the ledger's tree, or that a smaller tree is a
    /// prefix of a larger one (RFC 9162 proofs, JSON).
    Prove(prove::ProveArgs),
    /// Write a workflow's receipt: its events, their inclusion proofs and a
    /// signed checkpoint, checkable with no database (`verify --receipt`).
    Receipt(receipt::ReceiptArgs),
    /// Archive read-model rows past the retention window (JSONL segments
    /// with receipts) and prune them; the ledger is never pruned.
    Retain(retention::RetainArgs),
    /// Run a C2SP witness: cosign a log's checkpoints only as extensions of
    /// the last one cosigned, and refuse a rewritten history.
    Witness(witness::WitnessArgs),
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
    /// A TOML configuration file (see the `config` module docs for its keys).
    #[arg(long, env = "AGENTLEDGER_CONFIG")]
    config: Option<std::path::PathBuf>,
    /// `/ready` fails when a projection lags more events than this (default: no bound).
    #[arg(long, env = "AGENTLEDGER_READY_MAX_LAG")]
    ready_max_lag: Option<u64>,
    /// Workflows this process drives at once.
    #[arg(long, env = "AGENTLEDGER_MAX_WORKFLOWS")]
    max_workflows: Option<usize>,
    /// Without DATABASE_URL: keep the ledger (events and keys) in an embedded
    /// SQLite file in this directory, so that it survives restarts. Read
    /// models and the task queue are rebuilt from it at start.
    #[arg(long, env = "AGENTLEDGER_DATA_DIR")]
    data_dir: Option<std::path::PathBuf>,
    /// The origin line of the ledger's checkpoints (`GET /checkpoint`), also
    /// their key's name: a schema-less URL naming this ledger, such as
    /// `ledger.example.com/agentledger` (default: `[server]
    /// checkpoint_origin`, else `localhost/agentledger`).
    #[arg(long, env = "AGENTLEDGER_CHECKPOINT_ORIGIN")]
    checkpoint_origin: Option<String>,
    #[command(flatten)]
    database: DatabaseArgs,
}

/// The service builds and drops many small JSON nodes on several threads;
/// glibc's allocator spent a quarter of `verify`'s time there (perf), and
/// mimalloc handles cross-thread frees far better (docs/performance.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let json_by_default = matches!(
        &cli.command,
        Command::Serve(args) if matches!(args.profile, Profile::Staging | Profile::Prod)
    );
    let serving = matches!(&cli.command, Command::Serve(_));
    let telemetry = init_logging(json_by_default, serving)?;
    let result = run(cli.command).await;
    if let Some(telemetry) = telemetry {
        // Exports what the batch holds; blocking, so off the runtime's threads.
        let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    }
    result
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
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
        Command::Schema => {
            print!("{}", agentledger_api::sdl());
            Ok(())
        }
        Command::Apikey(command) => command.run().await,
        Command::Verify(args) => verify::run(args).await,
        Command::Digest(args) => digest::run(args).await,
        Command::Prove(args) => prove::run(args).await,
        Command::Receipt(args) => receipt::run(args).await,
        Command::Witness(args) => witness::run(args).await,
        Command::Retain(args) => retention::run(args).await,
        Command::Replay(args) => replay::run(args).await,
        Command::Export(args) => export::run(args).await,
        Command::Demo(args) => demo::run(args).await,
        Command::Rebuild(args) => rebuild::run(args).await,
        Command::Bench(bench) => bench.run().await,
    }
}

/// Text logs for people, JSON for machines: `AGENTLEDGER_LOG_FORMAT=json|text`
/// decides; otherwise JSON in the staging and prod profiles. `RUST_LOG`
/// filters the logs only. With `traces` (serve), OpenTelemetry traces go
/// out over OTLP where the standard variables ask for them (`telemetry`).
fn init_logging(
    json_by_default: bool,
    traces: bool,
) -> anyhow::Result<Option<telemetry::Telemetry>> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{Layer, Registry};
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let json = match std::env::var("AGENTLEDGER_LOG_FORMAT").as_deref() {
        Ok("json") => true,
        Ok("text") => false,
        _ => json_by_default,
    };
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let mut layers: Vec<Box<dyn Layer<Registry> + Send + Sync>> = vec![if json {
        logs.json()
            .with_current_span(true)
            .with_filter(filter)
            .boxed()
    } else {
        logs.with_filter(filter).boxed()
    }];
    let mut exporting = None;
    if traces {
        if let Some((telemetry, layer)) = telemetry::from_env::<Registry>()? {
            layers.push(layer);
            exporting = Some(telemetry);
        }
    }
    tracing_subscriber::registry().with(layers).init();
    Ok(exporting)
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let profile = args
        .profile
        .to_possible_value()
        .expect("no skipped variants")
        .get_name()
        .to_string();
    let dev = args.profile == Profile::Dev;
    let hardened = matches!(args.profile, Profile::Staging | Profile::Prod);
    if dev && !args.listen.ip().is_loopback() {
        if !args.allow_non_loopback_dev {
            bail!(
                "the dev profile has no authentication and will not listen on {}; \
                 use a loopback address, another profile, or --allow-non-loopback-dev",
                args.listen
            );
        }
        tracing::warn!(listen = %args.listen, "dev profile listening on a non-loopback address WITHOUT authentication");
    }
    if matches!(args.profile, Profile::Staging | Profile::Prod)
        && args.database.database_url.is_none()
    {
        bail!(
            "the {profile} profile keeps its ledger in PostgreSQL: set DATABASE_URL \
             (the in-memory store is for the dev and test profiles)"
        );
    }
    if let (Some(dir), Some(_)) = (&args.data_dir, &args.database.database_url) {
        bail!(
            "both DATABASE_URL and --data-dir {} are set: the ledger lives in one place; \
             unset one of them",
            dir.display()
        );
    }
    if hardened && args.database.admin_database_url.is_none() {
        bail!(
            "the {profile} profile runs as the least-privileged service role: set \
             AGENTLEDGER_ADMIN_DATABASE_URL (the owner role) for migrations, and DATABASE_URL to \
             the service role"
        );
    }
    let file = match &args.config {
        Some(path) => config::FileConfig::load(path)?,
        None => config::FileConfig::default(),
    };
    let auth_section = file.auth.clone().with_env()?;
    let checkpoint_origin = args
        .checkpoint_origin
        .clone()
        .or_else(|| file.server.checkpoint_origin.clone())
        .unwrap_or_else(|| agentledger_api::DEFAULT_ORIGIN.to_string());
    agentledger_eventstore::checkpoint::check_origin(&checkpoint_origin)?;
    let witnessing = file.witness.witnessing()?;
    let retention = file.retention.policy()?;
    if retention.is_some() && args.database.database_url.is_none() {
        bail!(
            "[retention] archives and prunes PostgreSQL's read models: it needs DATABASE_URL \
             (the dev stores keep their read models in memory)"
        );
    }
    let auth_config = auth_section.config(hardened, dev)?;
    // Read before anything is written: a bad [llm] stops the start here.
    let mut runtime_config = file.runtime(args.max_workflows)?;
    // The projection runner and the agent runtime report restarts and
    // problems here; /ready and /metrics read it.
    let health = agentledger_eventstore::health::Health::default();
    runtime_config.health = health.clone();
    if hardened && auth_config.mode == agentledger_api::auth::Mode::Off {
        bail!(
            "the {profile} profile will not serve with authentication off ([auth] mode = \"off\")"
        );
    }
    let stop = tokio_util::sync::CancellationToken::new();
    let mut background = Vec::new();
    // The read models' database, for retention.
    let mut read_model_pool = None;
    let Backend {
        store,
        queue,
        read_models,
        ledger_keys,
        subject_keys,
        api_keys,
        tree,
        kind: store_kind,
    } = match &args.database.database_url {
        Some(url) => {
            let admin = args.database.admin_url().expect("DATABASE_URL is set");
            let applied = migrate::run(admin).await.context("applying migrations")?;
            tracing::info!(applied = applied.len(), "database migrated");
            let options = PostgresOptions {
                statement_timeout: Some(std::time::Duration::from_secs(30)),
                ..PostgresOptions::default()
            };
            for (name, url) in [
                ("DATABASE_URL", url.as_str()),
                ("admin database URL", admin),
            ] {
                report_database_tls(name, url, hardened)?;
            }
            let store = PostgresEventStore::connect(url, options).await?;
            if !dev {
                refuse_privileged_role(&store).await?;
            }
            let checkpoints = Checkpoints::default();
            background.push(tokio::spawn(
                checkpoints
                    .clone()
                    .follow_store(store.clone(), stop.clone()),
            ));
            // One runner for the three read models: a batch of events is
            // one transaction and one checkpoint announcement, not three.
            let runner = ProjectionRunner::spawn(
                &agentledger_projections::PROJECTIONS,
                url.clone(),
                Arc::new(store.clone()),
                checkpoints.clone(),
                RunnerConfig {
                    health: health.clone(),
                    ..RunnerConfig::default()
                },
                None,
            )?;
            let stopping = stop.clone();
            background.push(tokio::spawn(async move {
                stopping.cancelled().await;
                runner.stop().await;
            }));
            let models = PostgresReadModels::new(store.pool().clone(), &checkpoints);
            read_model_pool = Some(store.pool().clone());
            let queue = Arc::new(PostgresWorkQueue::new(store.pool().clone()));
            // Signing needs the owner role: the service role may not read
            // the secret half of the key (migration V6).
            let signer = agentledger_eventstore::postgres::pool(admin, 2)?;
            Backend {
                ledger_keys: Arc::new(PostgresLedgerKeys::with_signer(
                    store.pool().clone(),
                    signer,
                )),
                subject_keys: Arc::new(PostgresSubjectKeys::new(store.pool().clone())),
                api_keys: Arc::new(PostgresApiKeys::new(store.pool().clone())),
                tree: Arc::new(agentledger_eventstore::postgres::PostgresTiles::new(
                    store.pool().clone(),
                )),
                store: Arc::new(store),
                queue,
                read_models: Arc::new(models),
                kind: "postgres",
            }
        }
        None => match &args.data_dir {
            Some(dir) => embedded_backend(dir)?,
            None => {
                tracing::warn!(
                    "DATABASE_URL is not set: running on the IN-MEMORY event store (dev mode). \
                     Nothing is kept when this process stops (--data-dir DIR keeps the ledger)."
                );
                let store: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::default());
                let models = InMemoryReadModels::start(store.clone());
                Backend {
                    store,
                    queue: Arc::new(InMemoryWorkQueue::default()),
                    read_models: Arc::new(models),
                    ledger_keys: Arc::new(InMemoryLedgerKeys::default()),
                    subject_keys: Arc::new(InMemorySubjectKeys::default()),
                    api_keys: Arc::new(InMemoryApiKeys::default()),
                    tree: Arc::new(agentledger_eventstore::tlog::MemoryTiles::default()),
                    kind: "in-memory",
                }
            }
        },
    };
    tracing::info!(head = store.head_position().await?, "event store ready");
    // The ledger's tree follows the ledger: proofs and checkpoints read it.
    background.push(tokio::spawn(agentledger_eventstore::tlog::maintain(
        store.clone(),
        tree.clone(),
        stop.clone(),
    )));
    if store_kind != "postgres" {
        // The tree of the dev stores is rebuilt in memory at each start:
        // until it reaches the head, a checkpoint would look like a
        // ledger that lost events.
        let head = store.head_position().await?;
        while tree.size_at(head).await?.is_none() {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
    let witnesses = agentledger_api::WitnessStatus::default();
    if let Some(witnessing) = witnessing {
        tracing::info!(witnesses = ?witnessing.urls, "checkpoints are pushed to witnesses");
        background.push(tokio::spawn(witnessing::push(
            witnessing,
            tree.clone(),
            ledger_keys.clone(),
            checkpoint_origin.clone(),
            witnesses.clone(),
            stop.clone(),
        )));
    }
    if let (Some(policy), Some(pool)) = (retention, read_model_pool) {
        tracing::info!(
            archive_dir = %policy.archive_dir.display(),
            window_days = policy.window_days,
            "read-model rows past the window are archived and pruned"
        );
        background.push(tokio::spawn(retention::schedule(
            policy,
            pool,
            store.clone(),
            tree.clone(),
            ledger_keys.clone(),
            checkpoint_origin.clone(),
            stop.clone(),
        )));
    }
    let auth = authenticator(auth_config, api_keys, hardened).await?;
    // The digest signing key exists from the first start on, so that
    // /.well-known/agentledger-key always has one to publish.
    let (key_id, _) = ledger_keys
        .active()
        .await
        .context("the ledger signing key")?;
    tracing::info!(%key_id, "ledger digests are signed with this key");
    let runtime = Runtime::new(
        store.clone(),
        queue,
        ToolRegistry::default(),
        Arc::new(SystemClock),
        runtime_config,
    )
    .with_subject_keys(subject_keys);
    if store_kind == "embedded" {
        // The queue is in memory: workflows that were waiting for an agent
        // when the last process stopped are queued again.
        let resumed = runtime
            .resume_unfinished()
            .await
            .context("resuming the unfinished workflows of the data directory")?;
        tracing::info!(resumed, "unfinished workflows queued again");
    }
    {
        let (runtime, stop) = (runtime.clone(), stop.clone());
        background.push(tokio::spawn(async move {
            runtime.run(stop.cancelled_owned()).await
        }));
    }

    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let local = listener.local_addr()?;
    // Tests and scripts that pass port 0 read the chosen address from this line.
    println!("listening on http://{local}");
    tracing::info!(%local, store = store_kind, profile = %profile, "agentledger serving");
    let router = agentledger_api::router(
        agentledger_api::ServiceInfo {
            store: store_kind,
            profile,
        },
        agentledger_api::Services {
            runtime,
            store,
            read_models,
            limits: file.limits(args.profile == Profile::Prod),
            ledger_keys,
            shutdown: stop.clone(),
            open_subscriptions: Arc::default(),
            auth,
            ledger_work: Arc::new(tokio::sync::Semaphore::new(1)),
            transparency: agentledger_api::Transparency {
                tree,
                origin: checkpoint_origin,
                witnesses,
                signed: Arc::default(),
            },
        },
        agentledger_api::HttpConfig {
            console_oidc: auth_section.console_oidc(),
            ..file.http(args.ready_max_lag, dev)
        },
    );
    let stopping = stop.clone();
    agentledger_api::serve(listener, router, file.connections(), async move {
        shutdown_signal().await;
        stopping.cancel();
    })
    .await?;
    stop.cancel();
    for task in background {
        let _ = task.await;
    }
    tracing::info!("stopped");
    Ok(())
}

/// Says how the connection to the database is protected, and warns in
/// staging and prod when it crosses a network without a verified
/// certificate (see `DatabaseUrl` for the `sslmode` values).
fn report_database_tls(name: &str, url: &str, hardened: bool) -> anyhow::Result<()> {
    use agentledger_eventstore::postgres::{DatabaseUrl, TlsMode};
    use tokio_postgres::config::Host;
    let parsed = DatabaseUrl::parse(url).with_context(|| format!("{name} cannot be used"))?;
    let mode = parsed.tls_mode();
    let local = parsed.config().get_hosts().iter().all(|host| match host {
        Host::Unix(_) => true,
        Host::Tcp(h) => {
            h == "localhost"
                || h.parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
    });
    tracing::info!(database = name, sslmode = %mode, "database connection");
    if hardened && !local && mode != TlsMode::VerifyFull {
        tracing::warn!(
            database = name,
            sslmode = %mode,
            "the database is reached over the network without a verified certificate; \
             add sslmode=verify-full&sslrootcert=FILE to the URL"
        );
    }
    Ok(())
}

/// The authenticator `serve` runs with: says at start how callers
/// authenticate, and refuses (in staging and prod) to start when no caller
/// could.
async fn authenticator(
    config: agentledger_api::AuthConfig,
    api_keys: Arc<dyn ApiKeys>,
    hardened: bool,
) -> anyhow::Result<Arc<agentledger_api::Authenticator>> {
    use agentledger_api::auth::Mode;
    let mode = config.mode;
    let self_approval = config.allow_self_approval;
    let jwt = config.jwt.is_some();
    let keys = api_keys.list().await.context("reading the API keys")?;
    let usable = keys
        .iter()
        .filter(|k| k.usable_at(chrono::Utc::now()))
        .count();
    let auth = agentledger_api::Authenticator::new(config, api_keys).map_err(anyhow::Error::msg)?;
    if let Some(n) = auth.load_jwks().await.map_err(anyhow::Error::msg)? {
        tracing::info!(keys = n, "JWT verification keys loaded");
    }
    match mode {
        Mode::Off => tracing::warn!(
            "authentication is OFF: every caller is `anonymous` with every role \
             (set [auth] mode = \"required\" or another profile to require credentials)"
        ),
        Mode::Required => {
            if hardened && !jwt && usable == 0 {
                bail!(
                    "authentication is required but no caller could authenticate: configure JWT \
                     verification ([auth] jwks or jwt_hs256_secret_file) or create a key first: \
                     agentledger apikey create --name admin --role admin"
                );
            }
            tracing::info!(api_keys = usable, jwt, "authentication required");
        }
    }
    if self_approval && hardened {
        tracing::warn!("allow_self_approval is on: a submitter may decide its own escalation");
    }
    Ok(Arc::new(auth))
}

/// Outside dev the service must not be able to undo its own guarantees: a
/// superuser or the owner of `events` could disable the triggers that
/// refuse UPDATE and DELETE.
async fn refuse_privileged_role(store: &PostgresEventStore) -> anyhow::Result<()> {
    let client = store.pool().get().await?;
    let row = client
        .query_one(
            "SELECT r.rolsuper,
                    coalesce((SELECT pg_has_role(current_user, c.relowner, 'USAGE')
                                FROM pg_class c WHERE c.oid = to_regclass('events')), false),
                    current_user::text
               FROM pg_roles r WHERE r.rolname = current_user",
            &[],
        )
        .await?;
    let (superuser, owner, role): (bool, bool, String) = (row.get(0), row.get(1), row.get(2));
    if superuser || owner {
        bail!(
            "DATABASE_URL connects as {role}, {}: outside the dev profile the service runs as \
             its least-privileged role (agentledger_service), with AGENTLEDGER_ADMIN_DATABASE_URL \
             for migrations",
            if superuser {
                "a superuser"
            } else {
                "the owner of the events table"
            }
        );
    }
    Ok(())
}

/// The store, queue and read models `serve` runs on.
struct Backend {
    store: Arc<dyn EventStore>,
    queue: Arc<dyn agentledger_agents::WorkQueue>,
    read_models: Arc<dyn agentledger_projections::ReadModels>,
    ledger_keys: Arc<dyn LedgerKeys>,
    subject_keys: Arc<dyn SubjectKeys>,
    api_keys: Arc<dyn ApiKeys>,
    /// The ledger's tree (tiles), kept up by `tlog::maintain`.
    tree: Arc<dyn agentledger_eventstore::tlog::TreeTiles>,
    /// `postgres`, `embedded` or `in-memory`.
    kind: &'static str,
}

/// The dev backend that keeps its ledger in `dir` (SQLite): events, the
/// signing key and the subject keys are kept; read models, the task queue
/// and API keys live in memory, the first two rebuilt from the ledger.
fn embedded_backend(dir: &std::path::Path) -> anyhow::Result<Backend> {
    let ledger = agentledger_eventstore::EmbeddedLedger::open(dir)?;
    let loaded = ledger.event_store(Default::default())?;
    let verification = &loaded.verification;
    if verification.ok {
        tracing::info!(
            path = %ledger.path().display(),
            events = verification.checked_events,
            "embedded ledger opened; every hash chain verified"
        );
    } else {
        tracing::error!(
            path = %ledger.path().display(),
            position = verification.first_broken_position,
            reason = verification.reason.as_deref().unwrap_or_default(),
            "the embedded ledger was CHANGED outside the service: a hash chain breaks here \
             (serving anyway, so that the audit tools can show it)"
        );
    }
    tracing::warn!(
        path = %ledger.path().display(),
        "DATABASE_URL is not set: keeping the ledger in an embedded SQLite file (dev mode, one process)"
    );
    let store: Arc<dyn EventStore> = Arc::new(loaded.store);
    let models = InMemoryReadModels::start(store.clone());
    Ok(Backend {
        store,
        queue: Arc::new(InMemoryWorkQueue::default()),
        read_models: Arc::new(models),
        ledger_keys: Arc::new(ledger.ledger_keys()),
        subject_keys: Arc::new(ledger.subject_keys()),
        api_keys: Arc::new(InMemoryApiKeys::default()),
        tree: Arc::new(agentledger_eventstore::tlog::MemoryTiles::default()),
        kind: "embedded",
    })
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
