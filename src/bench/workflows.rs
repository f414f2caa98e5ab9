//! `agentledger bench workflows`: the end-to-end figure of design §7. Runs
//! the real runtime (Sena, Lubit, GitCode, RUNE, built-in tools) on a
//! scratch PostgreSQL database, first as fast as it goes, then at a fixed
//! rate (half the measured maximum unless told otherwise), and reports
//! workflows/s, submit→final latency, and the work each workflow costs.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentledger_agents::{
    PostgresWorkQueue, Runtime, RuntimeConfig, Submission, SystemClock, ToolRegistry,
};
use agentledger_domain::workflow::WorkflowState;
use agentledger_eventstore::{
    AppendResult, EventStore, ExpectedVersion, NewEvent, Position, PostgresEventStore,
    PostgresOptions, RecordedEvent, StoreError, StreamId, Subscription,
};
use agentledger_projections::postgres::runner::{Checkpoints, ProjectionRunner, RunnerConfig};
use agentledger_projections::PROJECTIONS;
use anyhow::Context;
use async_trait::async_trait;
use tokio::sync::{mpsc, Semaphore};
use uuid::Uuid;

use super::{connect, Scratch};

/// Four agents, three dependent subtasks, built-in tools; it completes.
const REQUEST: &str = "1. Extract the figures from the text: 12, 7.5 and 30\n2. Sort them in descending order\n3. Compute their total";

#[derive(clap::Args)]
pub struct WorkflowArgs {
    /// A database on the server to measure (used to create a scratch database).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
    /// Workflows per phase.
    #[arg(long, default_value_t = 1_000)]
    count: usize,
    /// Submission rate of the fixed-rate phase, workflows/s; default: half
    /// the rate the full-load phase reached.
    #[arg(long)]
    rate: Option<f64>,
    /// Workflows the runtime drives at once.
    #[arg(long, default_value_t = RuntimeConfig::default().max_workflows)]
    max_workflows: usize,
    /// Submissions in flight at once in the full-load phase.
    #[arg(long, default_value_t = 64)]
    submitters: usize,
    /// Run without the three projections (by default they run in the same
    /// process, as in `serve`, and their lag is reported).
    #[arg(long)]
    no_projections: bool,
    /// Run without the ledger's tree (by default its builder follows the
    /// ledger in the same process, as in `serve`, and its transactions are
    /// counted with the rest): what the tree costs is the difference.
    #[arg(long)]
    no_tree: bool,
    /// Turn the result cache on (every workflow asks the same: after the
    /// first, each tool result is reused); its hit rate and the time it
    /// saved are reported.
    #[arg(long)]
    cache: bool,
}

pub async fn run(args: WorkflowArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.count > 0, "--count must be at least 1");
    let scratch = Scratch::create(&args.database_url).await?;
    let result = measure(&args, &scratch.url).await;
    scratch.drop_database().await?;
    result
}

