//! The embedded ledger of `serve --data-dir`: one SQLite file that keeps
//! the events, the ledger signing keys and the data-subject keys across
//! restarts, with no server to run.
//!
//! The event store itself is the [`InMemoryEventStore`]: every append is
//! decided in memory as always, then written to the file in one SQLite
//! transaction before anyone can read it, under the same lock, so the file
//! holds exactly the events readers saw, in the same order. At open the
//! file is read back and every hash chain recomputed.
//!
//! Durability: WAL with `synchronous = NORMAL`. A commit survives the
//! process being killed at any point; a power cut may lose the last
//! commits (never corrupt the file). One process owns a data directory at a
//! time: the file is locked exclusively while it is open.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use chrono::{DateTime, SubsecRound, Utc};
use ed25519_dalek::SigningKey;
use rusqlite::{params, Connection, OptionalExtension};
use uuid::Uuid;

use crate::append::NewRecord;
use crate::chain::{canonical_from_slice, CanonicalEvent, LedgerVerifier, Verification};
use crate::prepare::{Limits, PreparedEvent};
use crate::signing::{self, LedgerKey, LedgerKeys};
use crate::subject_keys::{self, Forgotten, SubjectKeys};
use crate::{InMemoryEventStore, RecordedEvent, StoreError, StreamId};

/// The file in the data directory.
pub const FILE_NAME: &str = "ledger.sqlite3";

/// The layout this build writes (`PRAGMA user_version`).
const LAYOUT: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS events (
    position INTEGER PRIMARY KEY,
    stream_id TEXT NOT NULL,
    stream_version INTEGER NOT NULL,
    event_id BLOB NOT NULL,
    event_type TEXT NOT NULL,
    schema_version INTEGER NOT NULL,
    payload TEXT NOT NULL,
    metadata TEXT NOT NULL,
    recorded_at INTEGER NOT NULL,
    hash_version INTEGER NOT NULL,
    prev_hash BLOB NOT NULL,
    hash BLOB NOT NULL,
    UNIQUE (stream_id, stream_version)
) STRICT;
CREATE TRIGGER IF NOT EXISTS events_no_update BEFORE UPDATE ON events
BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;
CREATE TRIGGER IF NOT EXISTS events_no_delete BEFORE DELETE ON events
BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;
CREATE TABLE IF NOT EXISTS ledger_keys (
    key_id TEXT PRIMARY KEY,
    public_key BLOB NOT NULL,
    secret_key BLOB,
    created_at INTEGER NOT NULL,
    retired_at INTEGER
) STRICT;
CREATE TABLE IF NOT EXISTS subject_keys (
    subject TEXT PRIMARY KEY,
    key_id BLOB NOT NULL UNIQUE,
    secret BLOB NOT NULL
) STRICT;
";

/// An open data directory. Dropping the last handle closes the file and
/// releases the directory.
pub struct EmbeddedLedger {
    conn: Mutex<Connection>,
    path: PathBuf,
}

impl std::fmt::Debug for EmbeddedLedger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedLedger")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// What [`EmbeddedLedger::event_store`] found in the file.
pub struct Loaded {
    /// The store, holding every event of the file.
    pub store: InMemoryEventStore,
    /// Every chain recomputed from the file: a break means the file was
    /// changed outside the service (the store still opens, as PostgreSQL
    /// does, so that the audit tools can show where).
    pub verification: Verification,
}

