//! The PostgreSQL event store.
//!
//! - **Writes** go through writer tasks ([`writer`]) that group-commit every
//!   append waiting at that moment in one statement. Appends of all
//!   processes run in parallel and take positions from a sequence, marked in
//!   flight until they commit; readers of `$all` read only up to the
//!   low-water mark below which nothing can still commit (`events_read_all`
//!   in the migration), which is what makes `$all` safe to resume by position.
//! - **Live events** come from one tailer task per process ([`tailer`]) that
//!   reads new rows from the table and broadcasts them to every subscriber.
//!   It wakes up on this process's own commits, on `NOTIFY` from other
//!   processes (dedicated `LISTEN` connection, coalesced NOTIFY sent after
//!   commit), and on a slow safety poll.

mod rows;
mod tailer;
mod tiles;
mod tls;
mod writer;

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use futures::future::BoxFuture;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::prepare::{prepare, Limits};
use crate::subscription::{StreamRouter, Subscription};
use crate::{
    AppendResult, EventStore, ExpectedVersion, NewEvent, Page, Position, ReadFrom, RecordedEvent,
    StoreError, StreamId,
};

pub use rows::EVENT_COLUMNS;
pub use tiles::PostgresTiles;
pub use tls::{Connection, DatabaseUrl, TlsMode};

/// The channel other processes' commits are announced on.
pub const NOTIFY_CHANNEL: &str = "agentledger_events";

/// The advisory lock every process holds, shared, on its listening
/// connection: how a process learns whether another would hear its
/// announcements (design: a process alone sends none).
pub const PRESENCE_LOCK: i64 = 0x6167_6c65_6467_0004;

/// Whether other processes listen on this process's database, as its
/// listener last found out. Starts (and after every reconnect restarts)
/// as "yes": a process goes quiet only after two checks a poll apart found
/// no other holder of [`PRESENCE_LOCK`] and nothing was heard from another
/// process between them; any other process's announcement (a joining
/// process sends one as soon as it listens) makes it "yes" again at once.
#[derive(Clone)]
pub struct Peers(Arc<PeersInner>);

struct PeersInner {
    present: std::sync::atomic::AtomicBool,
    /// Announcements heard from other processes, ever.
    heard: std::sync::atomic::AtomicU64,
}

impl Default for Peers {
    fn default() -> Self {
        Self(Arc::new(PeersInner {
            present: std::sync::atomic::AtomicBool::new(true),
            heard: std::sync::atomic::AtomicU64::new(0),
        }))
    }
}

