//! What the read models hold, computed from events by pure functions: the
//! PostgreSQL and the in-memory read models run the same code, so they hold
//! the same rows. Every time comes from the events' `recorded_at`.

pub mod audit;
pub mod metrics;
pub mod status;

use agentledger_domain::workflow::WorkflowEvent;
use agentledger_eventstore::{Metadata, RecordedEvent};
use uuid::Uuid;

/// The prefix of workflow streams (the agents runtime writes them).
pub const STREAM_PREFIX: &str = "workflow-";

/// A recorded workflow event, decoded once.
#[derive(Debug, Clone)]
pub struct Fact {
    pub workflow: Uuid,
    pub recorded: RecordedEvent,
    pub event: WorkflowEvent,
    pub metadata: Metadata,
}

/// Why an event could not be read.
#[derive(Debug, Clone, thiserror::Error)]
#[error("event at position {position}: {reason}")]
pub struct UnreadableEvent {
    pub position: u64,
    pub reason: String,
}

impl Fact {
    /// Decodes `recorded`; `Ok(None)` for events of other streams.
    pub fn decode(recorded: &RecordedEvent) -> Result<Option<Self>, UnreadableEvent> {
        let Some(id) = recorded.stream_id.as_str().strip_prefix(STREAM_PREFIX) else {
            return Ok(None);
        };
        let unreadable = |reason: String| UnreadableEvent {
            position: recorded.global_position,
            reason,
        };
        let workflow = id
            .parse()
            .map_err(|e| unreadable(format!("stream id: {e}")))?;
        let event = WorkflowEvent::decode(
            &recorded.event_type,
            recorded.schema_version,
            &recorded.payload,
        )
        .map_err(|e| unreadable(e.to_string()))?;
        let metadata = recorded
            .metadata()
            .map_err(|e| unreadable(format!("metadata: {e}")))?;
        Ok(Some(Self {
            workflow,
            recorded: recorded.clone(),
            event,
            metadata,
        }))
    }
}

/// The four agent roles (design §5's `AgentRole`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AgentRole {
    Analyst,
    Gatekeeper,
    Executor,
    Ethics,
}

impl AgentRole {
    /// The role of a reference agent, by its name.
    pub fn of_agent(name: &str) -> Option<Self> {
        match name {
            "sena" => Some(Self::Analyst),
            "lubit" => Some(Self::Gatekeeper),
            "gitcode" => Some(Self::Executor),
            "rune" => Some(Self::Ethics),
            _ => None,
        }
    }

    /// As stored: `ANALYST`, `GATEKEEPER`, `EXECUTOR`, `ETHICS`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Analyst => "ANALYST",
            Self::Gatekeeper => "GATEKEEPER",
            Self::Executor => "EXECUTOR",
            Self::Ethics => "ETHICS",
        }
    }

    /// The inverse of [`AgentRole::as_str`].
    pub fn parse(text: &str) -> Option<Self> {
        [
            Self::Analyst,
            Self::Gatekeeper,
            Self::Executor,
            Self::Ethics,
        ]
        .into_iter()
        .find(|r| r.as_str() == text)
    }
}
