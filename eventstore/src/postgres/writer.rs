//! The writer task: group commit under a transaction-scoped advisory lock.
//!
//! Every append waiting when the writer is free goes into one transaction.
//! The transaction takes the append lock before it reads or writes anything,
//! so transactions of all processes commit one at a time: positions are
//! assigned as head + 1, + 2, … — gap-free and committed in position order.
//!
//! Two ways to commit a group:
//! - **fast** (one round trip, pipelined: `BEGIN`, lock, insert, `COMMIT`):
//!   when this writer made the store's last commit, it knows the head
//!   position and the heads of the streams it wrote, and builds the rows from
//!   that. The insert is conditional on the head position still being what
//!   it remembers, and the unique keys refuse anything its memory got wrong
//!   (a stream it believed new, a resent event id); then it falls back.
//! - **checked** (two round trips): read the head position, the heads of the
//!   streams involved and any stored event ids under the lock, decide each
//!   append (conflict, idempotent resend, or write), insert, commit.
//!
//! Each append in a group is decided on its own: one conflict fails alone.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_postgres::error::SqlState;
use bytes::{BufMut, BytesMut};
use tokio_postgres::types::{to_sql_checked, IsNull, ToSql, Type};
use tokio_postgres::{Client, NoTls, Statement};
use uuid::Uuid;

use super::rows::{decode, to_i64, EVENT_COLUMNS};
use super::{CommitHook, APPEND_LOCK};
use crate::append::{decide, now_micros, written, Existing, NewRecord, Outcome, StreamHead};
use crate::chain::HASH_VERSION;
use crate::prepare::PreparedEvent;
use crate::{AppendResult, ExpectedVersion, Position, RecordedEvent, StoreError, StreamId};

/// Streams whose heads the writer remembers; beyond this it forgets them all
/// (workflow streams go quiet once finished, so a rare reset costs little).
const MAX_CACHED_STREAMS: usize = 100_000;

pub(crate) struct AppendRequest {
    pub stream: StreamId,
    pub expected: ExpectedVersion,
    pub events: Vec<PreparedEvent>,
    pub reply: oneshot::Sender<Result<AppendResult, StoreError>>,
}

type Request = (StreamId, ExpectedVersion, Vec<PreparedEvent>);
type Results = Vec<Result<AppendResult, StoreError>>;

pub(crate) struct Writer {
    config: tokio_postgres::Config,
    max_group_events: usize,
    committed: Arc<Notify>,
    before_commit: Option<CommitHook>,
    connection: Option<Connection>,
    memory: Memory,
}

/// What the writer knows of the store right after its own last commit.
#[derive(Default)]
struct Memory {
    /// The head position then; `None` when unknown.
    head: Option<Position>,
    streams: HashMap<StreamId, StreamHead>,
}

impl Memory {
    fn forget(&mut self) {
        self.head = None;
        self.streams.clear();
    }

    fn remember(&mut self, head: Position, streams: HashMap<StreamId, StreamHead>) {
        if self.streams.len() + streams.len() > MAX_CACHED_STREAMS {
            self.streams.clear();
        }
        self.head = Some(head);
        self.streams.extend(streams);
    }
}

impl Writer {
    pub fn new(
        config: tokio_postgres::Config,
        max_group_events: usize,
        committed: Arc<Notify>,
        before_commit: Option<CommitHook>,
    ) -> Self {
        Self { config, max_group_events, committed, before_commit, connection: None, memory: Memory::default() }
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
            self.commit_group(group).await;
        }
    }

    async fn commit_group(&mut self, group: Vec<AppendRequest>) {
        let (requests, replies): (Vec<Request>, Vec<_>) =
            group.into_iter().map(|r| ((r.stream, r.expected, r.events), r.reply)).unzip();
        match self.commit(&requests).await {
            Ok(results) => {
                if results.iter().any(|r| matches!(r, Ok(result) if !result.deduplicated)) {
                    self.committed.notify_one();
                }
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
                self.memory.forget();
                let message = e.to_string();
                let mut error = Some(e);
                for reply in replies {
                    let e = error.take().unwrap_or_else(|| StoreError::Pool(format!("group commit failed: {message}")));
                    let _ = reply.send(Err(e));
                }
            }
        }
    }

    /// Commits a group; the error means the transaction failed as a whole.
    async fn commit(&mut self, requests: &[Request]) -> Result<Results, StoreError> {
        if self.connection.as_ref().is_some_and(|c| c.client.is_closed()) {
            self.connection = None;
        }
        if self.connection.is_none() {
            self.connection = Some(connect(&self.config).await?);
        }
        let connection = self.connection.as_ref().expect("just connected");
        let hook = self.before_commit.as_ref();

        if let Some(plan) = plan_from_memory(&self.memory, requests) {
            match commit_fast(connection, &plan, hook).await {
                Ok(true) => {
                    let Plan { results, head_after, heads, .. } = plan;
                    self.memory.remember(head_after, heads);
                    return Ok(results);
                }
                // Another process wrote, or memory was wrong: nothing was written.
                Ok(false) => self.memory.forget(),
                Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => self.memory.forget(),
                Err(e) => return Err(e.into()),
            }
        }
        let (results, head, heads) = commit_checked(connection, requests, hook).await?;
        self.memory.remember(head, heads);
        Ok(results)
    }
}