impl EmbeddedLedger {
    /// Opens (creating it when missing) the ledger in `dir`, and locks it
    /// for this process.
    pub fn open(dir: &Path) -> Result<Arc<Self>, StoreError> {
        let path = dir.join(FILE_NAME);
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            StoreError::Unavailable(format!("{what} {}: {e}", path.display()))
        };
        create_private_dir(dir).map_err(|e| fail("creating the directory of", &e))?;
        create_private_file(&path).map_err(|e| fail("creating", &e))?;
        let conn = Connection::open(&path).map_err(|e| fail("opening", &e))?;
        // This connection is the file's only one: a lock held means another
        // process, and waiting for it would only delay the refusal.
        conn.busy_timeout(std::time::Duration::ZERO)
            .map_err(|e| fail("opening", &e))?;
        // Exclusive locking before WAL is first used: no shared-memory
        // index, and the lock is held for as long as the file is open, so
        // a second process (or a second open here) is refused at once.
        conn.execute_batch(
            "PRAGMA locking_mode = EXCLUSIVE;
             PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;
             PRAGMA secure_delete = ON;
             PRAGMA foreign_keys = ON;",
        )
        .and_then(|()| conn.execute_batch("BEGIN EXCLUSIVE; COMMIT;"))
        .map_err(|e| match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
                StoreError::Unavailable(format!(
                    "{} is in use by another agentledger process (one process owns a data \
                     directory at a time)",
                    path.display()
                ))
            }
            _ => fail("opening", &e),
        })?;
        let layout: i64 = conn
            .query_row("PRAGMA user_version", [], |row| row.get(0))
            .map_err(|e| fail("reading", &e))?;
        if layout > LAYOUT {
            return Err(StoreError::Unavailable(format!(
                "{} was written by a newer agentledger (layout {layout}; this build reads up to {LAYOUT})",
                path.display()
            )));
        }
        conn.execute_batch(SCHEMA)
            .and_then(|()| conn.pragma_update(None, "user_version", LAYOUT))
            .map_err(|e| fail("preparing", &e))?;
        Ok(Arc::new(Self {
            conn: Mutex::new(conn),
            path,
        }))
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads every event back into an event store that writes its appends
    /// here, recomputing every chain on the way.
    pub fn event_store(self: &Arc<Self>, limits: Limits) -> Result<Loaded, StoreError> {
        let mut events = Vec::new();
        let mut verifier = LedgerVerifier::new();
        {
            let conn = self.conn();
            let mut select = conn
                .prepare(
                    "SELECT position, stream_id, stream_version, event_id, event_type,
                            schema_version, payload, metadata, recorded_at, hash_version,
                            prev_hash, hash
                     FROM events ORDER BY position",
                )
                .map_err(|e| self.error(e))?;
            let mut rows = select.query([]).map_err(|e| self.error(e))?;
            while let Some(row) = rows.next().map_err(|e| self.error(e))? {
                let stored = self.decode(row, events.len() as u64 + 1)?;
                verifier.check_canonical(&stored);
                events.push(parsed(stored)?);
            }
        }
        Ok(Loaded {
            store: InMemoryEventStore::restored(limits, events, self.clone()),
            verification: verifier.finish(),
        })
    }

    /// The ledger signing keys kept here.
    pub fn ledger_keys(self: &Arc<Self>) -> EmbeddedLedgerKeys {
        EmbeddedLedgerKeys(self.clone())
    }

    /// The data-subject keys kept here.
    pub fn subject_keys(self: &Arc<Self>) -> EmbeddedSubjectKeys {
        EmbeddedSubjectKeys(self.clone())
    }

    /// Writes one append in one transaction; called by the store under its
    /// lock, after the append was decided and before it is visible.
    pub(crate) fn write(
        &self,
        stream: &StreamId,
        events: &[PreparedEvent],
        records: &[NewRecord],
        recorded_at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(|e| self.error(e))?;
        {
            let mut insert = tx
                .prepare_cached(
                    "INSERT INTO events (position, stream_id, stream_version, event_id, event_type,
                         schema_version, payload, metadata, recorded_at, hash_version, prev_hash, hash)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
                )
                .map_err(|e| self.error(e))?;
            for (event, record) in events.iter().zip(records) {
                insert
                    .execute(params![
                        to_sql_int(record.global_position)?,
                        stream.as_str(),
                        to_sql_int(record.stream_version)?,
                        event.event.event_id.as_bytes().as_slice(),
                        event.event.event_type,
                        event.event.schema_version,
                        utf8(&event.payload_json)?,
                        utf8(&event.metadata_json)?,
                        recorded_at.timestamp_micros(),
                        crate::chain::HASH_VERSION,
                        record.prev_hash.as_slice(),
                        record.hash.as_slice(),
                    ])
                    .map_err(|e| self.error(e))?;
            }
        }
        tx.commit().map_err(|e| self.error(e))
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // Every write is one transaction that rolls back when dropped, so a
        // panic while holding the lock leaves nothing half done.
        self.conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn error(&self, e: rusqlite::Error) -> StoreError {
        StoreError::Unavailable(format!("the embedded ledger {}: {e}", self.path.display()))
    }

    fn decode(&self, row: &rusqlite::Row<'_>, expected: u64) -> Result<CanonicalEvent, StoreError> {
        let position: i64 = row.get(0).map_err(|e| self.error(e))?;
        let corrupt = |reason: String| StoreError::Corrupt {
            position: position.max(0) as u64,
            reason,
        };
        if position != expected as i64 {
            return Err(corrupt(format!(
                "the file skips from position {} to {position}",
                expected - 1
            )));
        }
        let text = |i: usize| -> Result<String, StoreError> {
            row.get::<_, String>(i).map_err(|e| corrupt(e.to_string()))
        };
        let int = |i: usize| -> Result<i64, StoreError> {
            row.get::<_, i64>(i).map_err(|e| corrupt(e.to_string()))
        };
        let hash = |i: usize| -> Result<[u8; 32], StoreError> {
            let bytes: Vec<u8> = row.get(i).map_err(|e| corrupt(e.to_string()))?;
            bytes
                .try_into()
                .map_err(|_| corrupt("a hash is not 32 bytes".into()))
        };
        let event_id: Vec<u8> = row.get(3).map_err(|e| corrupt(e.to_string()))?;
        let stream_id = StreamId::new(text(1)?).map_err(|e| corrupt(e.to_string()))?;
        let document = |i: usize| -> Result<Vec<u8>, StoreError> {
            canonical_from_slice(text(i)?.as_bytes()).map_err(|e| corrupt(e.to_string()))
        };
        Ok(CanonicalEvent {
            global_position: expected,
            stream_id,
            stream_version: u64::try_from(int(2)?).map_err(|e| corrupt(e.to_string()))?,
            event_id: Uuid::from_slice(&event_id).map_err(|e| corrupt(e.to_string()))?,
            event_type: text(4)?,
            schema_version: u32::try_from(int(5)?).map_err(|e| corrupt(e.to_string()))?,
            payload: document(6)?,
            metadata: document(7)?,
            recorded_at: DateTime::from_timestamp_micros(int(8)?)
                .ok_or_else(|| corrupt("recorded_at is out of range".into()))?,
            hash_version: u16::try_from(int(9)?).map_err(|e| corrupt(e.to_string()))?,
            prev_hash: hash(10)?,
            hash: hash(11)?,
        })
    }
}

