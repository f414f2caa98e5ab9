//! The events of a workflow stream. The variant name is the stored event
//! type; the fields are the payload, whose shape has a schema version per
//! event type ([`WorkflowEvent::schema_version`]). [`WorkflowEvent::decode`]
//! upcasts older shapes, so every payload ever written still loads.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use thiserror::Error;

use super::{EthicsScores, Priority, SubtaskPlan, Text, Verdict};
use crate::privacy::Sealing;

/// Which recorded gate decision a person's decision answers: its global
/// position and its hash (hex), so that an approval names exactly what it
/// approved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GateRef {
    pub position: u64,
    pub hash: String,
}

/// A language model's part in a decision: what it was asked (by version
/// and hash of the prompt) and what it answered, so that a reviewer sees
/// both and replay never asks it again. With `fallback`, the model failed
/// (`fallback_reason` says how) and the reference policy decided instead.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelCall {
    /// The API spoken (`openai-compatible`).
    pub provider: String,
    /// Where it was sent (the configured base URL).
    pub endpoint: String,
    pub model: String,
    /// The prompt template's version (`sena-llm/1`).
    pub prompt_version: String,
    /// SHA-256 (hex) of the exact messages sent, as serialised in the request.
    pub prompt_sha256: String,
    /// The model's raw answer (the message content), empty when none came;
    /// personal text, sealed like a rationale.
    pub answer: Text,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_tokens: Option<u64>,
    /// From the first request to the last answer, retries included.
    pub latency_ms: u64,
    /// Requests made (retries after `429` and `5xx` included).
    pub requests: u8,
    pub fallback: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback_reason: Option<Text>,
    /// The answer was not asked for but reused: the position of the
    /// decision that recorded it (same tenant, policy, schema and prompt
    /// hash; `requests` is then 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reused_from: Option<u64>,
    /// With the result cache on (and no data subject): the hex key the
    /// answer is found again under.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_key: Option<String>,
}

/// A deterministic result's place in the result cache: `key` (hex SHA-256
/// over the tenant, the tool, the instruction and the input) names what was
/// computed, and `reused_from`, on a result taken from the cache, is the
/// position of the event that recorded it first. The audit so shows where
/// every output came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheRef {
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reused_from: Option<u64>,
}

/// A call that leaves the process for a tool whose effects the ledger
/// cannot undo (an MCP server's), declared before it is made: which server
/// and tool, a hash of the exact arguments, and the idempotency key passed
/// with the call. A crash between this and the attempt's outcome leaves the
/// outcome unknown: the call is retried only when the tool was declared
/// `idempotent`, otherwise a person decides.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolIntent {
    /// The server as configured (its URL, or its command line).
    pub server: String,
    /// The tool's name on the server.
    pub tool: String,
    /// SHA-256 (hex) of the arguments as sent (JSON, keys sorted).
    pub arguments_sha256: String,
    /// Sent to the server with the call (`_meta`), so that a server that
    /// keeps keys can refuse to act twice for one. It is the id of the
    /// event that first declared this call: this event's own id, unless
    /// the call repeats one whose outcome was lost (`repeats`).
    pub idempotency_key: uuid::Uuid,
    /// For a call made again after its outcome was lost (a crash, a
    /// timeout): the position of the intent it repeats, whose key it keeps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repeats: Option<u64>,
    /// Declared safe to call again with the same arguments.
    pub idempotent: bool,
}