/// A group, decided: the rows to insert and what to answer.
struct Plan<'a> {
    results: Results,
    rows: InsertRows<'a>,
    /// Head position before and after the group.
    head_before: Position,
    head_after: Position,
    /// Heads of the streams involved, after the group.
    heads: HashMap<StreamId, StreamHead>,
}

/// Decides every append of a group against the given heads and stored events.
fn plan<'a>(
    requests: &'a [Request],
    head_before: Position,
    mut heads: HashMap<StreamId, StreamHead>,
    mut existing: HashMap<(&'a str, Uuid), Existing<'a>>,
    recorded_at: DateTime<Utc>,
) -> Plan<'a> {
    let mut next_position = head_before + 1;
    let mut rows = InsertRows::default();
    let results = requests
        .iter()
        .map(|(stream, expected, events)| {
            let found: Vec<Option<Existing<'_>>> =
                events.iter().map(|e| existing.get(&(stream.as_str(), e.event.event_id)).copied()).collect();
            let head = heads.get(stream).copied();
            match decide(stream, *expected, events, &found, head, next_position, recorded_at)? {
                Outcome::AlreadyStored(result) => Ok(result),
                Outcome::Write(records) => {
                    let last = records.last().expect("non-empty");
                    heads.insert(stream.clone(), StreamHead { version: last.stream_version, hash: last.hash });
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
                    Ok(written(&records))
                }
            }
        })
        .collect();
    Plan { results, rows, head_before, head_after: next_position - 1, heads }
}

/// A plan built from memory alone, when memory is enough to decide every
/// append as a write; `None` sends the group down the checked path.
fn plan_from_memory<'a>(memory: &Memory, requests: &'a [Request]) -> Option<Plan<'a>> {
    let head = memory.head?;
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
    let plan = plan(requests, head, heads, HashMap::new(), now_micros());
    // A conflict decided from memory is confirmed by the checked path.
    plan.results.iter().all(Result::is_ok).then_some(plan)
}

/// One statement, its own transaction: it takes the append lock, then
/// inserts only if the head position is still the remembered one.
/// `Ok(false)` when the head moved and nothing was written; a unique
/// violation when memory was wrong in another way (nothing written either).
///
/// The head is read before the lock is granted, so it may be stale; that is
/// safe because positions are the primary key: rows at positions another
/// process committed meanwhile are refused, never written twice.
async fn commit_fast(
    connection: &Connection,
    plan: &Plan<'_>,
    hook: Option<&CommitHook>,
) -> Result<bool, tokio_postgres::Error> {
    let Connection { client, statements: s } = connection;
    let head = to_i64(plan.head_before);
    let mut params = plan.rows.params();
    params.push(&head);
    params.push(&APPEND_LOCK);
    let inserted = match hook {
        None => client.execute(&s.insert_fast, &params).await?,
        Some(hook) => {
            client.execute(&s.begin, &[]).await?;
            let inserted = client.execute(&s.insert_fast, &params).await;
            if inserted.is_ok() {
                hook().await;
            }
            // After a failed insert the server turns the COMMIT into a rollback.
            client.execute(&s.commit, &[]).await?;
            inserted?
        }
    };
    Ok(inserted == plan.rows.len() as u64)
}