async fn measure(args: &WorkflowArgs, url: &str) -> anyhow::Result<()> {
    let store = PostgresEventStore::connect(url, PostgresOptions::default()).await?;
    let queue = Arc::new(PostgresWorkQueue::new(store.pool().clone()));
    let counting = Arc::new(Counting::new(store));
    let runtime = Runtime::new(
        counting.clone(),
        queue,
        ToolRegistry::default(),
        Arc::new(SystemClock),
        RuntimeConfig {
            max_workflows: args.max_workflows,
            cache: agentledger_agents::cache::CacheConfig {
                enabled: args.cache,
                ..Default::default()
            },
            ..RuntimeConfig::default()
        },
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = {
        let runtime = runtime.clone();
        tokio::spawn(async move {
            runtime
                .run(async {
                    let _ = stopped.await;
                })
                .await
        })
    };
    let tracker = Tracker::start(counting.clone()).await?;
    let admin = connect(url).await?;
    let checkpoints = Checkpoints::default();
    let runners: Vec<ProjectionRunner> = if args.no_projections {
        Vec::new()
    } else {
        vec![ProjectionRunner::spawn(
            &PROJECTIONS,
            url.to_string(),
            counting.clone(),
            checkpoints.clone(),
            RunnerConfig::default(),
            None,
        )?]
    };
    let lag = LagRecorder::start(&counting.inner, &checkpoints).await?;
    let tree_stop = tokio_util::sync::CancellationToken::new();
    let tree = (!args.no_tree).then(|| {
        tokio::spawn(agentledger_eventstore::tlog::maintain(
            Arc::new(counting.inner.clone()),
            Arc::new(agentledger_eventstore::postgres::PostgresTiles::new(
                counting.inner.pool().clone(),
            )),
            tree_stop.clone(),
        ))
    });

    println!(
        "end-to-end workflows on PostgreSQL: {} per phase, 3 subtasks each (extract, sort, total), \
         runtime drives {} at once; the ledger's tree {}",
        args.count,
        args.max_workflows,
        if args.no_tree { "off (--no-tree)" } else { "built as in serve" }
    );
    // Warm-up: connections, prepared statements, caches.
    phase(
        &runtime,
        &tracker,
        &counting,
        &admin,
        50.min(args.count),
        Load::Full(args.submitters),
    )
    .await?;
    println!(
        "{:<22}{:>8}{:>9}{:>9}{:>9}{:>11}{:>11}{:>11}{:>12}{:>13}{:>10}",
        "phase",
        "wf/s",
        "p50 ms",
        "p99 ms",
        "max ms",
        "rec p50",
        "rec p99",
        "events/wf",
        "appends/wf",
        "write tx/wf",
        "reads/wf"
    );
    let full = phase(
        &runtime,
        &tracker,
        &counting,
        &admin,
        args.count,
        Load::Full(args.submitters),
    )
    .await?;
    full.print("full load");
    // The next phase starts with the projections caught up, so that its
    // lag is its own, not the backlog of the full-load phase.
    let head = counting.inner.head_position().await?;
    for (_, mut watch) in checkpoints.receivers() {
        if !runners.is_empty() {
            watch.wait_for(|p| *p >= head).await?;
        }
    }
    let full_lag = lag.take();
    let rate = args.rate.unwrap_or(full.rate / 2.0);
    let paced = phase(
        &runtime,
        &tracker,
        &counting,
        &admin,
        args.count,
        Load::Rate(rate),
    )
    .await?;
    paced.print(&format!("at {rate:.0} wf/s"));
    let paced_lag = lag.take();
    if !runners.is_empty() {
        println!(
            "\nprojection lag, event recorded → applied by the projection (ms):\n{:<22}{:<18}{:>9}{:>9}{:>9}",
            "phase", "projection", "p50", "p99", "max"
        );
        for (phase, lags) in [
            ("full load", full_lag),
            (&*format!("at {rate:.0} wf/s"), paced_lag),
        ] {
            for (name, mut lags) in PROJECTIONS.iter().zip(lags) {
                lags.sort();
                if lags.is_empty() {
                    continue;
                }
                let ms = |q: f64| {
                    lags[((lags.len() as f64 * q) as usize).min(lags.len() - 1)].as_secs_f64() * 1e3
                };
                println!(
                    "{phase:<22}{name:<18}{:>9.1}{:>9.1}{:>9.1}",
                    ms(0.5),
                    ms(0.99),
                    ms(1.0)
                );
            }
        }
    }
    if args.cache {
        let stats = runtime.cache_stats();
        let lookups = stats.tool_hits + stats.tool_misses;
        println!(
            "\nresult cache: {} tool lookups, {} hits ({:.1} %), {} entries, {:.1} ms of tool time saved",
            lookups,
            stats.tool_hits,
            stats.tool_hits as f64 * 100.0 / lookups.max(1) as f64,
            stats.entries,
            stats.saved_ms as f64
        );
    }
    let _ = stop.send(());
    running.await?;
    tree_stop.cancel();
    if let Some(tree) = tree {
        tree.await?;
    }
    for runner in runners {
        runner.stop().await;
    }
    Ok(())
}

enum Load {
    /// As fast as it goes, with this many submissions in flight.
    Full(usize),
    /// Open loop: one submission every 1/rate seconds, whatever the backlog.
    Rate(f64),
}

struct PhaseResult {
    rate: f64,
    /// Sorted.
    latencies: Vec<Duration>,
    /// Sorted; see [`Ended::recorded`].
    recorded: Vec<Duration>,
    events: f64,
    appends: f64,
    write_transactions: f64,
    reads: f64,
}

impl PhaseResult {
    fn print(&self, name: &str) {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let pick = |sorted: &[Duration], q: f64| {
            let i = ((sorted.len() as f64 * q) as usize).min(sorted.len() - 1);
            ms(sorted[i])
        };
        println!(
            "{name:<22}{:>8.0}{:>9.1}{:>9.1}{:>9.1}{:>11.1}{:>11.1}{:>11.1}{:>12.1}{:>13.1}{:>10.1}",
            self.rate,
            pick(&self.latencies, 0.50),
            pick(&self.latencies, 0.99),
            ms(*self.latencies.last().expect("at least one workflow")),
            pick(&self.recorded, 0.50),
            pick(&self.recorded, 0.99),
            self.events,
            self.appends,
            self.write_transactions,
            self.reads,
        );
    }
}

async fn phase(
    runtime: &Runtime,
    tracker: &Tracker,
    counting: &Counting,
    admin: &tokio_postgres::Client,
    count: usize,
    load: Load,
) -> anyhow::Result<PhaseResult> {
    let xid = |row: tokio_postgres::Row| row.get::<_, i64>(0);
    let xid_before = xid(admin
        .query_one("SELECT txid_current()::bigint", &[])
        .await?);
    let (events_before, appends_before, reads_before) = counting.totals();
    let mut finals = tracker.expect();
    let started = Instant::now();
    let submitting = {
        let runtime = runtime.clone();
        let submitted = tracker.submitted.clone();
        tokio::spawn(async move {
            let gate = Arc::new(Semaphore::new(match load {
                Load::Full(n) => n.max(1),
                Load::Rate(_) => Semaphore::MAX_PERMITS,
            }));
            let mut tasks = tokio::task::JoinSet::new();
            for i in 0..count {
                if let Load::Rate(rate) = load {
                    let due = started + Duration::from_secs_f64(i as f64 / rate);
                    tokio::time::sleep_until(due.into()).await;
                }
                let permit = gate.clone().acquire_owned().await.expect("never closed");
                let runtime = runtime.clone();
                let submitted = submitted.clone();
                tasks.spawn(async move {
                    let id = Uuid::now_v7();
                    submitted.lock().expect("lock").insert(id, Instant::now());
                    let result = runtime
                        .submit(Submission {
                            workflow_id: Some(id),
                            request: REQUEST.into(),
                            ..Default::default()
                        })
                        .await;
                    drop(permit);
                    result
                });
            }
            while let Some(result) = tasks.join_next().await {
                result.expect("submit task")?;
            }
            anyhow::Ok(())
        })
    };
    let mut latencies = Vec::with_capacity(count);
    let mut recorded = Vec::with_capacity(count);
    while latencies.len() < count {
        let ended = tokio::time::timeout(Duration::from_secs(120), finals.recv())
            .await
            .context("no workflow ended within 120 s")?
            .context("the tracker stopped")?;
        anyhow::ensure!(
            ended.state == WorkflowState::Completed,
            "a workflow ended {:?}",
            ended.state
        );
        latencies.push(ended.latency);
        recorded.push(ended.recorded);
    }
    let elapsed = started.elapsed();
    submitting.await??;
    let xid_after = xid(admin
        .query_one("SELECT txid_current()::bigint", &[])
        .await?);
    let (events_after, appends_after, reads_after) = counting.totals();
    latencies.sort();
    recorded.sort();
    let per = |n: u64| n as f64 / count as f64;
    Ok(PhaseResult {
        rate: count as f64 / elapsed.as_secs_f64(),
        latencies,
        recorded,
        events: per(events_after - events_before),
        appends: per(appends_after - appends_before),
        // The second txid_current() itself took one.
        write_transactions: per((xid_after - xid_before - 1).max(0) as u64),
        reads: per(reads_after - reads_before),
    })
}

/// Follows `$all` and reports each workflow's submit→final latency.
struct Tracker {
    submitted: Arc<Mutex<HashMap<Uuid, Instant>>>,
    waiting: Arc<Mutex<Option<mpsc::UnboundedSender<Ended>>>>,
    /// Follows the store; stopped on drop so that the store's connections
    /// close before the scratch database is dropped.
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Tracker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A workflow that ended.
struct Ended {
    /// From calling submit to the subscriber receiving the final event.
    latency: Duration,
    /// From the submission's `recorded_at` to the final event's: the part
    /// spent in the runtime and the store, without delivery to subscribers.
    recorded: Duration,
    state: WorkflowState,
}

impl Tracker {
    async fn start(store: Arc<Counting>) -> anyhow::Result<Self> {
        let submitted: Arc<Mutex<HashMap<Uuid, Instant>>> = Arc::default();
        let waiting: Arc<Mutex<Option<mpsc::UnboundedSender<_>>>> = Arc::default();
        let mut events = store
            .inner
            .subscribe_all(store.inner.head_position().await? + 1);
        let task = {
            let (submitted, waiting) = (submitted.clone(), waiting.clone());
            tokio::spawn(async move {
                let mut first_recorded: HashMap<Uuid, chrono::DateTime<chrono::Utc>> =
                    HashMap::new();
                while let Some(Ok(event)) = events.next().await {
                    let id = event
                        .stream_id
                        .as_str()
                        .strip_prefix(agentledger_agents::runtime::STREAM_PREFIX)
                        .and_then(|id| id.parse::<Uuid>().ok());
                    if event.event_type == "WorkflowSubmitted" {
                        first_recorded.extend(id.map(|id| (id, event.recorded_at)));
                        continue;
                    }
                    let state = match event.event_type.as_str() {
                        "WorkflowCompleted" => WorkflowState::Completed,
                        "WorkflowRejected" => WorkflowState::Rejected,
                        "WorkflowFailed" => WorkflowState::Failed,
                        "WorkflowFlagged" => WorkflowState::Flagged,
                        "WorkflowCancelled" => WorkflowState::Cancelled,
                        _ => continue,
                    };
                    let Some(since) = id.and_then(|id| submitted.lock().expect("lock").remove(&id))
                    else {
                        continue;
                    };
                    let recorded = id
                        .and_then(|id| first_recorded.remove(&id))
                        .and_then(|first| (event.recorded_at - first).to_std().ok())
                        .unwrap_or_default();
                    if let Some(tx) = &*waiting.lock().expect("lock") {
                        let _ = tx.send(Ended {
                            latency: since.elapsed(),
                            recorded,
                            state,
                        });
                    }
                }
            })
        };
        Ok(Self {
            submitted,
            waiting,
            task,
        })
    }

    /// A channel of the latencies of workflows that end from now on.
    fn expect(&self) -> mpsc::UnboundedReceiver<Ended> {
        let (tx, rx) = mpsc::unbounded_channel();
        *self.waiting.lock().expect("lock") = Some(tx);
        rx
    }
}

/// The store, counting appends, appended events and stream reads.
struct Counting {
    inner: PostgresEventStore,
    events: AtomicU64,
    appends: AtomicU64,
    reads: AtomicU64,
}

impl Counting {
    fn new(inner: PostgresEventStore) -> Self {
        Self {
            inner,
            events: AtomicU64::new(0),
            appends: AtomicU64::new(0),
            reads: AtomicU64::new(0),
        }
    }

    fn totals(&self) -> (u64, u64, u64) {
        (
            self.events.load(Ordering::Relaxed),
            self.appends.load(Ordering::Relaxed),
            self.reads.load(Ordering::Relaxed),
        )
    }
}

#[async_trait]
impl EventStore for Counting {
    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult, StoreError> {
        self.appends.fetch_add(1, Ordering::Relaxed);
        self.events
            .fetch_add(events.len() as u64, Ordering::Relaxed);
        self.inner.append(stream, expected, events).await
    }

    async fn read_stream(
        &self,
        stream: &StreamId,
        from_version: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.inner.read_stream(stream, from_version, limit).await
    }

    async fn read_all(
        &self,
        from: Position,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.inner.read_all(from, limit).await
    }

    async fn head_position(&self) -> Result<Position, StoreError> {
        self.inner.head_position().await
    }

    fn subscribe_all(&self, from: Position) -> Subscription {
        self.inner.subscribe_all(from)
    }

    fn subscribe_stream(&self, stream: StreamId, from_version: u64) -> Subscription {
        self.inner.subscribe_stream(stream, from_version)
    }
}

/// Measures, for every event, the time from its `recorded_at` to the moment
/// each projection's checkpoint passes it.
struct LagRecorder {
    lags: Arc<Mutex<Vec<Vec<Duration>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for LagRecorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl LagRecorder {
    async fn start(store: &PostgresEventStore, checkpoints: &Checkpoints) -> anyhow::Result<Self> {
        let lags: Arc<Mutex<Vec<Vec<Duration>>>> =
            Arc::new(Mutex::new(vec![Vec::new(); PROJECTIONS.len()]));
        let mut events = store.subscribe_all(store.head_position().await? + 1);
        let receivers = checkpoints.receivers();
        let mut watches: Vec<_> = PROJECTIONS.iter().map(|p| receivers[p].clone()).collect();
        let task = {
            let lags = lags.clone();
            tokio::spawn(async move {
                let mut pending: Vec<
                    std::collections::VecDeque<(u64, chrono::DateTime<chrono::Utc>)>,
                > = vec![Default::default(); PROJECTIONS.len()];
                loop {
                    let changed = futures::future::select_all(
                        watches.iter_mut().map(|w| Box::pin(w.changed())),
                    );
                    tokio::select! {
                        event = events.next() => {
                            let Some(Ok(event)) = event else { return };
                            for queue in &mut pending {
                                queue.push_back((event.global_position, event.recorded_at));
                            }
                        }
                        (result, _, _) = changed => {
                            if result.is_err() {
                                return;
                            }
                        }
                    }
                    let now = chrono::Utc::now();
                    let mut lags = lags.lock().expect("lock");
                    for (i, watch) in watches.iter().enumerate() {
                        let applied = *watch.borrow();
                        while pending[i].front().is_some_and(|(p, _)| *p <= applied) {
                            let (_, at) = pending[i].pop_front().expect("checked");
                            lags[i].push((now - at).to_std().unwrap_or_default());
                        }
                    }
                }
            })
        };
        Ok(Self { lags, task })
    }

    /// The lags measured since the last call, per projection.
    fn take(&self) -> Vec<Vec<Duration>> {
        let mut lags = self.lags.lock().expect("lock");
        lags.iter_mut().map(std::mem::take).collect()
    }
}
