//! Input validation shared by every store: bad input is refused before
//! anything is written.

use std::collections::HashSet;

use serde_json::Value;

use crate::append::Existing;
use crate::chain::canonical_json;
use crate::{NewEvent, StoreError, StreamId, MAX_EVENT_TYPE_LEN};

/// Size limits an append must respect; beyond them the append is
/// [`StoreError::BadInput`] and nothing is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest payload of one event, in bytes of compact JSON (default
    /// 2 MiB: room for a tool output at its 1 MiB cap, sealed).
    pub max_payload_bytes: usize,
    /// Largest metadata document of one event, in bytes of compact JSON (default 64 KiB).
    pub max_metadata_bytes: usize,
    /// Most events in one append (default 1,000).
    pub max_events_per_append: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_payload_bytes: 2 << 20,
            max_metadata_bytes: 64 << 10,
            max_events_per_append: 1_000,
        }
    }
}

/// A validated event, with payload and metadata already in the canonical
/// form that is hashed and sent to the database (jsonb accepts it as is).
#[derive(Debug, Clone)]
pub(crate) struct PreparedEvent {
    pub event: NewEvent,
    /// The metadata as the stored JSON document.
    pub metadata: Value,
    pub payload_json: Vec<u8>,
    pub metadata_json: Vec<u8>,
}

/// Checks an append's events against `limits` and the encoding rules.
pub(crate) fn prepare(
    stream: &StreamId,
    events: Vec<NewEvent>,
    limits: &Limits,
) -> Result<Vec<PreparedEvent>, StoreError> {
    if events.is_empty() {
        return Err(StoreError::BadInput(format!(
            "append to {stream} has no events"
        )));
    }
    if events.len() > limits.max_events_per_append {
        return Err(StoreError::BadInput(format!(
            "append to {stream} has {} events; the limit is {}",
            events.len(),
            limits.max_events_per_append
        )));
    }
    let mut ids = HashSet::with_capacity(events.len());
    events
        .into_iter()
        .map(|event| {
            if !ids.insert(event.event_id) {
                return Err(StoreError::BadInput(format!(
                    "event id {} appears twice in one append",
                    event.event_id
                )));
            }
            check_event_type(&event.event_type)?;
            if event.schema_version == 0 || event.schema_version > i32::MAX as u32 {
                return Err(StoreError::BadInput(format!(
                    "schema version of {} must be between 1 and {}",
                    event.event_type,
                    i32::MAX
                )));
            }
            if !event.payload.is_object() {
                return Err(StoreError::BadInput(format!(
                    "payload of {} must be a JSON object",
                    event.event_type
                )));
            }
            let payload_json = check_document("payload", &event.payload, limits.max_payload_bytes)?;
            let metadata =
                serde_json::to_value(&event.metadata).expect("metadata serialises to JSON");
            let metadata_json = check_document("metadata", &metadata, limits.max_metadata_bytes)?;
            Ok(PreparedEvent {
                event,
                metadata,
                payload_json,
                metadata_json,
            })
        })
        .collect()
}

fn check_event_type(event_type: &str) -> Result<(), StoreError> {
    let valid_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':');
    if event_type.is_empty()
        || event_type.len() > MAX_EVENT_TYPE_LEN
        || !event_type.chars().all(valid_char)
    {
        return Err(StoreError::BadInput(format!(
            "invalid event type {:?}: use 1 to {MAX_EVENT_TYPE_LEN} characters of A-Z a-z 0-9 - _ . :",
            crate::event::truncate(event_type, 60)
        )));
    }
    Ok(())
}

/// Checks a document and returns its canonical form.
fn check_document(what: &str, value: &Value, max_bytes: usize) -> Result<Vec<u8>, StoreError> {
    if contains_nul(value) {
        return Err(StoreError::BadInput(format!(
            "{what} contains a NUL character (\\u0000), which cannot be stored"
        )));
    }
    let canonical = canonical_json(value);
    if canonical.len() > max_bytes {
        return Err(StoreError::BadInput(format!(
            "{what} is {} bytes; the limit is {max_bytes}",
            canonical.len()
        )));
    }
    Ok(canonical)
}

fn contains_nul(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(contains_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || contains_nul(v)),
        _ => false,
    }
}

/// True when `new` is the same write as an event already recorded (or
/// planned): type, schema version, payload and metadata, compared in
/// canonical form because stored values have been through `jsonb`.
pub(crate) fn same_content(new: &PreparedEvent, existing: &Existing<'_>) -> bool {
    match existing {
        Existing::Stored(old) => {
            new.event.event_type == old.event_type
                && new.event.schema_version == old.schema_version
                && new.payload_json == canonical_json(&old.payload)
                && new.metadata_json == canonical_json(&old.metadata)
        }
        Existing::Planned { event: old, .. } => {
            new.event.event_type == old.event.event_type
                && new.event.schema_version == old.event.schema_version
                && new.payload_json == old.payload_json
                && new.metadata_json == old.metadata_json
        }
    }
}
