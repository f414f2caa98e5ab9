//! Keeping projections live: a runner applies one or more projections (by
//! default all three, together), and per projection one runner at a time
//! holds the lease (a session advisory lock on a dedicated connection with
//! TCP keepalives, so a dead process's lock goes within seconds; a runner
//! takes the leases of all its projections or none). The holder applies
//! each batch on that same connection to all its projections, rows and
//! checkpoints in one transaction, each checkpoint moved by a
//! compare-and-set on (position, lease token): a runner whose lease moved
//! (another runner took over, or a rebuild swapped the tables) cannot commit.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentledger_eventstore::health::{panic_message, Health};
use agentledger_eventstore::postgres::{DatabaseUrl, Notice, Peers, PostgresEventStore};
use agentledger_eventstore::StoreError;
use agentledger_eventstore::{EventStore, Subscription};
use futures::FutureExt;
use tokio::sync::broadcast::error::RecvError;
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

/// How often a process reads every checkpoint besides the announcements.
const REREAD: Duration = Duration::from_secs(1);

/// Tuning for a runner.
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// Most events per transaction.
    pub batch_size: usize,
    /// Wait between attempts to take the lease or to reconnect.
    pub retry: Duration,
    /// Least time between two announcements of the checkpoint.
    pub announce_interval: Duration,
    /// How long a batch waits for more events before it is written, unless
    /// a reader of this process waits for one of its events (then at once)
    /// or it is full. Fewer, larger transactions when events come one by
    /// one; the read models of other processes' readers are this much later.
    pub linger: Duration,
    /// Where the runner reports restarts and what keeps it from working
    /// (task `projections`); `/ready` and `/metrics` read it.
    pub health: Health,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        Self {
            batch_size: 500,
            retry: Duration::from_secs(1),
            announce_interval: Duration::from_millis(2),
            linger: Duration::from_millis(5),
            health: Health::default(),
        }
    }
}

/// Each projection's last known checkpoint in this process: moved by local
/// runners and by other processes' announcements.
#[derive(Clone)]
pub struct Checkpoints {
    senders: Arc<HashMap<&'static str, watch::Sender<u64>>>,
    /// The highest position a reader of this process waits for.
    wanted: Arc<watch::Sender<u64>>,
    /// Whether other processes would hear an announcement (known once
    /// [`Checkpoints::follow_store`] runs; until then, assumed).
    peers: Arc<std::sync::OnceLock<Peers>>,
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
            wanted: Arc::new(watch::channel(0).0),
            peers: Arc::new(std::sync::OnceLock::new()),
        }
    }
}

impl Checkpoints {
    /// False only when this process knows no other listens: its runners
    /// then leave out the announcements nobody would hear.
    fn peers_present(&self) -> bool {
        self.peers.get().is_none_or(Peers::present)
    }

    /// A reader waits until every projection applied `position`: a runner
    /// of this process holding that event back commits its batch now.
    pub fn want(&self, position: u64) {
        self.wanted.send_if_modified(|p| {
            let more = position > *p;
            *p = (*p).max(position);
            more
        });
    }

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

    /// Follows the announcements of every process as `store`'s listener
    /// hears them, reading the table whenever it (re)starts listening,
    /// until `stop`. Costs no connection of its own.
    pub async fn follow_store(self, store: PostgresEventStore, stop: CancellationToken) {
        let _ = self.peers.set(store.peers());
        let mut notices = match store.notices(CHECKPOINT_CHANNEL) {
            Ok(notices) => notices,
            Err(e) => {
                tracing::error!(error = %e, "cannot follow checkpoints");
                return;
            }
        };
        // Announcements can be missed around a process joining (one that
        // believed itself alone commits a batch it did not announce just
        // after this one read the table): read it again now and then.
        let mut reread = tokio::time::interval(REREAD);
        reread.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let notice = tokio::select! {
                () = stop.cancelled() => return,
                notice = notices.recv() => notice,
                _ = reread.tick() => Ok(Notice::Resync),
            };
            match notice {
                Ok(Notice::Payload(payload)) => self.apply_announcement(&payload),
                // Listening (again), or announcements were dropped here:
                // the table has what they said.
                Ok(Notice::Resync) | Err(RecvError::Lagged(_)) => {
                    while let Err(e) = self.read_table(&store).await {
                        tracing::warn!(error = %e, "reading the checkpoints failed; retrying");
                        tokio::select! {
                            () = stop.cancelled() => return,
                            () = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                    }
                }
                Err(RecvError::Closed) => return,
            }
        }
    }