/// The event with its documents parsed, as the store keeps it.
fn parsed(e: CanonicalEvent) -> Result<RecordedEvent, StoreError> {
    let position = e.global_position;
    let corrupt = |e: serde_json::Error| StoreError::Corrupt {
        position,
        reason: e.to_string(),
    };
    Ok(RecordedEvent {
        payload: serde_json::from_slice(&e.payload).map_err(corrupt)?,
        metadata: serde_json::from_slice(&e.metadata).map_err(corrupt)?,
        global_position: e.global_position,
        stream_id: e.stream_id,
        stream_version: e.stream_version,
        event_id: e.event_id,
        event_type: e.event_type,
        schema_version: e.schema_version,
        recorded_at: e.recorded_at,
        hash_version: e.hash_version,
        prev_hash: e.prev_hash,
        hash: e.hash,
    })
}

fn to_sql_int(n: u64) -> Result<i64, StoreError> {
    i64::try_from(n).map_err(|_| StoreError::BadInput(format!("{n} is beyond the embedded ledger")))
}

fn utf8(json: &[u8]) -> Result<&str, StoreError> {
    std::str::from_utf8(json)
        .map_err(|e| StoreError::BadInput(format!("a document is not UTF-8: {e}")))
}

fn micros(at: Option<i64>) -> Option<DateTime<Utc>> {
    at.and_then(DateTime::from_timestamp_micros)
}

