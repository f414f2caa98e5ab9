//! The writer task: group commit with optimistic concurrency.
//!
//! Every append waiting when the writer is free goes into one statement,
//! which is its own transaction: it takes positions for its rows from
//! `events_append` → `events_reserve` (a sequence, marked in flight for readers: see the
//! migration and ARCHITECTURE.md) and inserts them. Appenders never wait for
//! each other; the unique keys `(stream_id, stream_version)` and
//! `(stream_id, event_id)` are what make a stale belief fail.
//!
//! The rows' versions and hash links come from the stream heads: from the
//! writer's memory of its own commits when it has them (or when the append
//! expects a new stream), else read in a first round trip (the **checked**
//! path, which also finds resent event ids and decides conflicts). When a
//! belief turns out wrong (another process wrote the stream meanwhile, an id
//! was resent), the insert fails as a whole and the group is read and
//! decided again, a bounded number of times.
//!
//! Each append in a group is decided on its own: one conflict fails alone.
//! A stream always goes to the same writer (lane), so one process never
//! races itself.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::{BufMut, BytesMut};
use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{to_sql_checked, IsNull, ToSql, Type};
use tokio_postgres::{Client, Statement};

use super::DatabaseUrl;
use uuid::Uuid;

use super::rows::{decode, to_i64, EVENT_COLUMNS};
use super::CommitHook;
use crate::append::{decide, now_micros, written, Existing, NewRecord, Outcome, StreamHead};
use crate::chain::HASH_VERSION;
use crate::prepare::PreparedEvent;

/// What the writer lanes of a process tell its tailer: each committed
/// group's events (positions contiguous, in order), so that the tailer
/// can pass them on without reading them back, or an empty group when it
/// must read (a failed group settles its positions too); and a wake-up.
#[derive(Default)]
pub(crate) struct Commits {
    pub wake: Notify,
    groups: Mutex<Vec<Vec<Arc<RecordedEvent>>>>,
    /// Whether the tailer has subscribers to pass events to; without, the
    /// writer does not build them (an empty group then asks for a read,
    /// which is right should a subscriber have come meanwhile).
    pub wanted: std::sync::atomic::AtomicBool,
}

impl Commits {
    fn wanted(&self) -> bool {
        self.wanted.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn push(&self, group: Vec<Arc<RecordedEvent>>) {
        self.groups.lock().expect("commits lock").push(group);
    }

    /// The groups committed since the last call, in no particular order.
    pub fn take(&self) -> Vec<Vec<Arc<RecordedEvent>>> {
        std::mem::take(&mut *self.groups.lock().expect("commits lock"))
    }
}
use crate::{AppendResult, ExpectedVersion, Position, RecordedEvent, StoreError, StreamId};

/// Streams whose heads the writer remembers; beyond this it forgets them all
/// (workflow streams go quiet once finished, so a rare reset costs little).
const MAX_CACHED_STREAMS: usize = 100_000;

/// How often the checked path reads and tries again when concurrent appends
/// keep changing the group's streams.
const MAX_CHECKED_ATTEMPTS: u32 = 16;

pub(crate) struct AppendRequest {
    pub stream: StreamId,
    pub expected: ExpectedVersion,
    pub events: Vec<PreparedEvent>,
    pub reply: oneshot::Sender<Result<AppendResult, StoreError>>,
}

type Request = (StreamId, ExpectedVersion, Vec<PreparedEvent>);
type Results = Vec<Result<AppendResult, StoreError>>;

pub(crate) struct Writer {
    url: DatabaseUrl,
    max_group_events: usize,
    committed: Arc<Commits>,
    before_commit: Option<CommitHook>,
    connection: Option<Connection>,
    memory: Memory,
}

/// The heads of streams as this writer left them after its own commits.
#[derive(Default)]
struct Memory {
    streams: HashMap<StreamId, StreamHead>,
}

impl Memory {
    fn forget(&mut self, stream: &StreamId) {
        self.streams.remove(stream);
    }

    fn remember(&mut self, streams: HashMap<StreamId, StreamHead>) {
        if self.streams.len() + streams.len() > MAX_CACHED_STREAMS {
            self.streams.clear();
        }
        self.streams.extend(streams);
    }
}

impl Writer {
    pub fn new(
        url: DatabaseUrl,
        max_group_events: usize,
        committed: Arc<Commits>,
        before_commit: Option<CommitHook>,
    ) -> Self {
        Self {
            url,
            max_group_events,
            committed,
            before_commit,
            connection: None,
            memory: Memory::default(),
        }
    }

