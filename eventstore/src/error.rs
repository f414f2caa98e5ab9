//! The store's typed errors.

use uuid::Uuid;

use crate::{ExpectedVersion, StreamId};

/// Everything an event store operation can fail with.
///
/// Each variant says how a caller should react and which GraphQL
/// `extensions.code` the API maps it to.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The stream is not at the expected version; nothing was written.
    /// Reload the stream and decide again (`CONFLICT`).
    #[error("stream {stream} expected {expected} but is at {}", actual.map_or("no stream".to_string(), |v| format!("version {v}")))]
    Conflict {
        /// The stream appended to.
        stream: StreamId,
        /// What the caller expected.
        expected: ExpectedVersion,
        /// The stream's actual last version (`None`: the stream does not exist).
        actual: Option<u64>,
    },

    /// An event id that is already stored was sent again with different content,
    /// or a batch mixed stored and new ids; nothing was written (`CONFLICT`).
    #[error("event {event_id} in stream {stream} was already recorded with different content")]
    IdempotencyMismatch {
        /// The stream appended to.
        stream: StreamId,
        /// The reused id.
        event_id: Uuid,
    },

    /// Concurrent appends changed the streams of this append under every
    /// attempt; nothing was written. Retry later (`CONFLICT`).
    #[error("the streams kept changing under {attempts} attempts; nothing was written")]
    Contended {
        /// Attempts made.
        attempts: u32,
    },

    /// The input breaks a documented rule (stream id, event type, payload shape
    /// or size, NUL characters); nothing was written. Fix the input (`BAD_INPUT`).
    #[error("bad input: {0}")]
    BadInput(String),

    /// The database failed or could not be reached. The append may or may not
    /// have committed: resend the same event ids, which is safe (`UNAVAILABLE`).
    #[error("database error: {}", describe(.0))]
    Database(#[from] tokio_postgres::Error),

    /// The database could not be used: no pooled connection, or a group
    /// commit this append shared failed (its first caller gets the database
    /// error itself). The append may or may not have committed: resending
    /// the same event ids is safe (`UNAVAILABLE`).
    #[error("database unavailable: {0}")]
    Unavailable(String),

    /// A stored row could not be decoded (corruption or a newer schema) (`INTERNAL`).
    #[error("corrupt stored event at position {position}: {reason}")]
    Corrupt {
        /// Where.
        position: u64,
        /// What was wrong.
        reason: String,
    },

    /// The store is shutting down; the operation did not run (`UNAVAILABLE`:
    /// another node can take it).
    #[error("the event store is shut down")]
    Closed,
}

/// What the server said (message and SQLSTATE), or the error with its
/// cause: tokio-postgres's own `Display` is often just "db error".
pub fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{} ({})", db.message(), db.code().code());
    }
    let shown = e.to_string();
    match std::error::Error::source(e).map(|cause| cause.to_string()) {
        Some(cause) if !shown.contains(&cause) => format!("{shown}: {cause}"),
        _ => shown,
    }
}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        match e {
            deadpool_postgres::PoolError::Backend(e) => Self::Database(e),
            other => Self::Unavailable(other.to_string()),
        }
    }
}
