//! `agentledger bench`: measures the service against the physical limits of
//! the database it runs on, in the same run (design §7).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentledger_eventstore::{
    migrate, Actor, EventStore, ExpectedVersion, Metadata, NewEvent, PostgresEventStore,
    PostgresOptions, StreamId,
};
use anyhow::Context;
use serde_json::json;
use tokio_postgres::types::ToSql;
use tokio_postgres::Client;

mod api;
mod closed_loop;
mod proofs;
mod rebuild;
mod verify;
mod workers;
mod workflows;

#[derive(clap::Subcommand)]
pub enum Bench {
    /// Append throughput against a raw INSERT of the same rows into a table of the same DDL.
    ///
    /// Needs DATABASE_URL to name a role that may CREATE DATABASE: each scenario
    /// runs in a scratch database that is dropped afterwards.
    Append(AppendArgs),
    /// End-to-end workflows (four agents, three subtasks, built-in tools):
    /// workflows/s at full load, then submit→final latency at a fixed rate.
    ///
    /// Needs DATABASE_URL to name a role that may CREATE DATABASE.
    Workflows(workflows::WorkflowArgs),
    /// Projection rebuild speed over a ledger of real workflow events,
    /// loaded with COPY into a scratch database.
    Rebuild(rebuild::RebuildArgs),
    /// The service as clients see it: a real `serve` process, workflows
    /// submitted over HTTP, one WebSocket subscription per workflow.
    Api(api::ApiArgs),
    /// Whole-ledger verification speed and the verifier's peak memory over
    /// a million events (real workflow events, replicated, loaded with COPY).
    Verify(verify::VerifyArgs),
    /// The ledger's tree over a million events (real workflow events,
    /// replicated, loaded with COPY): building it beside a plain read, its
    /// size, and inclusion proofs, consistency proofs and checkpoints.
    Proofs(proofs::ProofsArgs),
}

#[derive(clap::Args)]
pub struct AppendArgs {
    /// A database on the server to measure (used to create scratch databases).
    #[arg(
        long,
        env = "DATABASE_URL",
        hide_env_values = true,
        required_unless_present = "embedded"
    )]
    database_url: Option<String>,
    /// Measure the dev-mode stores instead, in the same run: the in-memory
    /// store, and the same store writing through to the embedded SQLite
    /// ledger of `serve --data-dir` (a scratch directory under TMPDIR).
    #[arg(long)]
    embedded: bool,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Concurrent writers to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    writers: Vec<usize>,
    /// Events per append (and rows per raw INSERT), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,10")]
    batch: Vec<usize>,
    /// The store's writer lanes (see PostgresOptions::writer_lanes).
    #[arg(long, default_value_t = PostgresOptions::default().writer_lanes)]
    lanes: usize,
}

impl Bench {
    pub async fn run(self) -> anyhow::Result<()> {
        match self {
            Self::Append(args) => append(args).await,
            Self::Workflows(args) => workflows::run(args).await,
            Self::Rebuild(args) => rebuild::run(args).await,
            Self::Api(args) => api::run(args).await,
            Self::Verify(args) => verify::run(args).await,
            Self::Proofs(args) => proofs::run(args).await,
        }
    }
}

/// A payload that makes a ~500-byte row (payload ~350 bytes, metadata ~150).
fn payload(i: usize) -> serde_json::Value {
    json!({
        "subtask": format!("st-{i}"),
        "tool": "keyword_extract",
        "output": "분기 보고서 요약: revenue grew 12% quarter over quarter; costs held flat; the board approved the plan. \
                   Keywords: revenue, costs, board, plan, quarter, growth, approval, 요약, 보고서.",
        "attempt": 1,
        "duration_ms": 12.5,
    })
}

fn metadata() -> Metadata {
    let mut metadata = Metadata::new(Actor::agent("gitcode", "1.0.0"));
    metadata.correlation_id = Some(uuid::Uuid::now_v7());
    metadata.causation_id = Some(uuid::Uuid::now_v7());
    metadata
}

