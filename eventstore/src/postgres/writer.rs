//! The writer task: group commit under a transaction-scoped advisory lock.
//!
//! Each batch is one transaction in two round trips, pipelined:
//! 1. `BEGIN`; take the append lock; read the head position, the heads of
//!    the streams involved and any already stored ids (idempotent resends);
//! 2. insert every new row with one `INSERT … SELECT FROM unnest(…)`; `COMMIT`.
//!
//! The lock is taken before anything is read, so every read sees every
//! earlier commit, and positions are assigned as head + 1, + 2, …: gap-free,
//! and committed in position order across all processes. Each append in the
//! batch is decided on its own: one conflicting append fails alone.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls, Statement};
use uuid::Uuid;

use super::rows::{decode, to_i64, EVENT_COLUMNS};
use super::{CommitHook, APPEND_LOCK};
use crate::append::{decide, now_micros, written, Outcome, StreamHead};
use crate::prepare::PreparedEvent;
use crate::{AppendResult, ExpectedVersion, Position, RecordedEvent, StoreError, StreamId};

pub(crate) struct AppendRequest {
    pub stream: StreamId,
    pub expected: ExpectedVersion,
    pub events: Vec<PreparedEvent>,
    pub reply: oneshot::Sender<Result<AppendResult, StoreError>>,
}

struct Statements {
    begin: Statement,
    lock: Statement,
    head: Statement,
    stream_heads: Statement,
    stored: Statement,
    insert: Statement,
    commit: Statement,
}

struct Connection {
    client: Client,
    statements: Statements,
}

pub(crate) struct Writer {
    config: tokio_postgres::Config,
    max_group_events: usize,
    committed: Arc<Notify>,
    before_commit: Option<CommitHook>,
    connection: Option<Connection>,
}

impl Writer {
    pub fn new(
        config: tokio_postgres::Config,
        max_group_events: usize,
        committed: Arc<Notify>,
        before_commit: Option<CommitHook>,
    ) -> Self {
        Self { config, max_group_events, committed, before_commit, connection: None }
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
        let (requests, replies): (Vec<_>, Vec<_>) =
            group.into_iter().map(|r| ((r.stream, r.expected, r.events), r.reply)).unzip();
        let hook = self.before_commit.clone();
        let outcome = match self.connection().await {
            Ok(connection) => commit(connection, &requests, hook.as_ref()).await,
            Err(e) => Err(e),
        };
        match outcome {
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
                // The transaction's fate is unknown (or it never started): drop
                // the connection and tell every caller; resending is idempotent.
                tracing::warn!(error = %e, appends = replies.len(), "group commit failed");
                self.connection = None;
                let message = e.to_string();
                let mut error = Some(e);
                for reply in replies {
                    let e = error.take().unwrap_or_else(|| StoreError::Pool(format!("group commit failed: {message}")));
                    let _ = reply.send(Err(e));
                }
            }
        }
    }

    async fn connection(&mut self) -> Result<&mut Connection, StoreError> {
        if self.connection.as_ref().is_some_and(|c| c.client.is_closed()) {
            self.connection = None;
        }
        if self.connection.is_none() {
            self.connection = Some(connect(&self.config).await?);
        }
        Ok(self.connection.as_mut().expect("just connected"))
    }
}

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
        stored: client
            .prepare(&format!(
                "SELECT {EVENT_COLUMNS} FROM events \
                 WHERE (stream_id, event_id) IN (SELECT * FROM unnest($1::text[], $2::uuid[]))"
            ))
            .await?,
        insert: client
            .prepare(
                "INSERT INTO events (global_position, stream_id, stream_version, event_id, event_type, \
                     schema_version, payload, metadata, recorded_at, hash_version, prev_hash, hash) \
                 SELECT * FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::uuid[], $5::text[], \
                     $6::integer[], $7::jsonb[], $8::jsonb[], $9::timestamptz[], $10::smallint[], \
                     $11::bytea[], $12::bytea[])",
            )
            .await?,
        commit: client.prepare("COMMIT").await?,
    };
    Ok(Connection { client, statements })
}

type Request = (StreamId, ExpectedVersion, Vec<PreparedEvent>);