    /// Runs until every sender is gone (the store was dropped).
    pub async fn run(mut self, mut requests: mpsc::Receiver<AppendRequest>) {
        let mut carried: Option<AppendRequest> = None;
        loop {
            let first = match carried.take() {
                Some(request) => request,
                None => match requests.recv().await {
                    Some(request) => request,
                    None => return,
                },
            };
            let mut size = first.events.len();
            let mut group = vec![first];
            while size < self.max_group_events {
                match requests.try_recv() {
                    Ok(request) if size + request.events.len() > self.max_group_events => {
                        carried = Some(request);
                        break;
                    }
                    Ok(request) => {
                        size += request.events.len();
                        group.push(request);
                    }
                    Err(_) => break,
                }
            }
            // Rows go in stream order (stable: one stream's appends keep their
            // order), so that concurrent groups take index entries in the same
            // order and do not deadlock each other.
            group.sort_by(|a, b| a.stream.cmp(&b.stream));
            self.commit_group(group).await;
        }
    }

    async fn commit_group(&mut self, group: Vec<AppendRequest>) {
        let (requests, replies): (Vec<Request>, Vec<_>) = group
            .into_iter()
            .map(|r| ((r.stream, r.expected, r.events), r.reply))
            .unzip();
        let outcome = self.commit(&requests).await;
        // An empty group tells the tailer to read: nothing was written,
        // or the group failed and its positions may hide another's commit.
        self.committed.push(match &outcome {
            Ok((_, Some(events))) => events.clone(),
            _ => Vec::new(),
        });
        // Even a failed group may have moved the low-water mark (its
        // positions are settled now): let the tailer and other processes look.
        self.committed.wake.notify_one();
        match outcome {
            Ok((results, _)) => {
                for (reply, result) in replies.into_iter().zip(results) {
                    // The caller may have gone away; its append stands regardless.
                    let _ = reply.send(result);
                }
            }
            Err(e) => {
                // The transaction's fate is unknown (or it never started): start
                // afresh and tell every caller; resending is idempotent.
                tracing::warn!(error = %e, appends = replies.len(), "group commit failed");
                self.connection = None;
                self.memory = Memory::default();
                let message = e.to_string();
                let mut error = Some(e);
                for reply in replies {
                    let e = error.take().unwrap_or_else(|| {
                        StoreError::Unavailable(format!("group commit failed: {message}"))
                    });
                    let _ = reply.send(Err(e));
                }
            }
        }
    }