    async fn read_table(&self, store: &PostgresEventStore) -> Result<(), ProjectionError> {
        let client = store
            .pool()
            .get()
            .await
            .map_err(|e| ProjectionError::Store(StoreError::Unavailable(e.to_string())))?;
        for row in client
            .query("SELECT name, position FROM projection_checkpoints", &[])
            .await?
        {
            self.advance(row.get::<_, &str>(0), row.get::<_, i64>(1) as u64);
        }
        Ok(())
    }

    /// `name:position`, one per projection of the announcing runner,
    /// separated by commas.
    fn apply_announcement(&self, payload: &str) {
        for entry in payload.split(',') {
            if let Some((name, position)) = entry.split_once(':') {
                if let Ok(position) = position.parse() {
                    self.advance(name, position);
                }
            }
        }
    }

    /// Follows the table and the announcements of every process: reads the
    /// checkpoints, then listens (re-reading after every reconnect) until
    /// `stop`, on a dedicated connection (LISTEN needs one). A process with
    /// a [`PostgresEventStore`] uses [`Checkpoints::follow_store`] instead.
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
        // Listening: so say, or a process alone would not announce.
        client
            .execute(
                "SELECT pg_advisory_lock_shared($1)",
                &[&agentledger_eventstore::postgres::PRESENCE_LOCK],
            )
            .await?;
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
            self.apply_announcement(&payload);
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

/// A runner of one or more projections. Start with [`ProjectionRunner::spawn`].
pub struct ProjectionRunner {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl ProjectionRunner {
    /// Runs the projections `names` together until stopped: waits for all
    /// their leases, catches each up from its checkpoint, follows live,
    /// applying every batch to all of them in one transaction that moves
    /// their checkpoints. Errors are logged and retried (after
    /// `config.retry`), except a fault point, which ends the runner as a
    /// crash would.
    pub fn spawn(
        names: &[&str],
        url: String,
        store: Arc<dyn EventStore>,
        checkpoints: Checkpoints,
        config: RunnerConfig,
        fault: Option<RunnerFaultPlan>,
    ) -> Result<Self, ProjectionError> {
        if names.is_empty() {
            return Err(ProjectionError::Unknown("(no projection named)".into()));
        }
        let mut projections: Vec<Box<dyn Projection>> = Vec::with_capacity(names.len());
        for name in names {
            if projections.iter().any(|p| p.name() == *name) {
                return Err(ProjectionError::Unknown(format!("{name} (named twice)")));
            }
            projections.push(
                projection(name, store.clone())
                    .ok_or_else(|| ProjectionError::Unknown((*name).into()))?,
            );
        }
        let url = DatabaseUrl::parse(&url)?;
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(
            projections,
            url,
            store,
            checkpoints,
            config,
            fault,
            stop.clone(),
        ));
        Ok(Self { stop, task })
    }