#[cfg(unix)]
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

#[cfg(not(unix))]
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)
}

/// The file holds secret keys: readable by its owner only.
fn create_private_file(path: &Path) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.create(true).append(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path).map(drop)
}

/// Ledger signing keys in the data directory (secret half included: there
/// is no separate owner role here).
pub struct EmbeddedLedgerKeys(Arc<EmbeddedLedger>);

impl EmbeddedLedgerKeys {
    fn insert(
        &self,
        conn: &Connection,
        now: DateTime<Utc>,
    ) -> Result<(LedgerKey, SigningKey), StoreError> {
        let key = signing::generate();
        let public = signing::public_of(&key, now);
        conn.execute(
            "INSERT INTO ledger_keys (key_id, public_key, secret_key, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![
                public.key_id,
                key.verifying_key().as_bytes().as_slice(),
                key.to_bytes().as_slice(),
                now.timestamp_micros()
            ],
        )
        .map_err(|e| self.0.error(e))?;
        Ok((public, key))
    }
}

#[async_trait]
impl LedgerKeys for EmbeddedLedgerKeys {
    async fn active(&self) -> Result<(String, SigningKey), StoreError> {
        let conn = self.0.conn();
        let found: Option<(String, Vec<u8>)> = conn
            .query_row(
                "SELECT key_id, secret_key FROM ledger_keys WHERE retired_at IS NULL",
                [],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()
            .map_err(|e| self.0.error(e))?;
        match found {
            Some((id, secret)) => {
                let secret = <[u8; 32]>::try_from(secret).map_err(|_| StoreError::Corrupt {
                    position: 0,
                    reason: "ledger_keys: a secret key is not 32 bytes".into(),
                })?;
                Ok((id, SigningKey::from_bytes(&secret)))
            }
            None => {
                let (public, key) = self.insert(&conn, Utc::now().trunc_subsecs(6))?;
                tracing::info!(key_id = %public.key_id, "created the ledger signing key");
                Ok((public.key_id, key))
            }
        }
    }

    async fn public_keys(&self) -> Result<Vec<LedgerKey>, StoreError> {
        let conn = self.0.conn();
        let mut select = conn
            .prepare(
                "SELECT key_id, public_key, created_at, retired_at FROM ledger_keys
                 ORDER BY retired_at IS NOT NULL, created_at DESC",
            )
            .map_err(|e| self.0.error(e))?;
        let rows = select
            .query_map([], |row| {
                Ok(LedgerKey {
                    key_id: row.get(0)?,
                    algorithm: "ed25519".into(),
                    public_key: hex::encode(row.get::<_, Vec<u8>>(1)?),
                    created_at: micros(Some(row.get(2)?)).unwrap_or_default(),
                    retired_at: micros(row.get(3)?),
                })
            })
            .map_err(|e| self.0.error(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.0.error(e))
    }

    async fn rotate(&self) -> Result<LedgerKey, StoreError> {
        let mut conn = self.0.conn();
        let now = Utc::now().trunc_subsecs(6);
        let tx = conn.transaction().map_err(|e| self.0.error(e))?;
        tx.execute(
            "UPDATE ledger_keys SET retired_at = ?1, secret_key = NULL WHERE retired_at IS NULL",
            [now.timestamp_micros()],
        )
        .map_err(|e| self.0.error(e))?;
        let (public, _) = self.insert(&tx, now)?;
        tx.commit().map_err(|e| self.0.error(e))?;
        tracing::info!(key_id = %public.key_id, "rotated the ledger signing key");
        Ok(public)
    }
}

/// Data-subject keys in the data directory. Forgetting one overwrites its
/// row (`secure_delete`) and checkpoints the WAL, so the key is gone from
/// both files; copies of the directory keep it (docs/audit.md).
pub struct EmbeddedSubjectKeys(Arc<EmbeddedLedger>);

impl EmbeddedSubjectKeys {
    fn lookup(conn: &Connection, subject: &str) -> rusqlite::Result<Option<(Uuid, [u8; 32])>> {
        conn.query_row(
            "SELECT key_id, secret FROM subject_keys WHERE subject = ?1",
            [subject],
            |row| Ok((row.get::<_, Vec<u8>>(0)?, row.get::<_, Vec<u8>>(1)?)),
        )
        .optional()
        .map(|found| {
            found.and_then(|(id, secret): (Vec<u8>, Vec<u8>)| {
                Some((
                    Uuid::from_slice(&id).ok()?,
                    <[u8; 32]>::try_from(secret).ok()?,
                ))
            })
        })
    }
}

#[async_trait]
impl SubjectKeys for EmbeddedSubjectKeys {
    async fn key_for(&self, subject: &str) -> Result<(Uuid, [u8; 32]), StoreError> {
        let subject = subject_keys::normalize_filed(subject)?;
        let conn = self.0.conn();
        if let Some(found) = Self::lookup(&conn, &subject).map_err(|e| self.0.error(e))? {
            return Ok(found);
        }
        let (id, secret) = (Uuid::new_v4(), subject_keys::new_key());
        conn.execute(
            "INSERT INTO subject_keys (subject, key_id, secret) VALUES (?1, ?2, ?3)",
            params![subject, id.as_bytes().as_slice(), secret.as_slice()],
        )
        .map_err(|e| self.0.error(e))?;
        Ok((id, secret))
    }

    async fn find(&self, subject: &str) -> Result<Option<Uuid>, StoreError> {
        let subject = subject_keys::normalize_filed(subject)?;
        let conn = self.0.conn();
        Ok(Self::lookup(&conn, &subject)
            .map_err(|e| self.0.error(e))?
            .map(|(id, _)| id))
    }

    async fn secrets(
        &self,
        ids: &[Uuid],
    ) -> Result<std::collections::HashMap<Uuid, [u8; 32]>, StoreError> {
        let conn = self.0.conn();
        let mut select = conn
            .prepare_cached("SELECT secret FROM subject_keys WHERE key_id = ?1")
            .map_err(|e| self.0.error(e))?;
        let mut found = std::collections::HashMap::new();
        for id in ids {
            let secret: Option<Vec<u8>> = select
                .query_row([id.as_bytes().as_slice()], |row| row.get(0))
                .optional()
                .map_err(|e| self.0.error(e))?;
            if let Some(secret) = secret.and_then(|s| <[u8; 32]>::try_from(s).ok()) {
                found.insert(*id, secret);
            }
        }
        Ok(found)
    }

    async fn forget(&self, subject: &str) -> Result<Forgotten, StoreError> {
        let subject = subject_keys::normalize_filed(subject)?;
        let conn = self.0.conn();
        let key_id = Self::lookup(&conn, &subject)
            .map_err(|e| self.0.error(e))?
            .map(|(id, _)| id);
        if key_id.is_none() {
            return Ok(Forgotten {
                key_id,
                vacuumed: false,
            });
        }
        conn.execute("DELETE FROM subject_keys WHERE subject = ?1", [&subject])
            .map_err(|e| self.0.error(e))?;
        // Copy the overwritten page into the file and empty the WAL, which
        // still held the page with the key.
        let vacuumed = conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |row| {
                row.get::<_, i64>(0)
            })
            .map(|busy| busy == 0)
            .unwrap_or(false);
        Ok(Forgotten { key_id, vacuumed })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Actor, EventStore, ExpectedVersion, Metadata, NewEvent};
    use serde_json::json;

    fn event(i: u64) -> NewEvent {
        NewEvent::new(
            "Tested",
            json!({"i": i, "text": "기록은 남는다", "big": 1e300, "small": 0.1}),
            Metadata::new(Actor::system()),
        )
    }

    #[tokio::test]
    async fn events_survive_a_reopen_and_their_chains_go_on() {
        let dir = tempfile::tempdir().unwrap();
        let stream = StreamId::new("workflow-a").unwrap();
        let first = event(0);
        let before = {
            let ledger = EmbeddedLedger::open(dir.path()).unwrap();
            let loaded = ledger.event_store(Limits::default()).unwrap();
            assert_eq!(loaded.verification.checked_events, 0);
            for e in [first.clone(), event(1), event(2)] {
                loaded
                    .store
                    .append(&stream, ExpectedVersion::Any, vec![e])
                    .await
                    .unwrap();
            }
            loaded.store.read_all(1, 10).await.unwrap()
        };
        let ledger = EmbeddedLedger::open(dir.path()).unwrap();
        let loaded = ledger.event_store(Limits::default()).unwrap();
        assert!(loaded.verification.ok, "{:?}", loaded.verification);
        assert_eq!(loaded.verification.checked_events, 3);
        assert_eq!(loaded.store.read_all(1, 10).await.unwrap(), before);
        let next = loaded
            .store
            .append(&stream, ExpectedVersion::Exact(2), vec![event(3)])
            .await
            .unwrap();
        assert_eq!((next.first_position, next.stream_version), (4, 3));
        assert!(loaded.store.verify_stream(&stream).await.unwrap().ok);
        // A resend after the restart is still recognised.
        let resent = loaded
            .store
            .append(&stream, ExpectedVersion::Any, vec![first])
            .await
            .unwrap();
        assert!(resent.deduplicated);
    }

    #[tokio::test]
    async fn a_second_open_of_the_directory_is_refused_until_the_first_closes() {
        let dir = tempfile::tempdir().unwrap();
        let first = EmbeddedLedger::open(dir.path()).unwrap();
        let refused = EmbeddedLedger::open(dir.path()).unwrap_err().to_string();
        assert!(
            refused.contains("in use by another agentledger process"),
            "{refused}"
        );
        drop(first);
        EmbeddedLedger::open(dir.path()).unwrap();
    }

    #[tokio::test]
    async fn a_changed_event_is_named_at_open_and_a_failed_write_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let stream = StreamId::new("workflow-b").unwrap();
        {
            let ledger = EmbeddedLedger::open(dir.path()).unwrap();
            let store = ledger.event_store(Limits::default()).unwrap().store;
            for i in 0..3 {
                store
                    .append(&stream, ExpectedVersion::Any, vec![event(i)])
                    .await
                    .unwrap();
            }
            let conn = ledger.conn();
            // The triggers refuse changes; someone with the file drops them.
            let refused = conn
                .execute("UPDATE events SET payload = '{}' WHERE position = 2", [])
                .unwrap_err();
            assert!(refused.to_string().contains("append-only"), "{refused}");
            conn.execute_batch(
                "DROP TRIGGER events_no_update;
                 UPDATE events SET payload = '{\"i\":9}' WHERE position = 2;",
            )
            .unwrap();
        }
        let ledger = EmbeddedLedger::open(dir.path()).unwrap();
        let loaded = ledger.event_store(Limits::default()).unwrap();
        assert!(!loaded.verification.ok);
        assert_eq!(loaded.verification.first_broken_position, Some(2));

        // A write the file refuses is refused to the caller, and nothing
        // becomes visible.
        ledger
            .conn()
            .execute_batch(
                "CREATE TRIGGER refuse BEFORE INSERT ON events BEGIN SELECT RAISE(ABORT, 'disk full'); END;",
            )
            .unwrap();
        let failed = loaded
            .store
            .append(&stream, ExpectedVersion::Any, vec![event(7)])
            .await
            .unwrap_err();
        assert!(
            matches!(failed, StoreError::Unavailable(ref m) if m.contains("disk full")),
            "{failed}"
        );
        assert_eq!(loaded.store.head_position().await.unwrap(), 3);
        ledger.conn().execute_batch("DROP TRIGGER refuse").unwrap();
        let next = loaded
            .store
            .append(&stream, ExpectedVersion::Exact(2), vec![event(7)])
            .await
            .unwrap();
        assert_eq!(next.first_position, 4);
    }

