//! The questions the read models answer, one trait for PostgreSQL and memory.

use agentledger_domain::workflow::WorkflowState;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::model::audit::AuditEntry;
use crate::model::metrics::AgentMetrics;
use crate::model::status::WorkflowStatus;
use crate::AgentRole;

/// The names of the three projections.
pub const PROJECTIONS: [&str; 3] = ["workflow_status", "audit_trail", "agent_metrics"];

/// Where a page of workflows continues: after this one (newest first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkflowCursor {
    pub created_at: DateTime<Utc>,
    pub id: Uuid,
}

/// Which audit entries to list; every field narrows.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    /// Only this tenant's entries (the API always sets it).
    pub tenant: Option<String>,
    pub workflow: Option<Uuid>,
    pub actor: Option<String>,
    pub role: Option<AgentRole>,
    pub kind: Option<String>,
    /// Inclusive.
    pub from: Option<DateTime<Utc>>,
    /// Exclusive.
    pub to: Option<DateTime<Utc>>,
    /// Entries with a position above this one (the cursor).
    pub after: Option<u64>,
}

impl AuditFilter {
    /// Whether `entry` passes the filter.
    pub fn admits(&self, entry: &AuditEntry) -> bool {
        self.tenant.as_ref().is_none_or(|t| &entry.tenant == t)
            && self.workflow.is_none_or(|w| entry.workflow_id == w)
            && self.actor.as_ref().is_none_or(|a| &entry.actor == a)
            && self.role.is_none_or(|r| entry.role == Some(r))
            && self.kind.as_ref().is_none_or(|k| &entry.kind == k)
            && self.from.is_none_or(|f| entry.recorded_at >= f)
            && self.to.is_none_or(|t| entry.recorded_at < t)
            && self.after.is_none_or(|a| entry.position > a)
    }
}

/// Why a read failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The database is unreachable or failed; retry later (`UNAVAILABLE`).
    #[error("read models unavailable: {0}")]
    Unavailable(String),
    /// A stored row cannot be read (`INTERNAL`).
    #[error("corrupt read model row: {0}")]
    Corrupt(String),
    /// Waiting for a position took longer than allowed (a mutation then
    /// answers its workflow folded from the events, flagged `pending`;
    /// elsewhere `INTERNAL`).
    #[error("projections did not reach position {0} in time")]
    Timeout(u64),
}

/// The read models' queries.
#[async_trait]
pub trait ReadModels: Send + Sync + 'static {
    /// One workflow with its subtasks.
    async fn workflow(&self, id: Uuid) -> Result<Option<WorkflowStatus>, ReadError>;

    /// Up to `limit` workflows (with subtasks), newest first (creation time,
    /// then id), optionally of one tenant and in one state, after `after`.
    async fn workflows(
        &self,
        tenant: Option<&str>,
        state: Option<WorkflowState>,
        after: Option<WorkflowCursor>,
        limit: usize,
    ) -> Result<Vec<WorkflowStatus>, ReadError>;

    /// Up to `limit` audit entries passing `filter`, in position order.
    async fn audit_trail(
        &self,
        filter: &AuditFilter,
        limit: usize,
    ) -> Result<Vec<AuditEntry>, ReadError>;

    /// Per agent and minute, the minutes in `[from, to)`, by agent then
    /// minute; of one tenant, or of all (a row per tenant).
    async fn agent_metrics(
        &self,
        tenant: Option<&str>,
        from: Option<DateTime<Utc>>,
        to: Option<DateTime<Utc>>,
    ) -> Result<Vec<AgentMetrics>, ReadError>;

    /// How many workflows are in each state (states with none are left out).
    async fn count_by_state(
        &self,
        tenant: Option<&str>,
    ) -> Result<Vec<(WorkflowState, u64)>, ReadError>;

    /// The audit entries of each of `workflows` (one query for all), in
    /// position order.
    async fn audit_of(&self, workflows: &[Uuid]) -> Result<Vec<AuditEntry>, ReadError>;

    /// Each projection's checkpoint: the last position it applied.
    async fn checkpoints(&self) -> Result<Vec<(String, u64)>, ReadError>;

    /// Waits until every projection has applied `position` (read-your-writes:
    /// pass the position an append returned), at most `limit`.
    async fn wait_for(&self, position: u64, limit: std::time::Duration) -> Result<(), ReadError>;
}

/// Waits until every value of `watches` reaches `position`, at most `limit`.
pub(crate) async fn wait_all(
    watches: &[tokio::sync::watch::Receiver<u64>],
    position: u64,
    limit: std::time::Duration,
) -> Result<(), ReadError> {
    let all = async {
        for watch in watches {
            let mut watch = watch.clone();
            let _ = watch.wait_for(|p| *p >= position).await;
        }
    };
    tokio::time::timeout(limit, all)
        .await
        .map_err(|_| ReadError::Timeout(position))
}

/// Each projection's lag: the store's head position minus its checkpoint
/// (events not yet applied), for readiness and metrics.
pub async fn lag(
    models: &dyn ReadModels,
    store: &dyn agentledger_eventstore::EventStore,
) -> Result<Vec<(String, u64)>, ReadError> {
    let head = store
        .head_position()
        .await
        .map_err(|e| ReadError::Unavailable(e.to_string()))?;
    Ok(models
        .checkpoints()
        .await?
        .into_iter()
        .map(|(name, position)| (name, head.saturating_sub(position)))
        .collect())
}