    /// Stops the runner and waits for it (its leases go with its connection).
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
    mut projections: Vec<Box<dyn Projection>>,
    url: DatabaseUrl,
    store: Arc<dyn EventStore>,
    checkpoints: Checkpoints,
    config: RunnerConfig,
    fault: Option<RunnerFaultPlan>,
    stop: CancellationToken,
) {
    let names = projections
        .iter()
        .map(|p| p.name())
        .collect::<Vec<_>>()
        .join(",");
    let health = &config.health;
    health.register(TASK);
    loop {
        // A panic while applying a batch is a failure like any other: the
        // runner starts over from the checkpoints, and counts it.
        let leading = std::panic::AssertUnwindSafe(lead(
            &mut projections,
            &url,
            &*store,
            &checkpoints,
            &config,
            fault.as_ref(),
            &stop,
        ))
        .catch_unwind();
        let result = tokio::select! {
            () = stop.cancelled() => return,
            result = leading => result.unwrap_or_else(|panic| Err(ProjectionError::Panicked(panic_message(&*panic)))),
        };
        match result {
            Ok(()) => return,
            Err(ProjectionError::Fault) => {
                tracing::warn!(projection = names, "runner stopped at a fault point");
                health.stopped(TASK, "a fault point");
                return;
            }
            Err(ProjectionError::Corrupt(e)) => {
                tracing::error!(projection = names, error = %e, "projection stopped: unreadable event");
                health.stopped(TASK, format!("unreadable event: {e}"));
                return;
            }
            Err(e) => {
                tracing::warn!(projection = names, error = %e, "projection runner restarting");
                health.restarted(TASK, format!("restarting after: {e}"));
            }
        }
        for projection in &mut projections {
            projection.reset();
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(config.retry) => {}
        }
    }
}

/// The runner's name in [`Health`].
pub const TASK: &str = "projections";

/// Takes every lease of `keys` on `client`, or none: a partial set is
/// released, so that two runners wanting overlapping sets cannot hold
/// each other off forever.
async fn take_leases(client: &Client, keys: &[i64]) -> Result<bool, tokio_postgres::Error> {
    let taken: Vec<i64> = client
        .query(
            "SELECT k FROM unnest($1::int8[]) AS k WHERE pg_try_advisory_lock(k)",
            &[&keys],
        )
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    if taken.len() == keys.len() {
        return Ok(true);
    }
    if !taken.is_empty() {
        client
            .execute(
                "SELECT pg_advisory_unlock(k) FROM unnest($1::int8[]) AS k",
                &[&taken],
            )
            .await?;
    }
    Ok(false)
}

/// Takes the leases and applies batches until an error or `stop`.
async fn lead(
    projections: &mut [Box<dyn Projection>],
    url: &DatabaseUrl,
    store: &dyn EventStore,
    checkpoints: &Checkpoints,
    config: &RunnerConfig,
    fault: Option<&RunnerFaultPlan>,
    stop: &CancellationToken,
) -> Result<(), ProjectionError> {
    let names: Vec<&'static str> = projections.iter().map(|p| p.name()).collect();
    let keys: Vec<i64> = projections.iter().map(|p| p.lock_key()).collect();
    let mut client = connect_lease(url).await?;
    while !take_leases(&client, &keys).await? {
        // Another process leads: standing by is working.
        config.health.recovered(TASK);
        tokio::select! {
            () = stop.cancelled() => return Ok(()),
            () = tokio::time::sleep(config.retry) => {}
        }
    }
    // The leases are ours: a new token fences out whoever held them before.
    let token = Uuid::new_v4();
    let rows = client
        .query(
            "INSERT INTO projection_checkpoints (name, position, lease_token)
             SELECT n, 0, $2 FROM unnest($1::text[]) AS n
             ON CONFLICT (name) DO UPDATE SET lease_token = EXCLUDED.lease_token
             RETURNING name, position",
            &[&names, &token],
        )
        .await?;
    let mut positions: Vec<u64> = names
        .iter()
        .map(|name| {
            rows.iter()
                .find(|row| row.get::<_, &str>(0) == *name)
                .map_or(0, |row| row.get::<_, i64>(1) as u64)
        })
        .collect();
    for (projection, position) in projections.iter_mut().zip(&positions) {
        projection.reset();
        checkpoints.advance(projection.name(), *position);
        tracing::info!(
            projection = projection.name(),
            position,
            "projection lease taken"
        );
    }
    let from = positions.iter().copied().min().unwrap_or(0);
    // Nothing to apply: working. Otherwise, once a batch is committed.
    if store.head_position().await? <= from {
        config.health.recovered(TASK);
    }
    let mut events = store.subscribe_all(from + 1);
    let mut wanted = checkpoints.wanted.subscribe();
    let mut announced = Instant::now() - config.announce_interval;
    loop {
        let batch = tokio::select! {
            () = stop.cancelled() => return Ok(()),
            batch = next_batch(&mut events, config.batch_size, config.linger, &mut wanted) => batch?,
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
        // Each projection takes the facts past its own checkpoint (they
        // differ after a rebuild of one of them); their statements share
        // the connection's pipeline.
        futures::future::try_join_all(projections.iter_mut().zip(&positions).map(
            |(projection, position)| {
                let from = facts.partition_point(|f| f.recorded.global_position <= *position);
                projection.apply(&tx, "", &facts[from..])
            },
        ))
        .await?;
        if strikes(RunnerFault::AfterRows) {
            return Err(ProjectionError::Fault);
        }
        let moved_to: Vec<i64> = positions.iter().map(|p| (*p).max(last) as i64).collect();
        let expected: Vec<i64> = positions.iter().map(|p| *p as i64).collect();
        let moved = tx
            .execute(
                "UPDATE projection_checkpoints AS c SET position = u.moved_to
                   FROM unnest($1::text[], $2::int8[], $3::int8[]) AS u(name, expected, moved_to)
                  WHERE c.name = u.name AND c.position = u.expected AND c.lease_token = $4",
                &[&names, &expected, &moved_to, &token],
            )
            .await?;
        if moved != names.len() as u64 {
            drop(tx);
            return Err(ProjectionError::LeaseLost);
        }
        // Announce at most once per interval, and always when caught up;
        // inside the transaction, so that the announcement is delivered
        // with the commit and costs no transaction of its own. One
        // announcement carries every projection of the runner; none when
        // no other process listens (this one's readers watch the
        // checkpoints in memory).
        let announce = (!full || announced.elapsed() >= config.announce_interval)
            && checkpoints.peers_present();
        if announce {
            let payload = names
                .iter()
                .zip(&moved_to)
                .map(|(name, position)| format!("{name}:{position}"))
                .collect::<Vec<_>>()
                .join(",");
            tx.execute("SELECT pg_notify($1, $2)", &[&CHECKPOINT_CHANNEL, &payload])
                .await?;
        }
        if strikes(RunnerFault::BeforeCommit) {
            return Err(ProjectionError::Fault);
        }
        tx.commit().await?;
        config.health.recovered(TASK);
        if announce {
            announced = Instant::now();
        }
        for ((name, position), moved_to) in names.iter().zip(&mut positions).zip(&moved_to) {
            *position = *moved_to as u64;
            checkpoints.advance(name, *position);
        }
        if strikes(RunnerFault::AfterCommit) {
            return Err(ProjectionError::Fault);
        }
    }
}

/// The next batch: waits for one event, takes what is ready, then waits up
/// to `linger` for more, unless `max` is reached or a reader wants one of
/// its events (`wanted` reaches the batch).
async fn next_batch(
    events: &mut Subscription,
    max: usize,
    linger: Duration,
    wanted: &mut watch::Receiver<u64>,
) -> Result<Vec<Arc<agentledger_eventstore::RecordedEvent>>, ProjectionError> {
    let first = match events.next().await {
        Some(event) => event?,
        None => return Ok(Vec::new()),
    };
    let start = first.global_position;
    let mut batch = vec![first];
    let deadline = tokio::time::Instant::now() + linger;
    while batch.len() < max {
        if let Some(next) = events.next().now_or_never() {
            match next {
                Some(event) => batch.push(event?),
                None => break,
            }
            continue;
        }
        if linger.is_zero() || *wanted.borrow_and_update() >= start {
            break;
        }
        tokio::select! {
            next = events.next() => match next {
                Some(event) => batch.push(event?),
                None => break,
            },
            changed = wanted.changed() => if changed.is_err() {
                tokio::time::sleep_until(deadline).await;
                break;
            },
            () = tokio::time::sleep_until(deadline) => break,
        }
    }
    Ok(batch)
}
