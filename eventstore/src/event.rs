//! The event envelope: what a caller appends ([`NewEvent`]) and what the store
//! hands back ([`RecordedEvent`]).

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::StoreError;

/// A global position in `$all`: strictly increasing from 1 (an aborted append
/// may leave one unused).
pub type Position = u64;

/// Longest stream id accepted, in bytes.
pub const MAX_STREAM_ID_LEN: usize = 200;
/// Longest event type accepted, in bytes.
pub const MAX_EVENT_TYPE_LEN: usize = 200;

/// The name of a stream, e.g. `workflow-0190…`.
///
/// Valid ids are 1 to [`MAX_STREAM_ID_LEN`] bytes of ASCII letters, digits and
/// `-_.:`, and do not start with `$` (reserved for system streams such as `$all`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct StreamId(String);

impl StreamId {
    /// Validates `id`; an invalid id is [`StoreError::BadInput`].
    pub fn new(id: impl Into<String>) -> Result<Self, StoreError> {
        let id = id.into();
        let valid_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':');
        if id.is_empty() || id.len() > MAX_STREAM_ID_LEN || !id.chars().all(valid_char) {
            return Err(StoreError::BadInput(format!(
                "invalid stream id {:?}: use 1 to {MAX_STREAM_ID_LEN} characters of A-Z a-z 0-9 - _ . :",
                truncate(&id, 60)
            )));
        }
        Ok(Self(id))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for StreamId {
    type Error = StoreError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl From<StreamId> for String {
    fn from(value: StreamId) -> Self {
        value.0
    }
}

/// What the writer believes the stream's current version to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExpectedVersion {
    /// Append whatever the stream holds.
    Any,
    /// The stream must not exist yet.
    NoStream,
    /// The stream's last event must have this version (0-based).
    Exact(u64),
}

impl fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => f.write_str("any"),
            Self::NoStream => f.write_str("no stream"),
            Self::Exact(v) => write!(f, "version {v}"),
        }
    }
}

/// Who caused an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActorKind {
    /// A software agent (built-in policy, external worker, LLM).
    Agent,
    /// A person, authenticated by the API.
    Human,
    /// The service itself (timeouts, lease expiry, …).
    System,
}

/// The actor of an event: kind, name and version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    /// Agent, human or system.
    pub kind: ActorKind,
    /// E.g. `sena`, or the authenticated principal of a human.
    pub name: String,
    /// The agent's version; empty for humans.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub version: String,
    /// The stable identity behind `name` (an authenticated person's
    /// `apikey:<key id>` or `jwt:<issuer>#<sub>`); empty for agents, the
    /// system and events recorded before authentication existed. Display
    /// names change; this does not.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub subject: String,
    /// How `subject` proved who it is: `api_key`, `jwt`, or `none` (auth
    /// off); empty where `subject` is.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub method: String,
    /// The agent role an agent decided in (`ANALYST`, …) when its name does
    /// not say it: external workers and models; empty for the built-in
    /// agents, people and the system.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub role: String,
}

impl Actor {
    /// An agent (`sena`, an external worker, …) at `version`.
    pub fn agent(name: impl Into<String>, version: impl Into<String>) -> Self {
        Self {
            kind: ActorKind::Agent,
            name: name.into(),
            version: version.into(),
            subject: String::new(),
            method: String::new(),
            role: String::new(),
        }
    }

    /// A person known only by `name` (tests, the demo, the CLI).
    pub fn human(name: impl Into<String>) -> Self {
        Self {
            kind: ActorKind::Human,
            name: name.into(),
            version: String::new(),
            subject: String::new(),
            method: String::new(),
            role: String::new(),
        }
    }

    /// The stable identity of this actor: its subject where it has one,
    /// else its name.
    pub fn identity(&self) -> &str {
        if self.subject.is_empty() {
            &self.name
        } else {
            &self.subject
        }
    }

    /// The service itself.
    pub fn system() -> Self {
        Self {
            kind: ActorKind::System,
            name: "agentledger".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            subject: String::new(),
            method: String::new(),
            role: String::new(),
        }
    }
}

/// The policy under which an agent decided: name, version and a fingerprint of
/// its configuration, because name and version alone cannot explain a decision
/// made under configurable thresholds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyRef {
    /// Policy name.
    pub name: String,
    /// Policy version.
    pub version: String,
    /// Hex digest of the policy's configuration.
    pub fingerprint: String,
}

/// The metadata every event carries (design §2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metadata {
    /// The workflow (or other unit of work) this event belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<Uuid>,
    /// The event or command that caused this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<Uuid>,
    /// Who caused it.
    pub actor: Actor,
    /// The idempotency key the command carried, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// Tenant; `default` unless multi-tenancy is configured.
    pub tenant: String,
    /// The submitting principal; `anonymous` in dev mode.
    pub owner: String,
    /// The policy behind an agent decision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicyRef>,
    /// The positions of the events a decision was based on (what its
    /// maker saw), so that an auditor can trace its inputs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<Position>,
    /// The OpenTelemetry trace the event was recorded in (hex), when
    /// traces are exported: from the ledger to the trace and back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
}

