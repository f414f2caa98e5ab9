//! The queue of workflows waiting for an agent: claimed under a lease,
//! highest priority first (design §6). [`PostgresWorkQueue`] shares work
//! between processes with `FOR UPDATE SKIP LOCKED`; [`InMemoryWorkQueue`]
//! serves the embedded dev mode and unit tests with the same semantics.
//!
//! A row means "some agent may have work on this workflow"; the claimer
//! folds the stream to find out what. The expected-version append stays the
//! final guard, so a stale claim can cost work but never a duplicate decision.

mod memory;
mod postgres;

use std::time::Duration;

use agentledger_domain::names::AgentRole;
use agentledger_domain::workflow::Priority;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

pub use memory::InMemoryWorkQueue;
pub use postgres::PostgresWorkQueue;

/// A claimed workflow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub workflow: Uuid,
    pub priority: Priority,
    /// The row's enqueue counter when claimed; see [`WorkQueue::complete`].
    pub seq: i64,
    /// How many times the row has been claimed, this claim included.
    pub claims: i32,
    pub enqueued_at: DateTime<Utc>,
}

/// A workflow's row handed to the external workers of one role: the work
/// of one decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub role: AgentRole,
    /// The task's id: derived from the workflow, the role and `version`,
    /// so that handing the same step over twice names the same task.
    pub task: Uuid,
    /// The stream version the decision is appended at (the number of
    /// events the workflow had when it was handed over).
    pub version: u64,
    /// Only workers of this tenant see the task.
    pub tenant: String,
}

/// An assigned row as a worker sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskClaim {
    pub workflow: Uuid,
    pub assignment: Assignment,
    pub priority: Priority,
    /// Claims by workers since the hand-over, this one included.
    pub attempt: i32,
    /// Who holds it (`<subject>#<worker id>`) and until when; a lease in
    /// the past is held by nobody.
    pub lease: Option<(String, DateTime<Utc>)>,
}

/// A call of an external tool, posted by the executor for the workers
/// serving that tool: one attempt of one subtask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostedCall {
    /// Derived from the workflow, the subtask and the attempt.
    pub id: Uuid,
    pub workflow: Uuid,
    pub subtask: String,
    pub tool: String,
    /// Only workers of this tenant see the call.
    pub tenant: String,
    /// The executor's attempt (1 to 3).
    pub attempt: u8,
    /// The subtask's title.
    pub instruction: String,
    pub input: String,
    /// After it the executor records a timeout and the call is gone.
    pub deadline: DateTime<Utc>,
    /// Claims by workers so far.
    pub claims: i32,
    /// Who holds it (`<subject>#<worker id>`) and until when.
    pub lease: Option<(String, DateTime<Utc>)>,
    /// What the worker answered, once it did.
    pub result: Option<CallResult>,
}

/// A worker's answer to a tool call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallResult {
    Output(String),
    Error(String),
}

/// Why the queue could not be used.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The database is unreachable or refused; retry later (`UNAVAILABLE`).
    #[error("task queue unavailable: {0}")]
    Unavailable(String),
    /// Another runtime holds this workflow's row (`UNAVAILABLE`: retry).
    #[error("workflow {0} is claimed by another runtime")]
    Held(Uuid),
}

