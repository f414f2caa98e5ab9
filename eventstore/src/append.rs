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

/// What to do with an append.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Write these records (positions and versions assigned, hashes chained).
    Write(Vec<RecordedEvent>),
    /// Every event already exists with the same content: answer with the original positions.
    AlreadyStored(AppendResult),
}

/// Decides one append.
///
/// `stored[i]` is the already stored event with the id of `events[i]` in this
/// stream, if any. `next_position` is the position the first new event gets.
pub(crate) fn decide(
    stream: &StreamId,
    expected: ExpectedVersion,
    events: &[PreparedEvent],
    stored: &[Option<&RecordedEvent>],
    head: Option<StreamHead>,
    next_position: Position,
    recorded_at: DateTime<Utc>,
) -> Result<Outcome, StoreError> {
    debug_assert_eq!(events.len(), stored.len());
    if stored.iter().any(Option::is_some) {
        return already_stored(stream, events, stored);
    }
    let actual = head.map(|h| h.version);
    let matches = match expected {
        ExpectedVersion::Any => true,
        ExpectedVersion::NoStream => actual.is_none(),
        ExpectedVersion::Exact(v) => actual == Some(v),
    };
    if !matches {
        return Err(StoreError::Conflict { stream: stream.clone(), expected, actual });
    }
    let mut version = actual.map_or(0, |v| v + 1);
    let mut prev_hash = head.map_or(GENESIS_HASH, |h| h.hash);
    let mut position = next_position;
    let records = events
        .iter()
        .map(|p| {
            let mut record = RecordedEvent {
                global_position: position,
                stream_id: stream.clone(),
                stream_version: version,
                event_id: p.event.event_id,
                event_type: p.event.event_type.clone(),
                schema_version: p.event.schema_version,
                payload: p.event.payload.clone(),
                metadata: p.metadata.clone(),
                recorded_at,
                hash_version: HASH_VERSION,
                prev_hash,
                hash: [0; 32],
            };
            record.hash = HashedFields::from(&record).hash(&prev_hash);
            prev_hash = record.hash;
            version += 1;
            position += 1;
            record
        })
        .collect();
    Ok(Outcome::Write(records))
}

fn already_stored(
    stream: &StreamId,
    events: &[PreparedEvent],
    stored: &[Option<&RecordedEvent>],
) -> Result<Outcome, StoreError> {
    let mut first: Option<&RecordedEvent> = None;
    let mut last: Option<&RecordedEvent> = None;
    for (new, old) in events.iter().zip(stored) {
        let mismatch = || StoreError::IdempotencyMismatch { stream: stream.clone(), event_id: new.event.event_id };
        let old = old.ok_or_else(mismatch)?;
        if !same_content(new, &old.event_type, old.schema_version, &old.payload, &old.metadata) {
            return Err(mismatch());
        }
        first = first.or(Some(old));
        last = Some(old);
    }
    let (first, last) = (first.expect("non-empty append"), last.expect("non-empty append"));
    Ok(Outcome::AlreadyStored(AppendResult {
        first_position: first.global_position,
        last_position: last.global_position,
        stream_version: last.stream_version,
        deduplicated: true,
    }))
}

/// The result of writing `records`.
pub(crate) fn written(records: &[RecordedEvent]) -> AppendResult {
    let (first, last) = (records.first().expect("non-empty"), records.last().expect("non-empty"));
    AppendResult {
        first_position: first.global_position,
        last_position: last.global_position,
        stream_version: last.stream_version,
        deduplicated: false,
    }
}

/// `now`, truncated to the microseconds PostgreSQL keeps, so that the hash
/// computed before the insert matches the stored value.
pub(crate) fn now_micros() -> DateTime<Utc> {
    let now = Utc::now();
    DateTime::from_timestamp_micros(now.timestamp_micros()).expect("now is representable")
}