    /// Commits a group, with the events it wrote when they are contiguous
    /// (`None` when nothing was written); the error means the transaction
    /// failed as a whole.
    async fn commit(
        &mut self,
        requests: &[Request],
    ) -> Result<(Results, Option<Vec<Arc<RecordedEvent>>>), StoreError> {
        if self
            .connection
            .as_ref()
            .is_some_and(|c| c.client.is_closed())
        {
            self.connection = None;
        }
        if self.connection.is_none() {
            // What memory holds was learnt on the old connection: if the
            // server lost acknowledged commits (failover, restore), it is ahead.
            self.memory = Memory::default();
            self.connection = Some(connect(&self.url).await?);
        }
        let connection = self.connection.as_ref().expect("just connected");
        let hook = self.before_commit.as_ref();

        if let Some(plan) = plan_from_memory(&self.memory, requests) {
            match write(connection, &plan.rows, hook).await {
                Ok(first) => {
                    let events = self
                        .committed
                        .wanted()
                        .then(|| plan.rows.recorded(first))
                        .flatten();
                    let (results, heads) = plan.finish(first);
                    self.memory.remember(heads);
                    return Ok((results, events));
                }
                // Memory was wrong (another process wrote one of these streams,
                // or an id was resent): nothing was written; check instead.
                Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                    requests
                        .iter()
                        .for_each(|(stream, ..)| self.memory.forget(stream));
                }
                Err(e) => return Err(e.into()),
            }
        }
        for _ in 0..MAX_CHECKED_ATTEMPTS {
            let (heads, stored) = read_heads(connection, requests).await?;
            let existing = stored
                .iter()
                .map(|e| ((e.stream_id.as_str(), e.event_id), Existing::Stored(e)))
                .collect();
            let plan = plan(requests, heads, existing, now_micros());
            if plan.rows.is_empty() {
                return Ok((plan.finish(0).0, None));
            }
            match write(connection, &plan.rows, hook).await {
                Ok(first) => {
                    let events = self
                        .committed
                        .wanted()
                        .then(|| plan.rows.recorded(first))
                        .flatten();
                    let (results, heads) = plan.finish(first);
                    self.memory.remember(heads);
                    return Ok((results, events));
                }
                // A concurrent append got there first: read again.
                Err(e) if stale_belief(&e) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(StoreError::Contended {
            attempts: MAX_CHECKED_ATTEMPTS,
        })
    }
}

/// True when a write failed because concurrent appends touched the same
/// keys: nothing was written, and reading again decides the group anew. Rows
/// go in stream order, so a deadlock needs two groups whose beliefs crossed;
/// PostgreSQL resolves it by failing one, which then reads again.
fn stale_belief(e: &tokio_postgres::Error) -> bool {
    [
        SqlState::UNIQUE_VIOLATION,
        SqlState::T_R_DEADLOCK_DETECTED,
        SqlState::T_R_SERIALIZATION_FAILURE,
    ]
    .iter()
    .any(|code| e.code() == Some(code))
}

/// A group, decided: the rows to insert and what to answer. Positions of
/// new rows are row numbers (1, 2, …) until the commit tells the real ones.
struct Plan<'a> {
    results: Vec<Result<Decided, StoreError>>,
    rows: InsertRows<'a>,
    /// Heads of the streams involved, after the group.
    heads: HashMap<StreamId, StreamHead>,
}

/// One append's answer, with relative positions when it writes in this group.
enum Decided {
    Stored(AppendResult),
    Planned(AppendResult),
}

impl Plan<'_> {
    /// The answers, given the position the first row got.
    fn finish(self, first: Position) -> (Results, HashMap<StreamId, StreamHead>) {
        let real = |row: Position| first + row - 1;
        let results = self
            .results
            .into_iter()
            .map(|r| {
                r.map(|decided| match decided {
                    Decided::Stored(result) => result,
                    Decided::Planned(mut result) => {
                        result.first_position = real(result.first_position);
                        result.last_position = real(result.last_position);
                        result
                    }
                })
            })
            .collect();
        (results, self.heads)
    }
}

/// Decides every append of a group against the given heads and stored events.
fn plan<'a>(
    requests: &'a [Request],
    mut heads: HashMap<StreamId, StreamHead>,
    mut existing: HashMap<(&'a str, Uuid), Existing<'a>>,
    recorded_at: DateTime<Utc>,
) -> Plan<'a> {
    let mut next_position = 1;
    let mut rows = InsertRows::default();
    let results = requests
        .iter()
        .map(|(stream, expected, events)| {
            let found: Vec<Option<Existing<'_>>> = events
                .iter()
                .map(|e| existing.get(&(stream.as_str(), e.event.event_id)).copied())
                .collect();
            if found.iter().any(|f| matches!(f, Some(Existing::Stored(_))))
                && found
                    .iter()
                    .any(|f| matches!(f, Some(Existing::Planned { .. })))
            {
                // Ids split between the ledger and this very group: not a resend of one append.
                let event_id = events[0].event.event_id;
                return Err(StoreError::IdempotencyMismatch {
                    stream: stream.clone(),
                    event_id,
                });
            }
            let head = heads.get(stream).copied();
            let records = match decide(
                stream,
                *expected,
                events,
                &found,
                head,
                next_position,
                recorded_at,
            )? {
                Outcome::AlreadyStored(result)
                    if found.iter().all(|f| matches!(f, Some(Existing::Stored(_)))) =>
                {
                    return Ok(Decided::Stored(result));
                }
                Outcome::AlreadyStored(result) => return Ok(Decided::Planned(result)),
                Outcome::Write(records) => records,
            };
            let last = records.last().expect("non-empty");
            heads.insert(
                stream.clone(),
                StreamHead {
                    version: last.stream_version,
                    hash: last.hash,
                },
            );
            next_position = last.global_position + 1;
            for (event, record) in events.iter().zip(&records) {
                rows.push(stream, event, record, recorded_at);
                // A later append in this group may resend this id.
                let planned = Existing::Planned {
                    event,
                    position: record.global_position,
                    version: record.stream_version,
                };
                existing.insert((stream.as_str(), event.event.event_id), planned);
            }
            Ok(Decided::Planned(written(&records)))
        })
        .collect();
    Plan {
        results,
        rows,
        heads,
    }
}