impl Peers {
    /// True unless this process knows itself alone on the database.
    pub fn present(&self) -> bool {
        self.0.present.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub(crate) fn heard_from_one(&self) {
        self.0
            .heard
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.0
            .present
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    pub(crate) fn heard(&self) -> u64 {
        self.0.heard.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub(crate) fn set(&self, present: bool) {
        self.0
            .present
            .store(present, std::sync::atomic::Ordering::SeqCst);
    }
}

/// What a process's one `LISTEN` connection hears on another channel
/// ([`PostgresEventStore::notices`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// A notification's payload.
    Payload(String),
    /// The listener is (again) listening on the channel: whatever was
    /// announced while it was not is lost, so read the state afresh.
    Resync,
}

/// The channels a process's listener serves besides the events' own.
#[derive(Default)]
pub(crate) struct Channels {
    senders: std::sync::Mutex<HashMap<String, broadcast::Sender<Notice>>>,
    /// Signalled when a channel is added.
    pub added: tokio::sync::Notify,
}

impl Channels {
    fn subscribe(&self, channel: &str) -> broadcast::Receiver<Notice> {
        let mut senders = self.senders.lock().expect("channels lock");
        if let Some(sender) = senders.get(channel) {
            return sender.subscribe();
        }
        let (sender, receiver) = broadcast::channel(1_024);
        senders.insert(channel.to_string(), sender);
        drop(senders);
        self.added.notify_one();
        receiver
    }

    pub fn names(&self) -> Vec<String> {
        self.senders
            .lock()
            .expect("channels lock")
            .keys()
            .cloned()
            .collect()
    }

    pub fn send(&self, channel: &str, notice: Notice) {
        if let Some(sender) = self.senders.lock().expect("channels lock").get(channel) {
            // Nobody listening right now is fine.
            let _ = sender.send(notice);
        }
    }
}

/// The advisory lock key of the gate between taking positions and computing
/// the low-water mark (the value used by the migration's functions).
pub const GATE_LOCK: i64 = 0x6167_6c65_6467_0003;

/// Tuning for [`PostgresEventStore`].
#[derive(Clone)]
pub struct PostgresOptions {
    /// Pooled connections for reads (the writer and the listener have their own).
    pub pool_size: usize,
    /// Input limits.
    pub limits: Limits,
    /// Most events one group commit takes (a single larger append still goes alone).
    pub max_group_events: usize,
    /// Writer tasks, each with its own connection; a stream always goes to
    /// the same one. More lanes commit more groups in parallel; fewer make
    /// bigger groups.
    pub writer_lanes: usize,
    /// How often the tailer looks for new events when no wake-up came.
    pub safety_poll: Duration,
    /// Least time between two NOTIFYs this process sends: the first commit
    /// of a burst is announced at once, the rest at most this much later.
    /// Every listening backend of the database pays a transaction per
    /// NOTIFY, so a burst is announced once or twice, not per commit.
    pub notify_interval: Duration,
    /// A fault point for scripted tests: awaited after a group's rows are
    /// inserted and before its `COMMIT`, with the append lock held.
    pub before_commit: Option<CommitHook>,
    /// `statement_timeout` of every connection (pool, writer lanes, tailer,
    /// listener): no statement of the service may hold the database longer.
    /// `None` keeps the server's setting (tools such as rebuild).
    pub statement_timeout: Option<Duration>,
    /// How long a caller waits for a pooled connection before the store
    /// answers `Unavailable` rather than queueing without end.
    pub pool_wait: Duration,
    /// How often the listener looks for other processes ([`Peers`]).
    pub presence_check: Duration,
}

/// See [`PostgresOptions::before_commit`].
pub type CommitHook = Arc<dyn Fn() -> BoxFuture<'static, ()> + Send + Sync>;

impl Default for PostgresOptions {
    fn default() -> Self {
        Self {
            pool_size: 16,
            limits: Limits::default(),
            max_group_events: 2_000,
            writer_lanes: 2,
            safety_poll: Duration::from_secs(1),
            statement_timeout: None,
            pool_wait: Duration::from_secs(10),
            notify_interval: Duration::from_millis(5),
            presence_check: Duration::from_secs(1),
            before_commit: None,
        }
    }
}

/// An event store on PostgreSQL. Cheap to clone: clones share the pool and tasks.
#[derive(Clone)]
pub struct PostgresEventStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    /// One queue per writer lane.
    appends: Vec<mpsc::Sender<writer::AppendRequest>>,
    live: broadcast::Sender<Arc<RecordedEvent>>,
    channels: Arc<Channels>,
    peers: Peers,
    /// Started on the first stream subscription (it needs a runtime).
    router: OnceLock<Arc<StreamRouter>>,
    limits: Limits,
    stop: CancellationToken,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A small pool of connections to `database_url`, for what the service does
/// with another role than its own (signing digests with the owner role).
pub fn pool(database_url: &str, size: usize) -> Result<Pool, StoreError> {
    let url = DatabaseUrl::parse(database_url)?;
    let manager = Manager::from_config(
        url.config().clone(),
        url.connector(),
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(size.max(1))
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .wait_timeout(Some(Duration::from_secs(10)))
        .build()
        .map_err(|e| StoreError::Unavailable(e.to_string()))
}

impl PostgresEventStore {
    /// Connects to `database_url` (the service's role is enough) and starts
    /// the writer and tailer tasks. The schema must be migrated already.
    pub async fn connect(database_url: &str, options: PostgresOptions) -> Result<Self, StoreError> {
        let mut url = DatabaseUrl::parse(database_url)?;
        let config = url.config_mut();
        if let Some(timeout) = options.statement_timeout {
            let ours = format!("-c statement_timeout={}", timeout.as_millis().max(1));
            let options = match config.get_options() {
                Some(theirs) => format!("{theirs} {ours}"),
                None => ours,
            };
            config.options(&options);
        }
        let manager = Manager::from_config(
            url.config().clone(),
            url.connector(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(options.pool_size)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(options.pool_wait))
            .build()
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        let start = rows::head_position(&pool.get().await?).await?;

        let stop = CancellationToken::new();
        let committed = Arc::new(writer::Commits::default());
        let (live, _) = broadcast::channel(crate::LIVE_BUFFER);
        let appends = (0..options.writer_lanes.max(1))
            .map(|_| {
                let (appends, requests) = mpsc::channel(1_024);
                let writer = writer::Writer::new(
                    url.clone(),
                    options.max_group_events,
                    committed.clone(),
                    options.before_commit.clone(),
                );
                tokio::spawn(writer.run(requests));
                appends
            })
            .collect();
        let channels = Arc::new(Channels::default());
        let peers = Peers::default();
        let tailer = tailer::Tailer {
            url,
            channels: channels.clone(),
            peers: peers.clone(),
            presence_check: options.presence_check,
            pool: pool.clone(),
            live: live.clone(),
            committed,
            last: start,
            pending: Default::default(),
            safety_poll: options.safety_poll,
            notify_interval: options.notify_interval,
        };
        tokio::spawn(tailer.run(stop.clone()));

        Ok(Self {
            inner: Arc::new(Inner {
                pool,
                appends,
                live,
                channels,
                peers,
                router: OnceLock::new(),
                limits: options.limits,
                stop,
            }),
        })
    }

    /// The read pool (for tools and tests that need plain SQL).
    pub fn pool(&self) -> &Pool {
        &self.inner.pool
    }

    /// Whether other processes listen on this database (see [`Peers`]):
    /// announcements that only they would hear may be left out while not.
    pub fn peers(&self) -> Peers {
        self.inner.peers.clone()
    }

    /// Notifications on `channel`, heard on the connection this process
    /// already keeps for the events' own: every listening connection costs
    /// the server a transaction per notification sent in the database, so
    /// a process keeps one. A [`Notice::Resync`] comes each time the
    /// listener starts listening on it (first, and after a reconnect).
    /// Channel names are identifiers of ASCII letters, digits and `_`.
    pub fn notices(&self, channel: &str) -> Result<broadcast::Receiver<Notice>, StoreError> {
        if channel.is_empty()
            || channel.len() > 63
            || !channel
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            return Err(StoreError::BadInput(format!(
                "{channel:?} is not a channel name"
            )));
        }
        Ok(self.inner.channels.subscribe(channel))
    }
}

/// `url` (a URL or key=value connection string) pointed at another database
/// and, optionally, another user, as a key=value string. Used by tools that
/// create scratch databases (tests, `agentledger bench`).
pub fn connection_string(
    url: &str,
    database: &str,
    user: Option<&str>,
) -> Result<String, StoreError> {
    use tokio_postgres::config::Host;
    let parsed = DatabaseUrl::parse(url)?;
    let config = parsed.config();
    let quote = tls::quote;
    let mut parts = Vec::new();
    if let Some(host) = config.get_hosts().first() {
        match host {
            Host::Tcp(h) => parts.push(format!("host={}", quote(h))),
            Host::Unix(path) => parts.push(format!("host={}", quote(&path.display().to_string()))),
        }
    }
    if let Some(port) = config.get_ports().first() {
        parts.push(format!("port={port}"));
    }
    if let Some(user) = user.or(config.get_user()) {
        parts.push(format!("user={}", quote(user)));
    }
    if let (None, Some(password)) = (user, config.get_password()) {
        parts.push(format!(
            "password={}",
            quote(&String::from_utf8_lossy(password))
        ));
    }
    parts.push(format!("dbname={}", quote(database)));
    parts.extend(parsed.tls_pairs());
    Ok(parts.join(" "))
}

/// Picks a stream's writer lane; any stable hash does.
fn stream_hash(stream: &StreamId) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    stream.hash(&mut hasher);
    hasher.finish()
}

#[async_trait]
impl EventStore for PostgresEventStore {
    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult, StoreError> {
        let events = prepare(stream, events, &self.inner.limits)?;
        let (reply, answer) = oneshot::channel();
        let lanes = &self.inner.appends;
        let lane = &lanes[(stream_hash(stream) % lanes.len() as u64) as usize];
        let request = writer::AppendRequest {
            stream: stream.clone(),
            expected,
            events,
            reply,
        };
        lane.send(request).await.map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    async fn read_stream(
        &self,
        stream: &StreamId,
        from_version: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let client = self.inner.pool.get().await?;
        rows::read_stream(&client, stream, from_version, limit).await
    }

    async fn read_all(
        &self,
        from_position: Position,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let client = self.inner.pool.get().await?;
        rows::read_all(&client, from_position, limit).await
    }

    async fn read_page(
        &self,
        from: ReadFrom<'_>,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Page, StoreError> {
        let client = self.inner.pool.get().await?;
        rows::read_page(&client, from, limit, max_bytes).await
    }

    async fn read_range(
        &self,
        from_position: Position,
        to_position: Position,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let client = self.inner.pool.get().await?;
        rows::read_range(&client, from_position, to_position, limit).await
    }

    async fn read_range_canonical(
        &self,
        from_position: Position,
        to_position: Position,
        limit: usize,
    ) -> Result<Vec<crate::CanonicalEvent>, StoreError> {
        let client = self.inner.pool.get().await?;
        rows::read_range_canonical(&client, from_position, to_position, limit).await
    }

    async fn head_position(&self) -> Result<Position, StoreError> {
        let client = self.inner.pool.get().await?;
        rows::head_position(&client).await
    }

    fn subscribe_all(&self, from_position: Position) -> Subscription {
        Subscription::all(
            Arc::new(self.clone()),
            self.inner.live.subscribe(),
            from_position,
        )
    }

    fn subscribe_stream(&self, stream: StreamId, from_version: u64) -> Subscription {
        Subscription::stream(
            Arc::new(self.clone()),
            self.inner
                .router
                .get_or_init(|| StreamRouter::start(&self.inner.live)),
            stream,
            from_version,
        )
    }
}
