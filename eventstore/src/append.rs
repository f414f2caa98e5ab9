//! The decision every store takes for one append, given the stream's head:
//! idempotent resend, version conflict, or the new records with their chain.
//! Keeping it in one place is what makes the stores behave identically.

use chrono::{DateTime, Utc};

use crate::chain::{HashedFields, GENESIS_HASH, HASH_VERSION};
use crate::prepare::{same_content, PreparedEvent};
use crate::{AppendResult, ExpectedVersion, Position, RecordedEvent, StoreError, StreamId};

/// The last event of a stream, as far as an append needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StreamHead {
    pub version: u64,
    pub hash: [u8; 32],
}

/// An event with the same stream and id as one being appended: already
/// stored, or planned earlier in the same group commit.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Existing<'a> {
    Stored(&'a RecordedEvent),
    Planned {
        event: &'a PreparedEvent,
        position: Position,
        version: u64,
    },
}

impl Existing<'_> {
    fn position_and_version(&self) -> (Position, u64) {
        match self {
            Self::Stored(e) => (e.global_position, e.stream_version),
            Self::Planned {
                position, version, ..
            } => (*position, *version),
        }
    }
}

/// Where the `i`-th event of an append goes, and its chain links.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NewRecord {
    pub global_position: Position,
    pub stream_version: u64,
    pub prev_hash: [u8; 32],
    pub hash: [u8; 32],
}

/// What to do with an append.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Write the events with these positions, versions and hashes (one per event, in order).
    Write(Vec<NewRecord>),
    /// Every event already exists with the same content: answer with the original positions.
    AlreadyStored(AppendResult),
}

/// Decides one append.
///
/// `existing[i]` is the event with the id of `events[i]` in this stream, if
/// there is one. `next_position` is the position the first new event gets.
pub(crate) fn decide(
    stream: &StreamId,
    expected: ExpectedVersion,
    events: &[PreparedEvent],
    existing: &[Option<Existing<'_>>],
    head: Option<StreamHead>,
    next_position: Position,
    recorded_at: DateTime<Utc>,
) -> Result<Outcome, StoreError> {
    debug_assert_eq!(events.len(), existing.len());
    if existing.iter().any(Option::is_some) {
        return already_stored(stream, events, existing);
    }
    let actual = head.map(|h| h.version);
    let matches = match expected {
        ExpectedVersion::Any => true,
        ExpectedVersion::NoStream => actual.is_none(),
        ExpectedVersion::Exact(v) => actual == Some(v),
    };
    if !matches {
        return Err(StoreError::Conflict {
            stream: stream.clone(),
            expected,
            actual,
        });
    }
    let first_version = actual.map_or(0, |v| v + 1);
    let mut prev_hash = head.map_or(GENESIS_HASH, |h| h.hash);
    let records = events
        .iter()
        .zip(0..)
        .map(|(p, i)| {
            let stream_version = first_version + i;
            let hash = HashedFields {
                event_id: p.event.event_id,
                stream_id: stream.as_str(),
                stream_version,
                event_type: &p.event.event_type,
                schema_version: p.event.schema_version,
                payload: &p.payload_json,
                metadata: &p.metadata_json,
                recorded_at,
            }
            .hash(&prev_hash);
            let record = NewRecord {
                global_position: next_position + i,
                stream_version,
                prev_hash,
                hash,
            };
            prev_hash = hash;
            record
        })
        .collect();
    Ok(Outcome::Write(records))
}

fn already_stored(
    stream: &StreamId,
    events: &[PreparedEvent],
    existing: &[Option<Existing<'_>>],
) -> Result<Outcome, StoreError> {
    let mut found = Vec::with_capacity(events.len());
    for (new, old) in events.iter().zip(existing) {
        match old {
            Some(old) if same_content(new, old) => found.push(old.position_and_version()),
            _ => {
                return Err(StoreError::IdempotencyMismatch {
                    stream: stream.clone(),
                    event_id: new.event.event_id,
                })
            }
        }
    }
    let (first, last) = (found[0], found[found.len() - 1]);
    Ok(Outcome::AlreadyStored(AppendResult {
        first_position: first.0,
        last_position: last.0,
        stream_version: last.1,
        deduplicated: true,
    }))
}

/// The result of writing `records`.
pub(crate) fn written(records: &[NewRecord]) -> AppendResult {
    let (first, last) = (
        records.first().expect("non-empty"),
        records.last().expect("non-empty"),
    );
    AppendResult {
        first_position: first.global_position,
        last_position: last.global_position,
        stream_version: last.stream_version,
        deduplicated: false,
    }
}

/// The stored event an append produced.
pub(crate) fn recorded(
    stream: &StreamId,
    event: PreparedEvent,
    record: &NewRecord,
    recorded_at: DateTime<Utc>,
) -> RecordedEvent {
    RecordedEvent {
        global_position: record.global_position,
        stream_id: stream.clone(),
        stream_version: record.stream_version,
        event_id: event.event.event_id,
        event_type: event.event.event_type,
        schema_version: event.event.schema_version,
        payload: event.event.payload,
        metadata: event.metadata,
        recorded_at,
        hash_version: HASH_VERSION,
        prev_hash: record.prev_hash,
        hash: record.hash,
    }
}

/// `now`, truncated to the microseconds PostgreSQL keeps, so that the hash
/// computed before the insert matches the stored value.
pub(crate) fn now_micros() -> DateTime<Utc> {
    let now = Utc::now();
    DateTime::from_timestamp_micros(now.timestamp_micros()).expect("now is representable")
}