/// The queue of waiting work. Every time is passed in (the runtime's clock).
#[async_trait]
pub trait WorkQueue: Send + Sync + 'static {
    /// Queues `workflow`, or updates its row: priority and availability are
    /// replaced, a lease held on it stays, and the enqueue counter moves on.
    async fn enqueue(
        &self,
        workflow: Uuid,
        priority: Priority,
        available_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<(), QueueError>;

    /// Queues a new `workflow` already claimed by `owner` until `now +
    /// lease`: the submitter drives it (or releases it) without racing
    /// other claimers to a row whose stream may not be written yet.
    async fn enqueue_claimed(
        &self,
        workflow: Uuid,
        priority: Priority,
        owner: &str,
        now: DateTime<Utc>,
        lease: Duration,
    ) -> Result<Claim, QueueError>;

    /// Claims up to `max` available, unleased (or lease-expired) rows for
    /// `owner` until `now + lease`, highest priority first, then oldest
    /// availability. Rows another claimer holds are skipped, not waited for.
    async fn claim(
        &self,
        owner: &str,
        max: usize,
        now: DateTime<Utc>,
        lease: Duration,
    ) -> Result<Vec<Claim>, QueueError>;

    /// Extends `owner`'s leases on `workflows` to `until`; returns the ones
    /// it still held.
    async fn renew(
        &self,
        owner: &str,
        workflows: &[Uuid],
        until: DateTime<Utc>,
    ) -> Result<Vec<Uuid>, QueueError>;

    /// Gives a claim back: the row stays, unleased, with `priority` (when
    /// given) and claimable from `available_at`. Nothing when `owner` no
    /// longer holds it.
    async fn release(
        &self,
        owner: &str,
        workflow: Uuid,
        priority: Option<Priority>,
        available_at: DateTime<Utc>,
    ) -> Result<(), QueueError>;

    /// Removes the row when `owner` still holds it and nothing was enqueued
    /// since the claim (`seq` unchanged); otherwise releases it, so that the
    /// newer work is claimed again. True when it released it so (the row
    /// is claimable now: wake a claimer).
    async fn complete(
        &self,
        owner: &str,
        workflow: Uuid,
        seq: i64,
        now: DateTime<Utc>,
    ) -> Result<bool, QueueError>;

    /// Removes the row whoever holds it (a submission whose append failed).
    async fn remove(&self, workflow: Uuid) -> Result<(), QueueError>;

    /// Rows in the queue (for readiness and metrics).
    async fn waiting(&self) -> Result<usize, QueueError>;

    /// Up to `max` workflows that the status read model shows waiting for
    /// an agent (submitted, analysing, gating, executing, reviewing), last
    /// changed before `before`, with no row here: candidates for the
    /// runtime's sweep, which folds each stream before it re-queues one
    /// (the read model is a hint, the stream the truth). A queue beside no
    /// read models has none.
    async fn unqueued(&self, before: DateTime<Utc>, max: usize) -> Result<Vec<Uuid>, QueueError> {
        let _ = (before, max);
        Ok(Vec::new())
    }

    /// Hands `owner`'s claim on `workflow` to the external workers of
    /// `assignment.role`: the row stays, unleased and claimable at once, but
    /// only by [`WorkQueue::claim_task`] for that role and tenant; runtimes
    /// no longer claim it. False when `owner` no longer held the row.
    async fn assign(
        &self,
        owner: &str,
        workflow: Uuid,
        assignment: &Assignment,
        now: DateTime<Utc>,
    ) -> Result<bool, QueueError>;

    /// Claims for `holder` until `now + lease` the first available task of
    /// `role` in `tenant` (highest priority, then oldest), if any.
    async fn claim_task(
        &self,
        role: AgentRole,
        tenant: &str,
        holder: &str,
        now: DateTime<Utc>,
        lease: Duration,
    ) -> Result<Option<TaskClaim>, QueueError>;

    /// The row of task `task`, while it is assigned.
    async fn task(&self, task: Uuid) -> Result<Option<TaskClaim>, QueueError>;

    /// Extends `holder`'s lease on `task` to `until`; false when its lease
    /// ran out (at `now`) or another holds it.
    async fn renew_task(
        &self,
        task: Uuid,
        holder: &str,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<bool, QueueError>;

    /// Gives `holder`'s task back to its role's queue, claimable from
    /// `available_at`; false when `holder` did not hold it.
    async fn release_task(
        &self,
        task: Uuid,
        holder: &str,
        now: DateTime<Utc>,
        available_at: DateTime<Utc>,
    ) -> Result<bool, QueueError>;

    /// Posts an external tool call; nothing when a call of that id exists.
    /// Calls whose deadline passed long ago (a crashed executor's) are
    /// cleared on the way, and so are the unanswered earlier attempts of
    /// the same subtask: the executor gave up on them.
    async fn post_call(&self, call: &PostedCall, now: DateTime<Utc>) -> Result<(), QueueError>;

    /// Claims for `holder` until `now + lease` the oldest unanswered call
    /// of one of `tools` in `tenant` whose deadline is still ahead and
    /// whose lease (if any) ran out.
    async fn claim_call(
        &self,
        tools: &[String],
        tenant: &str,
        holder: &str,
        now: DateTime<Utc>,
        lease: Duration,
    ) -> Result<Option<PostedCall>, QueueError>;

    /// The call `id`, while it is posted.
    async fn call(&self, id: Uuid) -> Result<Option<PostedCall>, QueueError>;

    /// Stores `result` when `holder` holds an unexpired lease on the
    /// unanswered call `id` and its deadline is ahead; false otherwise.
    async fn answer_call(
        &self,
        id: Uuid,
        holder: &str,
        now: DateTime<Utc>,
        result: &CallResult,
    ) -> Result<bool, QueueError>;

    /// Removes the call `id` (its result was taken, or its deadline passed).
    async fn remove_call(&self, id: Uuid) -> Result<(), QueueError>;

    /// Removes every call whose deadline is before `before`; how many.
    async fn clear_calls(&self, before: DateTime<Utc>) -> Result<u64, QueueError>;

    /// Ends task `task`: with `next`, the row goes back to the runtimes
    /// (claimable at once, with that priority); without, it is removed (the
    /// workflow ended or waits for a person). False when the row no longer
    /// carries this task.
    async fn finish_task(
        &self,
        task: Uuid,
        next: Option<Priority>,
        now: DateTime<Utc>,
    ) -> Result<bool, QueueError>;
}

pub(crate) fn priority_code(priority: Priority) -> i16 {
    match priority {
        Priority::Low => 0,
        Priority::Normal => 1,
        Priority::High => 2,
        Priority::Critical => 3,
    }
}

pub(crate) fn priority_from_code(code: i16) -> Priority {
    match code {
        i16::MIN..=0 => Priority::Low,
        1 => Priority::Normal,
        2 => Priority::High,
        _ => Priority::Critical,
    }
}

/// How long past its deadline a call may stay posted before a later post
/// clears it: the executor removes its own calls, this catches those of
/// one that crashed (and leaves room for clocks a little apart).
pub(crate) const CALL_GRACE: chrono::Duration = chrono::Duration::minutes(1);

/// Whether posting `new` makes `old` obsolete: an unanswered earlier
/// attempt of the same subtask (answered ones stay, so that a worker
/// sending its answer again is told it landed).
pub(crate) fn superseded(old: &PostedCall, new: &PostedCall) -> bool {
    old.workflow == new.workflow
        && old.subtask == new.subtask
        && old.attempt < new.attempt
        && old.result.is_none()
}

pub(crate) fn lease_end(now: DateTime<Utc>, lease: Duration) -> DateTime<Utc> {
    now + chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::MAX)
}
