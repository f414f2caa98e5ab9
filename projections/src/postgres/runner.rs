//! Keeping a projection live: one runner per projection per process, of
//! which one at a time holds the lease (a session advisory lock on a
//! dedicated connection with TCP keepalives, so a dead process's lock goes
//! within seconds). The holder applies batches on that same connection,
//! rows and checkpoint in one transaction, the checkpoint moved by a
//! compare-and-set on (position, lease token): a runner whose lease moved
//! (another runner took over, or a rebuild swapped the tables) cannot commit.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentledger_eventstore::postgres::DatabaseUrl;
use agentledger_eventstore::{EventStore, Subscription};
use futures::FutureExt;
use tokio::sync::watch;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::project::{projection, Projection};
use super::{ProjectionError, CHECKPOINT_CHANNEL};
use crate::model::Fact;
use crate::query::PROJECTIONS;

/// Where a runner can be made to die (crash tests), on its n-th batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunnerFault {
    /// The batch's rows are written, the checkpoint not yet moved.
    AfterRows,
    /// Rows and checkpoint written, not committed.
    BeforeCommit,
    /// Committed (and announced with the commit), the runner not yet on.
    AfterCommit,
}

/// Die at `point` on the `batch`-th batch (1-based).
#[derive(Debug)]
pub struct RunnerFaultPlan {
    pub point: RunnerFault,
    pub batch: u64,
    seen: AtomicU64,
}

impl RunnerFaultPlan {
    /// Die at `point` on the `batch`-th batch.
    pub fn at(point: RunnerFault, batch: u64) -> Self {
        Self {
            point,
            batch: batch.max(1),
            seen: AtomicU64::new(0),
        }
    }

    /// A plan derived from `seed` alone, on one of the first `max_batch` batches.
    pub fn from_seed(seed: u64, max_batch: u64) -> Self {
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let point = [
            RunnerFault::AfterRows,
            RunnerFault::BeforeCommit,
            RunnerFault::AfterCommit,
        ][(z % 3) as usize];
        Self::at(point, 1 + (z >> 32) % max_batch.max(1))
    }

    fn batch_started(&self) -> u64 {
        self.seen.fetch_add(1, Ordering::SeqCst) + 1
    }
}

/// Tuning for a runner.
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// Most events per transaction.
    pub batch_size: usize,
    /// Wait between attempts to take the lease or to reconnect.
    pub retry: Duration,
    /// Least time between two announcements of the checkpoint.
    pub announce_interval: Duration,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        Self {
            batch_size: 500,
            retry: Duration::from_secs(1),
            announce_interval: Duration::from_millis(2),
        }
    }
}

/// Each projection's last known checkpoint in this process: moved by local
/// runners and by other processes' announcements.
#[derive(Clone)]
pub struct Checkpoints {
    senders: Arc<HashMap<&'static str, watch::Sender<u64>>>,
}

impl Default for Checkpoints {
    fn default() -> Self {
        Self {
            senders: Arc::new(
                PROJECTIONS
                    .iter()
                    .map(|p| (*p, watch::channel(0).0))
                    .collect(),
            ),
        }
    }
}