/// A plan built from memory alone, when memory is enough to decide every
/// append as a write; `None` sends the group down the checked path.
fn plan_from_memory<'a>(memory: &Memory, requests: &'a [Request]) -> Option<Plan<'a>> {
    let mut heads = HashMap::new();
    for (stream, expected, _) in requests {
        match memory.streams.get(stream) {
            Some(h) => {
                heads.insert(stream.clone(), *h);
            }
            // Believed new; the (stream_id, stream_version) key checks the belief.
            None if *expected == ExpectedVersion::NoStream => {}
            None => return None,
        }
    }
    let plan = plan(requests, heads, HashMap::new(), now_micros());
    // A conflict decided from memory is confirmed by the checked path.
    plan.results.iter().all(Result::is_ok).then_some(plan)
}

/// Inserts `rows` in one statement that is its own transaction; returns the
/// position of the first (row n got `first + n - 1`).
async fn write(
    connection: &Connection,
    rows: &InsertRows<'_>,
    hook: Option<&CommitHook>,
) -> Result<Position, tokio_postgres::Error> {
    let Connection {
        client,
        statements: s,
    } = connection;
    let params = rows.params();
    let inserted = match hook {
        None => client.query_one(&s.insert, &params).await?,
        Some(hook) => {
            client.execute(&s.begin, &[]).await?;
            let inserted = client.query_one(&s.insert, &params).await;
            if inserted.is_ok() {
                hook().await;
            }
            // After a failed insert the server turns the COMMIT into a rollback.
            client.execute(&s.commit, &[]).await?;
            inserted?
        }
    };
    Ok(inserted.get::<_, i64>(0) as Position)
}

/// Reads the heads of the group's streams and any already stored ids, in
/// one round trip.
async fn read_heads(
    connection: &Connection,
    requests: &[Request],
) -> Result<(HashMap<StreamId, StreamHead>, Vec<RecordedEvent>), StoreError> {
    let Connection {
        client,
        statements: s,
    } = connection;
    let mut streams: Vec<&str> = requests
        .iter()
        .map(|(stream, ..)| stream.as_str())
        .collect();
    streams.sort_unstable();
    streams.dedup();
    let (id_streams, ids): (Vec<&str>, Vec<Uuid>) = requests
        .iter()
        .flat_map(|(stream, _, events)| {
            events
                .iter()
                .map(move |e| (stream.as_str(), e.event.event_id))
        })
        .unzip();
    let heads_params: [&(dyn ToSql + Sync); 1] = [&streams];
    let stored_params: [&(dyn ToSql + Sync); 2] = [&id_streams, &ids];
    let (heads, stored) = tokio::join!(
        client.query(&s.stream_heads, &heads_params),
        client.query(&s.stored, &stored_params)
    );
    let mut stream_heads = HashMap::new();
    for row in &heads? {
        let hash: &[u8] = row.get(2);
        let stream = StreamId::new(row.get::<_, String>(0))?;
        let version = row.get::<_, i64>(1) as u64;
        stream_heads.insert(
            stream,
            StreamHead {
                version,
                hash: hash.try_into().expect("hash is CHECKed to 32 bytes"),
            },
        );
    }
    let stored = stored?.iter().map(decode).collect::<Result<_, _>>()?;
    Ok((stream_heads, stored))
}

struct Statements {
    begin: Statement,
    stream_heads: Statement,
    stored: Statement,
    insert: Statement,
    commit: Statement,
}

struct Connection {
    client: Client,
    statements: Statements,
}

/// Takes a block of positions for the rows and inserts them, in
/// `events_append` (a `SECURITY DEFINER` function: the service role may
/// neither insert rows nor move the position sequence itself); returns the
/// block's first position.
const INSERT: &str = "SELECT events_append($1::text[], $2::bigint[], $3::uuid[], $4::text[], \
     $5::integer[], $6::jsonb[], $7::jsonb[], $8::timestamptz[], $9::smallint[], $10::bytea[], \
     $11::bytea[])";