impl Metadata {
    /// Metadata for `actor` with the default tenant and owner.
    pub fn new(actor: Actor) -> Self {
        Self {
            correlation_id: None,
            causation_id: None,
            actor,
            idempotency_key: None,
            tenant: "default".into(),
            owner: "anonymous".into(),
            policy: None,
            inputs: Vec::new(),
            trace_id: None,
        }
    }
}

/// An event to append.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    /// Unique per stream; resending the same id makes the append idempotent.
    /// Use UUIDv7 ([`Uuid::now_v7`]).
    pub event_id: Uuid,
    /// E.g. `WorkflowSubmitted`: 1 to [`MAX_EVENT_TYPE_LEN`] bytes of ASCII letters, digits and `-_.:`.
    pub event_type: String,
    /// Version of the payload's shape, for upcasting.
    pub schema_version: u32,
    /// A JSON object.
    pub payload: Value,
    /// The envelope's metadata.
    pub metadata: Metadata,
}

impl NewEvent {
    /// A new event with a fresh UUIDv7 id and schema version 1.
    pub fn new(event_type: impl Into<String>, payload: Value, metadata: Metadata) -> Self {
        Self {
            event_id: Uuid::now_v7(),
            event_type: event_type.into(),
            schema_version: 1,
            payload,
            metadata,
        }
    }
}

/// An event as stored, with its position and hash chain. Its documents are
/// JSON values; verification reads them as canonical bytes instead
/// ([`crate::CanonicalEvent`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordedEvent<D = Value> {
    /// Position in `$all`.
    pub global_position: Position,
    /// The stream.
    pub stream_id: StreamId,
    /// 0-based, gap-free within the stream.
    pub stream_version: u64,
    /// The id given at append.
    pub event_id: Uuid,
    /// The type given at append.
    pub event_type: String,
    /// The payload's schema version.
    pub schema_version: u32,
    /// The payload, as stored.
    pub payload: D,
    /// The metadata document exactly as stored; [`RecordedEvent::metadata`] parses it.
    pub metadata: D,
    /// When the store recorded it (UTC, microsecond precision).
    pub recorded_at: DateTime<Utc>,
    /// Version of the canonical encoding the hash covers.
    pub hash_version: u16,
    /// The previous event's hash (32 zero bytes for version 0).
    #[serde(with = "hex_bytes")]
    pub prev_hash: [u8; 32],
    /// `SHA-256(prev_hash ‖ canonical(event))`.
    #[serde(with = "hex_bytes")]
    pub hash: [u8; 32],
}

impl RecordedEvent {
    /// The typed metadata. Verification never uses this: it hashes the stored document.
    pub fn metadata(&self) -> Result<Metadata, serde_json::Error> {
        Metadata::deserialize(&self.metadata)
    }

    /// The length of its payload and metadata as compact JSON text: what
    /// the event weighs in a page.
    pub fn document_bytes(&self) -> usize {
        json_len(&self.payload) + json_len(&self.metadata)
    }
}

/// The length of `value` as compact JSON text, without building the text.
pub fn json_len<T: Serialize + ?Sized>(value: &T) -> usize {
    struct Counter(usize);
    impl std::io::Write for Counter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut counter = Counter(0);
    serde_json::to_writer(&mut counter, value).expect("a JSON value serialises");
    counter.0
}

/// Where a page of events starts: a position in `$all`, or a version in
/// one stream.
#[derive(Debug, Clone, Copy)]
pub enum ReadFrom<'a> {
    All(Position),
    Stream(&'a StreamId, u64),
}

/// A page read by [`crate::EventStore::read_page`].
#[derive(Debug, Default)]
pub struct Page {
    /// The events, in order.
    pub events: Vec<RecordedEvent>,
    /// True when the page stopped at its byte bound: more events may follow
    /// even though it holds fewer than asked for.
    pub cut: bool,
}

impl Page {
    /// Keeps `events` up to and including the one that reaches `max_bytes`.
    pub fn bounded(mut events: Vec<RecordedEvent>, max_bytes: usize) -> Self {
        let mut bytes = 0;
        for (i, event) in events.iter().enumerate() {
            bytes += event.document_bytes();
            if bytes >= max_bytes && i + 1 < events.len() {
                events.truncate(i + 1);
                return Self { events, cut: true };
            }
        }
        Self { events, cut: false }
    }
}

/// The outcome of a successful append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendResult {
    /// Position of the first appended event.
    pub first_position: Position,
    /// Position of the last appended event.
    pub last_position: Position,
    /// Stream version of the last appended event: pass it as `ExpectedVersion::Exact` next time.
    pub stream_version: u64,
    /// True when every event already existed (an idempotent resend): nothing was written.
    pub deduplicated: bool,
}

pub(crate) fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

mod hex_bytes {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let text = String::deserialize(d)?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(text, &mut out).map_err(D::Error::custom)?;
        Ok(out)
    }
}