impl Checkpoints {
    /// Receivers, one per projection.
    pub fn receivers(&self) -> HashMap<&'static str, watch::Receiver<u64>> {
        self.senders
            .iter()
            .map(|(k, v)| (*k, v.subscribe()))
            .collect()
    }

    /// The checkpoint of `name` as last seen here.
    pub fn get(&self, name: &str) -> u64 {
        self.senders.get(name).map_or(0, |s| *s.borrow())
    }

    fn advance(&self, name: &str, position: u64) {
        if let Some(sender) = self.senders.get(name) {
            sender.send_if_modified(|p| {
                let moved = position > *p;
                *p = (*p).max(position);
                moved
            });
        }
    }

    /// Follows the table and the announcements of every process: reads the
    /// checkpoints, then listens (re-reading after every reconnect) until
    /// `stop`. Owns a dedicated connection (LISTEN needs one).
    pub async fn follow(self, url: String, stop: CancellationToken) {
        loop {
            if let Err(e) = self.follow_once(&url, &stop).await {
                tracing::warn!(error = %e, "checkpoint listener lost its connection; reconnecting");
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    async fn follow_once(
        &self,
        url: &str,
        stop: &CancellationToken,
    ) -> Result<(), ProjectionError> {
        let (client, mut connection) = DatabaseUrl::parse(url)?.connect().await?;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let driver = tokio::spawn(async move {
            let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = futures::StreamExt::next(&mut messages).await {
                match message {
                    Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                        let _ = tx.send(n.payload().to_string());
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        });
        client
            .batch_execute(&format!("LISTEN {CHECKPOINT_CHANNEL}"))
            .await?;
        for row in client
            .query("SELECT name, position FROM projection_checkpoints", &[])
            .await?
        {
            self.advance(row.get::<_, &str>(0), row.get::<_, i64>(1) as u64);
        }
        loop {
            let payload = tokio::select! {
                () = stop.cancelled() => { driver.abort(); return Ok(()); }
                payload = rx.recv() => payload,
            };
            let Some(payload) = payload else {
                driver.abort();
                return Ok(());
            };
            if let Some((name, position)) = payload.split_once(':') {
                if let Ok(position) = position.parse() {
                    self.advance(name, position);
                }
            }
        }
    }
}

/// Connects with keepalives, so that the server notices a dead peer (and
/// releases its advisory lock) within seconds.
pub async fn connect_lease(url: &DatabaseUrl) -> Result<Client, tokio_postgres::Error> {
    let mut url = url.clone();
    url.config_mut()
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(5))
        .keepalives_interval(Duration::from_secs(1))
        .keepalives_retries(3);
    url.connect_spawned().await
}

/// One projection's runner. Start with [`ProjectionRunner::spawn`].
pub struct ProjectionRunner {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl ProjectionRunner {
    /// Runs projection `name` until stopped: waits for the lease, catches up
    /// from the checkpoint, follows live. Errors are logged and retried
    /// (after `config.retry`), except a fault point, which ends the runner
    /// as a crash would.
    pub fn spawn(
        name: &str,
        url: String,
        store: Arc<dyn EventStore>,
        checkpoints: Checkpoints,
        config: RunnerConfig,
        fault: Option<RunnerFaultPlan>,
    ) -> Result<Self, ProjectionError> {
        let projection =
            projection(name, store.clone()).ok_or_else(|| ProjectionError::Unknown(name.into()))?;
        let url = DatabaseUrl::parse(&url)?;
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(
            projection,
            url,
            store,
            checkpoints,
            config,
            fault,
            stop.clone(),
        ));
        Ok(Self { stop, task })
    }

    /// Stops the runner and waits for it (its lease goes with its connection).
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }

    /// Waits until the runner ended by itself (a fault point).
    pub async fn ended(self) {
        let _ = self.task.await;
    }
}

async fn run(
    mut projection: Box<dyn Projection>,
    url: DatabaseUrl,
    store: Arc<dyn EventStore>,
    checkpoints: Checkpoints,
    config: RunnerConfig,
    fault: Option<RunnerFaultPlan>,
    stop: CancellationToken,
) {
    let name = projection.name();
    loop {
        let result = tokio::select! {
            () = stop.cancelled() => return,
            result = lead(&mut *projection, &url, &*store, &checkpoints, &config, fault.as_ref(), &stop) => result,
        };
        match result {
            Ok(()) => return,
            Err(ProjectionError::Fault) => {
                tracing::warn!(projection = name, "runner stopped at a fault point");
                return;
            }
            Err(ProjectionError::Corrupt(e)) => {
                tracing::error!(projection = name, error = %e, "projection stopped: unreadable event");
                return;
            }
            Err(e) => tracing::warn!(projection = name, error = %e, "projection runner restarting"),
        }
        projection.reset();
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(config.retry) => {}
        }
    }
}

/// Takes the lease and applies batches until an error or `stop`.
async fn lead(
    projection: &mut dyn Projection,
    url: &DatabaseUrl,
    store: &dyn EventStore,
    checkpoints: &Checkpoints,
    config: &RunnerConfig,
    fault: Option<&RunnerFaultPlan>,
    stop: &CancellationToken,
) -> Result<(), ProjectionError> {
    let name = projection.name();
    let mut client = connect_lease(url).await?;
    loop {
        let held: bool = client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&projection.lock_key()])
            .await?
            .get(0);
        if held {
            break;
        }
        tokio::select! {
            () = stop.cancelled() => return Ok(()),
            () = tokio::time::sleep(config.retry) => {}
        }
    }
    // The lease is ours: a new token fences out whoever held it before.
    let token = Uuid::new_v4();
    let row = client
        .query_one(
            "INSERT INTO projection_checkpoints (name, position, lease_token) VALUES ($1, 0, $2)
             ON CONFLICT (name) DO UPDATE SET lease_token = EXCLUDED.lease_token
             RETURNING position",
            &[&name, &token],
        )
        .await?;
    let mut position = row.get::<_, i64>(0) as u64;
    projection.reset();
    checkpoints.advance(name, position);
    tracing::info!(projection = name, position, "projection lease taken");
    let mut events = store.subscribe_all(position + 1);
    let mut announced = Instant::now() - config.announce_interval;
    loop {
        let batch = tokio::select! {
            () = stop.cancelled() => return Ok(()),
            batch = next_batch(&mut events, config.batch_size) => batch?,
        };
        let full = batch.len() >= config.batch_size;
        let Some(last) = batch.last().map(|e| e.global_position) else {
            return Err(ProjectionError::Corrupt(
                "the event subscription ended".into(),
            ));
        };
        let facts: Vec<Fact> = batch
            .iter()
            .filter_map(|e| Fact::decode(e).transpose())
            .collect::<Result<_, _>>()
            .map_err(|e| ProjectionError::Corrupt(e.to_string()))?;
        let batch_no = fault.map(|f| f.batch_started());
        let strikes = |point| fault.is_some_and(|f| f.point == point && batch_no == Some(f.batch));
        let tx = client.transaction().await?;
        projection.apply(&tx, "", &facts).await?;
        if strikes(RunnerFault::AfterRows) {
            return Err(ProjectionError::Fault);
        }
        let moved = tx
            .execute(
                "UPDATE projection_checkpoints SET position = $3
                  WHERE name = $1 AND position = $2 AND lease_token = $4",
                &[&name, &(position as i64), &(last as i64), &token],
            )
            .await?;
        if moved != 1 {
            drop(tx);
            return Err(ProjectionError::LeaseLost);
        }
        // Announce at most once per interval, and always when caught up;
        // inside the transaction, so that the announcement is delivered
        // with the commit and costs no transaction of its own.
        let announce = !full || announced.elapsed() >= config.announce_interval;
        if announce {
            tx.execute(
                "SELECT pg_notify($1, $2)",
                &[&CHECKPOINT_CHANNEL, &format!("{name}:{last}")],
            )
            .await?;
        }
        if strikes(RunnerFault::BeforeCommit) {
            return Err(ProjectionError::Fault);
        }
        tx.commit().await?;
        if announce {
            announced = Instant::now();
        }
        position = last;
        checkpoints.advance(name, position);
        if strikes(RunnerFault::AfterCommit) {
            return Err(ProjectionError::Fault);
        }
    }
}

/// The next batch: waits for one event, then takes what is ready, up to `max`.
async fn next_batch(
    events: &mut Subscription,
    max: usize,
) -> Result<Vec<Arc<agentledger_eventstore::RecordedEvent>>, ProjectionError> {
    let first = match events.next().await {
        Some(event) => event?,
        None => return Ok(Vec::new()),
    };
    let mut batch = vec![first];
    while batch.len() < max {
        match events.next().now_or_never() {
            Some(Some(event)) => batch.push(event?),
            _ => break,
        }
    }
    Ok(batch)
}
