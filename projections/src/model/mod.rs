//! What the read models hold, computed from events by pure functions: the
//! PostgreSQL and the in-memory read models run the same code, so they hold
//! the same rows. Every time comes from the events' `recorded_at`.

pub mod audit;
pub mod metrics;
pub mod status;

use agentledger_domain::workflow::WorkflowEvent;
use agentledger_eventstore::{Metadata, RecordedEvent};
use uuid::Uuid;

pub use agentledger_domain::names::{AgentRole, STREAM_PREFIX};

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