async fn connect(url: &DatabaseUrl) -> Result<Connection, StoreError> {
    let (client, connection) = url.connect().await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "append connection closed with an error");
        }
    });
    let statements = Statements {
        // Positions rely on a fresh snapshot per statement, whatever the server default.
        begin: client
            .prepare("BEGIN ISOLATION LEVEL READ COMMITTED")
            .await?,
        // One backward index probe per stream.
        stream_heads: client
            .prepare(
                "SELECT s.stream_id, e.stream_version, e.hash \
                 FROM unnest($1::text[]) AS s(stream_id) \
                 CROSS JOIN LATERAL (SELECT stream_version, hash FROM events \
                     WHERE events.stream_id = s.stream_id ORDER BY stream_version DESC LIMIT 1) e",
            )
            .await?,
        // One index probe per id (a generic plan must not choose a scan).
        stored: client
            .prepare(&format!(
                "SELECT e.* FROM unnest($1::text[], $2::uuid[]) AS k(stream_id, event_id) \
                 CROSS JOIN LATERAL (SELECT {EVENT_COLUMNS} FROM events \
                     WHERE events.stream_id = k.stream_id AND events.event_id = k.event_id) e"
            ))
            .await?,
        insert: client.prepare(INSERT).await?,
        commit: client.prepare("COMMIT").await?,
    };
    Ok(Connection { client, statements })
}

/// Column arrays for the `unnest` insert, borrowing from the requests.
#[derive(Default)]
struct InsertRows<'a> {
    stream_id: Vec<&'a str>,
    stream_version: Vec<i64>,
    event_id: Vec<Uuid>,
    event_type: Vec<&'a str>,
    schema_version: Vec<i32>,
    payload: Vec<Jsonb<'a>>,
    metadata: Vec<Jsonb<'a>>,
    recorded_at: Vec<DateTime<Utc>>,
    hash_version: Vec<i16>,
    prev_hash: Vec<Vec<u8>>,
    hash: Vec<Vec<u8>>,
}

impl<'a> InsertRows<'a> {
    fn push(
        &mut self,
        stream: &'a StreamId,
        event: &'a PreparedEvent,
        record: &NewRecord,
        at: DateTime<Utc>,
    ) {
        self.stream_id.push(stream.as_str());
        self.stream_version.push(to_i64(record.stream_version));
        self.event_id.push(event.event.event_id);
        self.event_type.push(&event.event.event_type);
        self.schema_version.push(event.event.schema_version as i32);
        self.payload.push(Jsonb(&event.payload_json));
        self.metadata.push(Jsonb(&event.metadata_json));
        self.recorded_at.push(at);
        self.hash_version.push(HASH_VERSION as i16);
        self.prev_hash.push(record.prev_hash.to_vec());
        self.hash.push(record.hash.to_vec());
    }

    fn is_empty(&self) -> bool {
        self.event_id.is_empty()
    }

    /// The rows as the store will read them back, row n at `first + n - 1`:
    /// the documents are parsed from the bytes that were stored (canonical
    /// JSON, which `jsonb` keeps equal as a value). `None` if one does not
    /// parse (it cannot: the bytes were encoded here), so the tailer reads.
    fn recorded(&self, first: Position) -> Option<Vec<Arc<RecordedEvent>>> {
        (0..self.event_id.len())
            .map(|i| {
                Some(Arc::new(RecordedEvent {
                    global_position: first + i as Position,
                    stream_id: StreamId::new(self.stream_id[i]).ok()?,
                    stream_version: self.stream_version[i] as u64,
                    event_id: self.event_id[i],
                    event_type: self.event_type[i].to_string(),
                    schema_version: self.schema_version[i] as u32,
                    payload: serde_json::from_slice(self.payload[i].0).ok()?,
                    metadata: serde_json::from_slice(self.metadata[i].0).ok()?,
                    recorded_at: self.recorded_at[i],
                    hash_version: self.hash_version[i] as u16,
                    prev_hash: self.prev_hash[i].as_slice().try_into().ok()?,
                    hash: self.hash[i].as_slice().try_into().ok()?,
                }))
            })
            .collect()
    }

    /// The eleven array parameters of [`INSERT`] (the row count is the twelfth).
    fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        vec![
            &self.stream_id,
            &self.stream_version,
            &self.event_id,
            &self.event_type,
            &self.schema_version,
            &self.payload,
            &self.metadata,
            &self.recorded_at,
            &self.hash_version,
            &self.prev_hash,
            &self.hash,
        ]
    }
}

/// JSON text already in canonical form, sent to a `jsonb` parameter as is
/// (no second serialisation).
#[derive(Debug)]
struct Jsonb<'a>(&'a [u8]);

impl ToSql for Jsonb<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        if *ty == Type::JSONB {
            out.put_u8(1); // jsonb binary format version
        }
        out.extend_from_slice(self.0);
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::JSONB || *ty == Type::JSON
    }

    to_sql_checked!();
}