async fn append(args: AppendArgs) -> anyhow::Result<()> {
    let duration = Duration::from_secs(args.seconds);
    let Some(database_url) = args.database_url.as_deref().filter(|_| !args.embedded) else {
        return append_embedded(&args, duration).await;
    };
    println!(
        "append throughput, {} s per measurement, ~500-byte events, {} writer lane(s)",
        args.seconds, args.lanes
    );
    println!(
        "{:>8} {:>6} {:>14} {:>14} {:>7}",
        "writers", "batch", "raw rows/s", "append ev/s", "ratio"
    );
    for &batch in &args.batch {
        for &writers in &args.writers {
            let scratch = Scratch::create(database_url).await?;
            let raw = raw_insert(&scratch.url, writers, batch, duration).await?;
            let store = store_append(&scratch.url, writers, batch, args.lanes, duration).await?;
            println!(
                "{writers:>8} {batch:>6} {raw:>14.0} {store:>14.0} {:>6.0}%",
                100.0 * store / raw.max(f64::MIN_POSITIVE)
            );
            scratch.drop_database().await?;
        }
    }
    Ok(())
}

/// Runs `writers` loops of `step` for `duration`; returns rows per second.
async fn measure<F, Fut>(writers: usize, duration: Duration, step: F) -> anyhow::Result<f64>
where
    F: Fn(usize, usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<usize>> + Send,
{
    let step = Arc::new(step);
    let (rows, stop) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    let started = Instant::now();
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let (step, rows, stop) = (step.clone(), rows.clone(), stop.clone());
            tokio::spawn(async move {
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    rows.fetch_add(step(w, i).await? as u64, Ordering::Relaxed);
                    i += 1;
                    // An in-memory append never waits: without this the
                    // writers keep every thread and the timer never fires.
                    tokio::task::yield_now().await;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await??;
    }
    Ok(rows.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}

/// Stream, version, event id, payload, recorded at, a 32-byte hash.
type RawRow = (
    String,
    i64,
    uuid::Uuid,
    serde_json::Value,
    chrono::DateTime<chrono::Utc>,
    Vec<u8>,
);

/// The physical baseline: the same rows inserted into a table with the same
/// DDL (indexes, constraints and triggers), without any of the store's logic.
async fn raw_insert(
    url: &str,
    writers: usize,
    batch: usize,
    duration: Duration,
) -> anyhow::Result<f64> {
    let setup = connect(url).await?;
    setup
        .batch_execute(
            "CREATE TABLE bench_raw (LIKE events INCLUDING ALL);
             CREATE SEQUENCE bench_raw_position;
             CREATE TRIGGER raw_no_update_or_delete BEFORE UPDATE OR DELETE ON bench_raw
                 FOR EACH ROW EXECUTE FUNCTION events_refuse_change();
             CREATE TRIGGER raw_no_truncate BEFORE TRUNCATE ON bench_raw
                 FOR EACH STATEMENT EXECUTE FUNCTION events_refuse_change();",
        )
        .await?;
    let values: Vec<String> = (0..batch)
        .map(|r| {
            let p = |k: usize| format!("${}", r * 8 + k);
            format!(
                "(nextval('bench_raw_position'), {}, {}, {}, 'SubtaskSucceeded', 1, {}, {}, {}, 1, {}, {})",
                p(1),
                p(2),
                p(3),
                p(4),
                p(5),
                p(6),
                p(7),
                p(8)
            )
        })
        .collect();
    let sql = format!(
        "INSERT INTO bench_raw (global_position, stream_id, stream_version, event_id, event_type, schema_version, \
         payload, metadata, recorded_at, hash_version, prev_hash, hash) VALUES {}",
        values.join(", ")
    );
    let mut clients = Vec::new();
    for _ in 0..writers {
        let client = connect(url).await?;
        let statement = client.prepare(&sql).await?;
        clients.push(Arc::new((client, statement)));
    }
    let metadata = serde_json::to_value(metadata())?;
    measure(writers, duration, move |w, i| {
        let (client, metadata) = (clients[w].clone(), metadata.clone());
        async move {
            let (client, statement) = &*client;
            let rows: Vec<RawRow> = (0..batch)
                .map(|r| {
                    let n = i * batch + r;
                    (
                        format!("bench-{w}-{}", n / 20),
                        (n % 20) as i64,
                        uuid::Uuid::now_v7(),
                        payload(n),
                        chrono::Utc::now(),
                        uuid::Uuid::new_v4().as_bytes().repeat(2),
                    )
                })
                .collect();
            let mut params: Vec<&(dyn ToSql + Sync)> = Vec::with_capacity(batch * 8);
            for row in &rows {
                params.extend([
                    &row.0 as &(dyn ToSql + Sync),
                    &row.1,
                    &row.2,
                    &row.3,
                    &metadata,
                    &row.4,
                    &row.5,
                    &row.5,
                ]);
            }
            client.execute(statement, &params).await?;
            Ok(batch)
        }
    })
    .await
}

/// The store: one process, `writers` tasks appending to their own streams
/// (a new stream every 20 events, like a workflow) with exact versions.
async fn store_append(
    url: &str,
    writers: usize,
    batch: usize,
    lanes: usize,
    duration: Duration,
) -> anyhow::Result<f64> {
    let options = PostgresOptions {
        writer_lanes: lanes,
        ..Default::default()
    };
    let store = PostgresEventStore::connect(url, options).await?;
    appends(Arc::new(store), writers, batch, duration).await
}

/// The dev-mode stores side by side: in memory (the baseline), and in
/// memory writing every append to the embedded SQLite ledger.
async fn append_embedded(args: &AppendArgs, duration: Duration) -> anyhow::Result<()> {
    println!(
        "append throughput of the dev-mode stores, {} s per measurement, ~500-byte events",
        args.seconds
    );
    println!(
        "{:>8} {:>6} {:>14} {:>14} {:>7}",
        "writers", "batch", "memory ev/s", "embedded ev/s", "ratio"
    );
    for &batch in &args.batch {
        for &writers in &args.writers {
            let memory = appends(
                Arc::new(agentledger_eventstore::InMemoryEventStore::default()),
                writers,
                batch,
                duration,
            )
            .await?;
            let dir = std::env::temp_dir().join(format!(
                "agentledger-bench-{}",
                uuid::Uuid::new_v4().simple()
            ));
            let embedded = {
                let ledger = agentledger_eventstore::EmbeddedLedger::open(&dir)?;
                let store = ledger.event_store(Default::default())?.store;
                appends(Arc::new(store), writers, batch, duration).await
            };
            std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
            let embedded = embedded?;
            println!(
                "{writers:>8} {batch:>6} {memory:>14.0} {embedded:>14.0} {:>6.0}%",
                100.0 * embedded / memory.max(f64::MIN_POSITIVE)
            );
        }
    }
    Ok(())
}

/// `writers` tasks appending to their own streams (a new stream every 20
/// events, like a workflow) with exact versions; events per second.
async fn appends(
    store: Arc<dyn EventStore>,
    writers: usize,
    batch: usize,
    duration: Duration,
) -> anyhow::Result<f64> {
    // Built once, as the raw baseline does; only the payload and ids vary per event.
    let metadata = metadata();
    measure(writers, duration, move |w, i| {
        let (store, metadata) = (store.clone(), metadata.clone());
        async move {
            let per_stream = (20 / batch).max(1);
            let stream = StreamId::new(format!("bench-{w}-{}", i / per_stream))?;
            let expected = match i % per_stream {
                0 => ExpectedVersion::NoStream,
                k => ExpectedVersion::Exact((k * batch - 1) as u64),
            };
            let events = (0..batch)
                .map(|r| {
                    NewEvent::new("SubtaskSucceeded", payload(i * batch + r), metadata.clone())
                })
                .collect();
            store.append(&stream, expected, events).await?;
            Ok(batch)
        }
    })
    .await
}

pub(crate) async fn connect(url: &str) -> anyhow::Result<Client> {
    agentledger_eventstore::postgres::DatabaseUrl::parse(url)?
        .connect_spawned()
        .await
        .with_context(|| "connecting to DATABASE_URL")
}

/// A migrated database that exists for one measurement.
pub(crate) struct Scratch {
    pub(crate) server: String,
    pub(crate) name: String,
    pub(crate) url: String,
}

impl Scratch {
    pub(crate) async fn create(server: &str) -> anyhow::Result<Self> {
        let name = format!("agentledger_bench_{}", uuid::Uuid::new_v4().simple());
        connect(server)
            .await?
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await?;
        let url = agentledger_eventstore::postgres::connection_string(server, &name, None)?;
        migrate::run(&url).await?;
        Ok(Self {
            server: server.to_string(),
            name,
            url,
        })
    }

    pub(crate) async fn drop_database(self) -> anyhow::Result<()> {
        connect(&self.server)
            .await?
            .batch_execute(&format!("DROP DATABASE {} WITH (FORCE)", self.name))
            .await?;
        Ok(())
    }
}