    #[tokio::test]
    async fn a_full_file_refuses_the_append_clearly_and_keeps_nothing_of_it() {
        let dir = tempfile::tempdir().unwrap();
        let stream = StreamId::new("workflow-full").unwrap();
        let ledger = EmbeddedLedger::open(dir.path()).unwrap();
        let store = ledger.event_store(Limits::default()).unwrap().store;
        // The file may grow by a few pages more: a full disk, made small.
        ledger
            .conn()
            .execute_batch(
                "PRAGMA wal_checkpoint(TRUNCATE);
                 PRAGMA max_page_count = 40;",
            )
            .unwrap();
        let bulky = |i: u64| {
            let text: String = (0..100)
                .map(|_| Uuid::new_v4().simple().to_string())
                .collect();
            NewEvent::new(
                "Bulky",
                json!({ "i": i, "text": text }),
                Metadata::new(Actor::system()),
            )
        };
        let mut stored = 0;
        let refused = loop {
            match store
                .append(
                    &stream,
                    ExpectedVersion::Any,
                    vec![bulky(stored), bulky(stored + 1)],
                )
                .await
            {
                Ok(_) => stored += 2,
                Err(e) => break e,
            }
            assert!(stored < 10_000, "the file never filled up");
        };
        assert!(
            refused.to_string().contains("database or disk is full"),
            "{refused}"
        );
        assert_eq!(store.head_position().await.unwrap(), stored);
        drop((store, ledger));
        let loaded = EmbeddedLedger::open(dir.path())
            .unwrap()
            .event_store(Limits::default())
            .unwrap();
        assert!(loaded.verification.ok);
        assert_eq!(loaded.verification.checked_events, stored);
    }