/// Commits one group; the outer error means the transaction failed as a whole.
async fn commit(
    connection: &mut Connection,
    requests: &[Request],
    before_commit: Option<&CommitHook>,
) -> Result<Vec<Result<AppendResult, StoreError>>, StoreError> {
    let Connection { client, statements: s } = connection;

    let mut streams: Vec<&str> = requests.iter().map(|(stream, ..)| stream.as_str()).collect();
    streams.sort_unstable();
    streams.dedup();
    let (id_streams, ids): (Vec<&str>, Vec<Uuid>) = requests
        .iter()
        .flat_map(|(stream, _, events)| events.iter().map(move |e| (stream.as_str(), e.event.event_id)))
        .unzip();

    // Round trip 1: the statements are pipelined; each runs after the lock is held.
    let (lock_params, heads_params, stored_params) =
        ([&APPEND_LOCK as &(dyn ToSql + Sync)], [&streams as &(dyn ToSql + Sync)], [&id_streams as &(dyn ToSql + Sync), &ids]);
    let (begin, lock, head, heads, stored) = tokio::join!(
        client.execute(&s.begin, &[]),
        client.execute(&s.lock, &lock_params),
        client.query_one(&s.head, &[]),
        client.query(&s.stream_heads, &heads_params),
        client.query(&s.stored, &stored_params),
    );
    let reads = (|| {
        begin?;
        lock?;
        Ok::<_, tokio_postgres::Error>((head?, heads?, stored?))
    })();
    let (head, heads, stored) = match reads {
        Ok(reads) => reads,
        Err(e) => {
            rollback(client).await;
            return Err(e.into());
        }
    };

    let mut next_position = head.get::<_, i64>(0) as Position + 1;
    let mut heads: HashMap<String, StreamHead> = heads
        .iter()
        .map(|row| {
            let hash: &[u8] = row.get(2);
            let head = StreamHead {
                version: row.get::<_, i64>(1) as u64,
                hash: hash.try_into().expect("hash column is CHECKed to 32 bytes"),
            };
            (row.get(0), head)
        })
        .collect();
    let mut stored_events: HashMap<(String, Uuid), RecordedEvent> = HashMap::new();
    for row in &stored {
        let event = decode(row)?;
        stored_events.insert((event.stream_id.to_string(), event.event_id), event);
    }

    let recorded_at = now_micros();
    let mut rows = InsertRows::default();
    let mut results = Vec::with_capacity(requests.len());
    for (stream, expected, events) in requests {
        let found: Vec<Option<&RecordedEvent>> =
            events.iter().map(|e| stored_events.get(&(stream.to_string(), e.event.event_id))).collect();
        let head = heads.get(stream.as_str()).copied();
        let result = match decide(stream, *expected, events, &found, head, next_position, recorded_at) {
            Ok(Outcome::AlreadyStored(result)) => Ok(result),
            Ok(Outcome::Write(records)) => {
                let last = records.last().expect("non-empty");
                heads.insert(stream.to_string(), StreamHead { version: last.stream_version, hash: last.hash });
                next_position = last.global_position + 1;
                let result = written(&records);
                // A later append in this group may resend these ids.
                for record in records {
                    rows.push(&record);
                    stored_events.insert((stream.to_string(), record.event_id), record);
                }
                Ok(result)
            }
            Err(e) => Err(e),
        };
        results.push(result);
    }

    // Round trip 2.
    if rows.is_empty() {
        rollback(client).await;
        return Ok(results);
    }
    let insert_params: [&(dyn ToSql + Sync); 12] = [
        &rows.position,
        &rows.stream_id,
        &rows.stream_version,
        &rows.event_id,
        &rows.event_type,
        &rows.schema_version,
        &rows.payload,
        &rows.metadata,
        &rows.recorded_at,
        &rows.hash_version,
        &rows.prev_hash,
        &rows.hash,
    ];
    if let Some(hook) = before_commit {
        client.execute(&s.insert, &insert_params).await?;
        hook().await;
        client.execute(&s.commit, &[]).await?;
        return Ok(results);
    }
    let (insert, commit) = tokio::join!(client.execute(&s.insert, &insert_params), client.execute(&s.commit, &[]));
    // A failed INSERT turns the COMMIT into a rollback: nothing was written.
    insert?;
    commit?;
    Ok(results)
}

async fn rollback(client: &Client) {
    if let Err(e) = client.batch_execute("ROLLBACK").await {
        tracing::debug!(error = %e, "rollback failed; the connection will be replaced");
    }
}

/// Column arrays for the `unnest` insert.
#[derive(Default)]
struct InsertRows {
    position: Vec<i64>,
    stream_id: Vec<String>,
    stream_version: Vec<i64>,
    event_id: Vec<Uuid>,
    event_type: Vec<String>,
    schema_version: Vec<i32>,
    payload: Vec<serde_json::Value>,
    metadata: Vec<serde_json::Value>,
    recorded_at: Vec<DateTime<Utc>>,
    hash_version: Vec<i16>,
    prev_hash: Vec<Vec<u8>>,
    hash: Vec<Vec<u8>>,
}

impl InsertRows {
    fn push(&mut self, r: &RecordedEvent) {
        self.position.push(to_i64(r.global_position));
        self.stream_id.push(r.stream_id.to_string());
        self.stream_version.push(to_i64(r.stream_version));
        self.event_id.push(r.event_id);
        self.event_type.push(r.event_type.clone());
        self.schema_version.push(r.schema_version as i32);
        self.payload.push(r.payload.clone());
        self.metadata.push(r.metadata.clone());
        self.recorded_at.push(r.recorded_at);
        self.hash_version.push(r.hash_version as i16);
        self.prev_hash.push(r.prev_hash.to_vec());
        self.hash.push(r.hash.to_vec());
    }

    fn is_empty(&self) -> bool {
        self.position.is_empty()
    }
}