/// Every fact recorded about a workflow, in the words of design §3.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all_fields = "snake_case")]
pub enum WorkflowEvent {
    /// A request arrived. Schema 2 added `sealing` (whose key seals the
    /// workflow's personal text; schema 1 payloads load with none).
    WorkflowSubmitted {
        request: Text,
        input: Option<Text>,
        priority: Priority,
        sealing: Option<Sealing>,
    },
    /// Sena's analysis (round 0, then 1 and 2 after revisions).
    AnalysisProduced {
        round: u8,
        subtasks: Vec<SubtaskPlan>,
        confidence: f64,
        rationale: Text,
        /// The model behind the analysis, when one made (or failed) it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        model: Option<ModelCall>,
    },
    /// Lubit's verdict on an analysis.
    GateDecided {
        round: u8,
        verdict: Verdict,
        priority: Priority,
        risk: f64,
        /// Schema 2: each reason is a [`Text`] (they may quote the plan).
        reasons: Vec<Text>,
        rationale: Text,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        model: Option<ModelCall>,
    },
    /// A person approved or rejected an escalated workflow. Schema 2 added
    /// `answers`: the gate decision the person saw and decided on (schema 1
    /// payloads load with none).
    HumanDecisionRecorded {
        approve: bool,
        comment: Text,
        answers: Option<GateRef>,
    },
    /// GitCode began an attempt (1 to 3) at a subtask; for a call to an
    /// MCP server, with the call's intent.
    SubtaskStarted {
        subtask: String,
        attempt: u8,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        intent: Option<ToolIntent>,
    },
    /// An attempt succeeded.
    SubtaskSucceeded {
        subtask: String,
        attempt: u8,
        output: Text,
        /// For a deterministic tool with the result cache on.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cache: Option<CacheRef>,
    },
    /// An attempt failed; `will_retry` says whether another follows.
    /// Schema 2 added `kind` (schema 1 payloads load as [`FailureKind::Error`]);
    /// schema 3 made `error` a [`Text`] (a tool's error may quote its input).
    SubtaskFailed {
        subtask: String,
        attempt: u8,
        kind: FailureKind,
        error: Text,
        will_retry: bool,
    },
    /// A subtask was not run because a dependency failed (schema 2: `reason`
    /// is a [`Text`]).
    SubtaskSkipped { subtask: String, reason: Text },
    /// An attempt whose call's outcome is unknown (its executor stopped
    /// between the intent and the outcome) at a tool not declared
    /// idempotent: the attempt is recorded as abandoned with it, and a
    /// person decides whether the subtask may be tried again (approve) or
    /// the workflow ends (reject).
    SubtaskEscalated {
        subtask: String,
        attempt: u8,
        reason: Text,
    },
    /// Every subtask reached an end.
    ExecutionFinished {
        succeeded: u32,
        failed: u32,
        skipped: u32,
    },
    /// RUNE's review of the whole workflow.
    EthicsReviewed {
        scores: EthicsScores,
        passed: bool,
        /// Schema 2: each finding is a [`Text`].
        findings: Vec<Text>,
        /// Why, in the reviewer's words: external and model reviewers give
        /// one; the reference policy's findings speak for it (absent).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rationale: Option<Text>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        model: Option<ModelCall>,
    },
    /// Final: done and reviewed.
    WorkflowCompleted {},
    /// Final: Lubit or a person said no.
    WorkflowRejected { reasons: Vec<Text> },
    /// Final: a subtask exhausted its attempts.
    WorkflowFailed { reason: Text },
    /// Final: RUNE flagged it for a person.
    WorkflowFlagged { findings: Vec<Text> },
    /// Final: cancelled on request.
    WorkflowCancelled { reason: Option<Text> },
}

/// Why a subtask attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// The tool reported an error; another attempt may succeed.
    Error,
    /// The tool refused its input; another attempt would fail the same way.
    Invalid,
    /// The attempt ran past its deadline.
    Timeout,
    /// The worker running it stopped (its lease expired) before it ended.
    Abandoned,
}

impl FailureKind {
    /// Whether another attempt can help.
    pub fn is_retryable(self) -> bool {
        self != Self::Invalid
    }
}

/// A stored payload that cannot be read as a [`WorkflowEvent`].
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// Not a workflow event type.
    #[error("unknown workflow event type {0:?}")]
    UnknownType(String),
    /// Written by a newer version of agentledger than this one.
    #[error("{event_type} has schema version {version}; this build reads up to {known}")]
    NewerSchema {
        event_type: String,
        version: u32,
        known: u32,
    },
    /// The payload does not have the shape its schema version says.
    #[error("{event_type} v{version}: {reason}")]
    Invalid {
        event_type: String,
        version: u32,
        reason: String,
    },
}