    #[tokio::test]
    async fn keys_survive_a_reopen_and_a_forgotten_subject_key_is_gone_from_the_files() {
        let dir = tempfile::tempdir().unwrap();
        let (signing, subject) = {
            let ledger = EmbeddedLedger::open(dir.path()).unwrap();
            let signing = ledger.ledger_keys().active().await.unwrap();
            let subject = ledger.subject_keys().key_for("김민수").await.unwrap();
            ledger.subject_keys().key_for("someone else").await.unwrap();
            (signing, subject)
        };
        let ledger = EmbeddedLedger::open(dir.path()).unwrap();
        let (id, key) = ledger.ledger_keys().active().await.unwrap();
        assert_eq!(
            (id.as_str(), key.to_bytes()),
            (signing.0.as_str(), signing.1.to_bytes())
        );
        let keys = ledger.subject_keys();
        assert_eq!(keys.key_for("김민수").await.unwrap(), subject);
        assert_eq!(
            keys.secrets(&[subject.0]).await.unwrap()[&subject.0],
            subject.1
        );

        let rotated = ledger.ledger_keys().rotate().await.unwrap();
        let listed = ledger.ledger_keys().public_keys().await.unwrap();
        assert_eq!(listed.len(), 2);
        assert_eq!(listed[0].key_id, rotated.key_id);
        assert!(listed[1].retired_at.is_some());

        let forgotten = keys.forget("김민수").await.unwrap();
        assert_eq!(
            forgotten,
            Forgotten {
                key_id: Some(subject.0),
                vacuumed: true
            }
        );
        assert!(keys.secrets(&[subject.0]).await.unwrap().is_empty());
        drop((keys, ledger));
        for file in std::fs::read_dir(dir.path()).unwrap() {
            let bytes = std::fs::read(file.unwrap().path()).unwrap();
            assert!(
                !bytes.windows(32).any(|w| w == subject.1),
                "the forgotten key's bytes are still on disk"
            );
        }
    }
}