/// Two round trips: read under the lock, then insert and commit.
async fn commit_checked<'a>(
    connection: &Connection,
    requests: &'a [Request],
    hook: Option<&CommitHook>,
) -> Result<(Results, Position, HashMap<StreamId, StreamHead>), StoreError> {
    let Connection { client, statements: s } = connection;
    let mut streams: Vec<&str> = requests.iter().map(|(stream, ..)| stream.as_str()).collect();
    streams.sort_unstable();
    streams.dedup();
    let (id_streams, ids): (Vec<&str>, Vec<Uuid>) = requests
        .iter()
        .flat_map(|(stream, _, events)| events.iter().map(move |e| (stream.as_str(), e.event.event_id)))
        .unzip();
    let lock: [&(dyn ToSql + Sync); 1] = [&APPEND_LOCK];
    let heads_params: [&(dyn ToSql + Sync); 1] = [&streams];
    let stored_params: [&(dyn ToSql + Sync); 2] = [&id_streams, &ids];
    // Pipelined; each statement runs after the previous one, so after the lock is held.
    let (begin, lock, head, heads, stored) = tokio::join!(
        client.execute(&s.begin, &[]),
        client.execute(&s.lock, &lock),
        client.query_one(&s.head, &[]),
        client.query(&s.stream_heads, &heads_params),
        client.query(&s.stored, &stored_params),
    );
    let reads = (|| Ok::<_, tokio_postgres::Error>((begin?, lock?, head?, heads?, stored?)))();
    let (_, _, head, heads, stored) = match reads {
        Ok(reads) => reads,
        Err(e) => {
            rollback(client).await;
            return Err(e.into());
        }
    };
    let head = head.get::<_, i64>(0) as Position;
    let mut stream_heads = HashMap::with_capacity(heads.len());
    for row in &heads {
        let hash: &[u8] = row.get(2);
        let stream = StreamId::new(row.get::<_, String>(0))?;
        let version = row.get::<_, i64>(1) as u64;
        stream_heads.insert(stream, StreamHead { version, hash: hash.try_into().expect("hash is CHECKed to 32 bytes") });
    }
    let stored: Vec<RecordedEvent> = stored.iter().map(decode).collect::<Result<_, _>>()?;
    let existing = stored.iter().map(|e| ((e.stream_id.as_str(), e.event_id), Existing::Stored(e))).collect();

    let plan = plan(requests, head, stream_heads, existing, now_micros());
    let done = |plan: Plan<'_>| (plan.results, plan.head_after, plan.heads);
    if plan.rows.is_empty() {
        rollback(client).await;
        return Ok(done(plan));
    }
    let params = plan.rows.params();
    if let Some(hook) = hook {
        client.execute(&s.insert, &params).await?;
        hook().await;
        client.execute(&s.commit, &[]).await?;
        return Ok(done(plan));
    }
    let (insert, commit) = tokio::join!(client.execute(&s.insert, &params), client.execute(&s.commit, &[]));
    // A failed INSERT turns the COMMIT into a rollback: nothing was written.
    insert?;
    commit?;
    Ok(done(plan))
}

async fn rollback(client: &Client) {
    if let Err(e) = client.batch_execute("ROLLBACK").await {
        tracing::debug!(error = %e, "rollback failed; the connection will be replaced");
    }
}

struct Statements {
    begin: Statement,
    lock: Statement,
    head: Statement,
    stream_heads: Statement,
    stored: Statement,
    insert: Statement,
    insert_fast: Statement,
    commit: Statement,
}

struct Connection {
    client: Client,
    statements: Statements,
}

const INSERT_INTO: &str = "INSERT INTO events (global_position, stream_id, stream_version, event_id, event_type, \
     schema_version, payload, metadata, recorded_at, hash_version, prev_hash, hash)";

const UNNEST_ROWS: &str = "unnest($1::bigint[], $2::text[], $3::bigint[], $4::uuid[], $5::text[], $6::integer[], \
     $7::jsonb[], $8::jsonb[], $9::timestamptz[], $10::smallint[], $11::bytea[], $12::bytea[])";

async fn connect(config: &tokio_postgres::Config) -> Result<Connection, StoreError> {
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "append connection closed with an error");
        }
    });
    let statements = Statements {
        begin: client.prepare("BEGIN").await?,
        lock: client.prepare("SELECT pg_advisory_xact_lock($1)").await?,
        head: client.prepare("SELECT coalesce(max(global_position), 0) FROM events").await?,
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
        insert: client.prepare(&format!("{INSERT_INTO} SELECT * FROM {UNNEST_ROWS}")).await?,
        // The lock is taken before the first row is produced; the head is read
        // once (an InitPlan), and a moved head inserts nothing.
        insert_fast: client
            .prepare(&format!(
                "WITH lock AS MATERIALIZED (SELECT pg_advisory_xact_lock($14)) \
                 {INSERT_INTO} SELECT rows.* FROM lock, {UNNEST_ROWS} AS rows \
                 WHERE (SELECT coalesce(max(global_position), 0) FROM events) = $13"
            ))
            .await?,
        commit: client.prepare("COMMIT").await?,
    };
    Ok(Connection { client, statements })
}

/// Column arrays for the `unnest` insert, borrowing from the requests.
#[derive(Default)]
struct InsertRows<'a> {
    position: Vec<i64>,
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
    fn push(&mut self, stream: &'a StreamId, event: &'a PreparedEvent, record: &NewRecord, at: DateTime<Utc>) {
        self.position.push(to_i64(record.global_position));
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

    fn len(&self) -> usize {
        self.position.len()
    }

    fn is_empty(&self) -> bool {
        self.position.is_empty()
    }

    /// The twelve array parameters of [`UNNEST_ROWS`].
    fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        vec![
            &self.position,
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
    fn to_sql(&self, ty: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
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