/// Every event type, with the schema version this build writes.
const SCHEMAS: &[(&str, u32)] = &[
    ("WorkflowSubmitted", 2),
    ("AnalysisProduced", 1),
    ("GateDecided", 2),
    ("HumanDecisionRecorded", 2),
    ("SubtaskStarted", 1),
    ("SubtaskSucceeded", 1),
    ("SubtaskFailed", 3),
    ("SubtaskSkipped", 2),
    ("SubtaskEscalated", 1),
    ("ExecutionFinished", 1),
    ("EthicsReviewed", 2),
    ("WorkflowCompleted", 1),
    ("WorkflowRejected", 2),
    ("WorkflowFailed", 2),
    ("WorkflowFlagged", 2),
    ("WorkflowCancelled", 1),
];

/// Rewrites a payload of `event_type` from schema `version` to `version + 1`.
/// One arm per change of shape; old arms stay forever. Turning a string
/// field into a [`Text`] (a plain text is stored as a string) needs none:
/// those versions only tell older builds they cannot read sealed text.
fn upcast_once(event_type: &str, version: u32, payload: &mut Map<String, Value>) {
    match (event_type, version) {
        ("SubtaskFailed", 1) => {
            payload.insert("kind".into(), Value::String("error".into()));
        }
        ("WorkflowSubmitted", 1) => {
            payload.insert("sealing".into(), Value::Null);
        }
        ("HumanDecisionRecorded", 1) => {
            payload.insert("answers".into(), Value::Null);
        }
        _ => {}
    }
}

impl WorkflowEvent {
    /// The payload schema version this build writes for the event's type.
    pub fn schema_version(&self) -> u32 {
        schema_of(self.event_type()).expect("every variant is listed in SCHEMAS")
    }

    /// The stored form: event type, schema version and the payload object
    /// (the fields, without the type tag).
    pub fn encode(&self) -> (&'static str, u32, Value) {
        let mut value = serde_json::to_value(self).expect("workflow events always serialise");
        if let Value::Object(fields) = &mut value {
            fields.remove("type");
        }
        (self.event_type(), self.schema_version(), value)
    }

    /// Reads a stored event, upcasting a payload of an older schema version.
    pub fn decode(event_type: &str, version: u32, payload: &Value) -> Result<Self, DecodeError> {
        let known =
            schema_of(event_type).ok_or_else(|| DecodeError::UnknownType(event_type.into()))?;
        let invalid = |reason: String| DecodeError::Invalid {
            event_type: event_type.into(),
            version,
            reason,
        };
        if version > known {
            return Err(DecodeError::NewerSchema {
                event_type: event_type.into(),
                version,
                known,
            });
        }
        let Value::Object(fields) = payload else {
            return Err(invalid("the payload is not an object".into()));
        };
        let mut fields = fields.clone();
        for from in version.max(1)..known {
            upcast_once(event_type, from, &mut fields);
        }
        fields.insert("type".into(), Value::String(event_type.into()));
        serde_json::from_value(Value::Object(fields)).map_err(|e| invalid(e.to_string()))
    }

    /// The stored event type: the variant's name.
    pub fn event_type(&self) -> &'static str {
        match self {
            Self::WorkflowSubmitted { .. } => "WorkflowSubmitted",
            Self::AnalysisProduced { .. } => "AnalysisProduced",
            Self::GateDecided { .. } => "GateDecided",
            Self::HumanDecisionRecorded { .. } => "HumanDecisionRecorded",
            Self::SubtaskStarted { .. } => "SubtaskStarted",
            Self::SubtaskSucceeded { .. } => "SubtaskSucceeded",
            Self::SubtaskFailed { .. } => "SubtaskFailed",
            Self::SubtaskSkipped { .. } => "SubtaskSkipped",
            Self::SubtaskEscalated { .. } => "SubtaskEscalated",
            Self::ExecutionFinished { .. } => "ExecutionFinished",
            Self::EthicsReviewed { .. } => "EthicsReviewed",
            Self::WorkflowCompleted { .. } => "WorkflowCompleted",
            Self::WorkflowRejected { .. } => "WorkflowRejected",
            Self::WorkflowFailed { .. } => "WorkflowFailed",
            Self::WorkflowFlagged { .. } => "WorkflowFlagged",
            Self::WorkflowCancelled { .. } => "WorkflowCancelled",
        }
    }
}

fn schema_of(event_type: &str) -> Option<u32> {
    SCHEMAS
        .iter()
        .find(|(name, _)| *name == event_type)
        .map(|(_, version)| *version)
}
