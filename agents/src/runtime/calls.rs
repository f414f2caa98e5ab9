//! Tools served by external workers (`[[tools.external]]`): to the executor
//! an [`ExternalTool`] is a tool like any other, run under the attempt's
//! deadline with its retries and backoff. Its run posts the call to the
//! queue's mailbox ([`WorkQueue::post_call`]), a worker claims it under a
//! lease and answers it, and the run returns the answer; the executor then
//! records the outcome as it does for a built-in. A worker that dies holding
//! a call loses its lease and another claims it, until the deadline; after
//! the deadline the executor records a timeout and the answer is refused.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentledger_domain::tools::ToolSpec;
use agentledger_domain::workflow::DomainError;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::sync::{broadcast, Notify};
use uuid::Uuid;

use super::external::{Worker, MAX_TASK_LEASE};
use super::{Runtime, RuntimeError};
use crate::clock::Clock;
use crate::queue::{CallResult, PostedCall, WorkQueue};
use crate::tool::{Tool, ToolCall, ToolFailure};

/// Namespace of call ids (UUIDv5 of `workflow:subtask:attempt`).
const CALL_NAMESPACE: Uuid = Uuid::from_u128(0x6d1e_0c59_51c4_4a8e_9f0b_3a2d_7c41_e5b8);

/// How often a run looks for an answer given on another process; an answer
/// given on this one wakes it at once.
const ANSWER_POLL: Duration = Duration::from_millis(200);

/// Most tool names one claim may ask for.
pub const MAX_CLAIM_TOOLS: usize = 64;

/// Largest input a call carries (bytes of UTF-8): a claim's answer must
/// fit the API's response limit (8 MiB by default) with room to spare.
pub const MAX_CALL_INPUT: usize = 4 * 1024 * 1024;

/// Largest error text a worker may send (bytes of UTF-8).
pub const MAX_CALL_ERROR: usize = 8 * 1024;

/// How long before the executor's deadline a call stops taking answers:
/// an answer given on another process is then seen (within one
/// [`ANSWER_POLL`]) before the executor gives up, so that an answer a
/// worker was told landed is never recorded as a timeout.
fn answer_margin(limit: chrono::Duration) -> chrono::Duration {
    let margin = chrono::Duration::from_std(ANSWER_POLL * 2).expect("small");
    margin.min(limit / 2)
}

/// A tool a deployment serves with its own workers, as configured.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ExternalToolSpec {
    pub name: String,
    pub description: String,
    pub keywords: Vec<String>,
    /// The same instruction and input always give the same output: the
    /// result cache may reuse its results.
    pub deterministic: bool,
}

impl ExternalToolSpec {
    /// The spec as the registry holds it. The strings live as long as the
    /// process: a deployment configures a handful of tools once.
    fn leak(&self) -> ToolSpec {
        let keywords: Vec<&'static str> = self
            .keywords
            .iter()
            .map(|k| &*Box::leak(k.clone().into_boxed_str()))
            .collect();
        ToolSpec {
            name: Box::leak(self.name.clone().into_boxed_str()),
            description: Box::leak(self.description.clone().into_boxed_str()),
            keywords: Box::leak(keywords.into_boxed_slice()),
        }
    }
}

/// The id of the call of `subtask`'s `attempt` in `workflow`.
pub fn call_id(workflow: Uuid, subtask: &str, attempt: u8) -> Uuid {
    Uuid::new_v5(
        &CALL_NAMESPACE,
        format!("{workflow}\u{0}{subtask}\u{0}{attempt}").as_bytes(),
    )
}

/// What runs and workers of external tools share in one process.
pub(crate) struct CallBoard {
    queue: Arc<dyn WorkQueue>,
    clock: Arc<dyn Clock>,
    /// Runs waiting for an answer, by call id.
    waiting: Mutex<HashMap<Uuid, Arc<Notify>>>,
    /// A call of this tool was posted here, for workers of this tenant:
    /// `(tenant, tool)`.
    pub posted: broadcast::Sender<(String, String)>,
}

impl CallBoard {
    pub fn new(queue: Arc<dyn WorkQueue>, clock: Arc<dyn Clock>) -> Self {
        Self {
            queue,
            clock,
            waiting: Mutex::new(HashMap::new()),
            posted: broadcast::channel(64).0,
        }
    }

    fn waiting(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Arc<Notify>>> {
        self.waiting.lock().expect("call board lock")
    }

    /// Wakes the run waiting here for call `id`, if any.
    fn answered(&self, id: Uuid) {
        if let Some(notify) = self.waiting().get(&id) {
            notify.notify_one();
        }
    }
}

/// An external tool as the executor runs it.
pub(crate) struct ExternalTool {
    spec: ToolSpec,
    deterministic: bool,
    board: Arc<CallBoard>,
}

impl ExternalTool {
    pub fn new(spec: &ExternalToolSpec, board: Arc<CallBoard>) -> Self {
        Self {
            spec: spec.leak(),
            deterministic: spec.deterministic,
            board,
        }
    }
}

/// Takes a run's call off the board when the run ends. An unanswered call
/// (the executor's deadline dropped the run) is removed, so that no answer
/// is taken for it any more; an answered one stays until a later post
/// clears it, so that a worker sending its answer again is told it landed.
struct Posted {
    board: Arc<CallBoard>,
    id: Uuid,
    answered: bool,
}

impl Drop for Posted {
    fn drop(&mut self) {
        self.board.waiting().remove(&self.id);
        if self.answered {
            return;
        }
        let queue = self.board.queue.clone();
        let id = self.id;
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                if let Err(e) = queue.remove_call(id).await {
                    tracing::warn!(call = %id, error = %e, "a finished tool call stays posted until a later post clears it");
                }
            });
        }
    }
}

#[async_trait]
impl Tool for ExternalTool {
    fn spec(&self) -> ToolSpec {
        self.spec
    }

    fn external(&self) -> bool {
        true
    }

    fn deterministic(&self) -> bool {
        self.deterministic
    }

    async fn run(&self, call: ToolCall) -> Result<String, ToolFailure> {
        if call.input.len() > MAX_CALL_INPUT {
            // No worker could be handed it: another attempt would not help.
            return Err(ToolFailure::Invalid(format!(
                "the input is {} bytes; an external tool takes at most {MAX_CALL_INPUT}",
                call.input.len()
            )));
        }
        let board = &self.board;
        let id = call_id(call.workflow, &call.subtask, call.attempt);
        let notify = Arc::new(Notify::new());
        board.waiting().insert(id, notify.clone());
        let mut posted_here = Posted {
            board: board.clone(),
            id,
            answered: false,
        };
        let now = board.clock.now();
        let posted = PostedCall {
            id,
            workflow: call.workflow,
            subtask: call.subtask.clone(),
            tool: self.spec.name.to_string(),
            tenant: call.tenant.clone(),
            attempt: call.attempt,
            instruction: call.instruction.clone(),
            input: call.input.clone(),
            deadline: call.deadline - answer_margin(call.deadline - now),
            claims: 0,
            lease: None,
            result: None,
        };
        board
            .queue
            .post_call(&posted, now)
            .await
            .map_err(|e| ToolFailure::Error(format!("the call could not be posted: {e}")))?;
        // Nobody listening is fine: workers also claim now and then.
        let _ = board
            .posted
            .send((posted.tenant.clone(), posted.tool.clone()));
        loop {
            match board.queue.call(id).await {
                Ok(Some(PostedCall {
                    result: Some(result),
                    ..
                })) => {
                    posted_here.answered = true;
                    return match result {
                        CallResult::Output(output) => Ok(output),
                        CallResult::Error(error) => Err(ToolFailure::Error(error)),
                    };
                }
                Ok(Some(_)) => {}
                Ok(None) => {
                    return Err(ToolFailure::Error(
                        "the call was cleared before it was answered".into(),
                    ))
                }
                // The deadline still bounds the wait; look again later.
                Err(e) => tracing::debug!(call = %id, error = %e, "could not look for the answer"),
            }
            tokio::select! {
                () = notify.notified() => {}
                () = board.clock.sleep(ANSWER_POLL) => {}
                () = call.cancel.cancelled() => {
                    return Err(ToolFailure::Error("cancelled".into()));
                }
            }
        }
    }
}

/// A worker's answer to a call: the output, or an error (the executor
/// retries the call, as after a built-in's error).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallAnswer {
    Output(String),
    Error(String),
}

fn gone(message: &str) -> RuntimeError {
    RuntimeError::TaskLost(message.to_string())
}

impl Runtime {
    /// The names of the tools external workers serve here.
    pub fn external_tools(&self) -> Vec<&'static str> {
        self.inner
            .tools
            .specs()
            .into_iter()
            .filter(|s| {
                self.inner
                    .tools
                    .get(s.name)
                    .is_some_and(|tool| tool.external())
            })
            .map(|s| s.name)
            .collect()
    }

    /// Signals, as `(tenant, tool)`, that this process posted a call.
    pub fn tool_call_signals(&self) -> broadcast::Receiver<(String, String)> {
        self.inner.calls.posted.subscribe()
    }

    /// Claims for `worker` the oldest open call of one of `tools` in its
    /// tenant, under a lease of `lease` (1 s to [`MAX_TASK_LEASE`]); `None`
    /// when there is none.
    pub async fn claim_tool_call(
        &self,
        tools: &[String],
        worker: &Worker,
        lease: Duration,
    ) -> Result<Option<PostedCall>, RuntimeError> {
        worker.check(true)?;
        if tools.is_empty() || tools.len() > MAX_CLAIM_TOOLS {
            return Err(DomainError::BadInput(format!(
                "name 1 to {MAX_CLAIM_TOOLS} tools to claim a call of"
            ))
            .into());
        }
        let served = self.external_tools();
        if let Some(unknown) = tools.iter().find(|t| !served.contains(&t.as_str())) {
            return Err(DomainError::BadInput(format!(
                "{unknown:?} is not a tool served by external workers here (those are {served:?})"
            ))
            .into());
        }
        let inner = &self.inner;
        let lease = lease.clamp(Duration::from_secs(1), MAX_TASK_LEASE);
        let now = inner.clock.now();
        Ok(inner
            .queue
            .claim_call(tools, &worker.tenant, &worker.holder(), now, lease)
            .await?)
    }

    /// Records `worker`'s answer to call `id`; the executor waiting for it
    /// takes it and records the outcome. The same answer sent again by the
    /// same worker is accepted again (until the call is cleared, a minute
    /// past its deadline); anything after another answer, after the lease
    /// or the deadline ran out, is `TaskLost` with nothing stored. Returns
    /// the call's deadline.
    pub async fn answer_tool_call(
        &self,
        id: Uuid,
        worker: &Worker,
        answer: CallAnswer,
    ) -> Result<DateTime<Utc>, RuntimeError> {
        worker.check(false)?;
        let inner = &self.inner;
        let result = match answer {
            // PostgreSQL's text refuses NUL: say so instead of failing the store.
            CallAnswer::Output(output) | CallAnswer::Error(output) if output.contains('\0') => {
                return Err(DomainError::BadInput("an answer must not contain NUL".into()).into());
            }
            CallAnswer::Output(output) => {
                if let Some(why) = inner.config.gitcode.refuse_output(&output) {
                    return Err(DomainError::BadInput(why).into());
                }
                CallResult::Output(output)
            }
            CallAnswer::Error(error) => {
                if error.len() > MAX_CALL_ERROR || error.trim().is_empty() {
                    return Err(DomainError::BadInput(format!(
                        "an error must be 1 to {MAX_CALL_ERROR} bytes"
                    ))
                    .into());
                }
                CallResult::Error(error)
            }
        };
        let Some(call) = inner
            .queue
            .call(id)
            .await?
            .filter(|c| c.tenant == worker.tenant)
        else {
            return Err(gone(
                "no such call is open: it was answered and taken, or its deadline passed",
            ));
        };
        let now = inner.clock.now();
        let holder = match &call.lease {
            Some((holder, until)) => match worker.holds(holder) {
                Some(_) if call.result.is_some() => {
                    return if call.result.as_ref() == Some(&result) {
                        Ok(call.deadline)
                    } else {
                        Err(gone("this worker answered the call differently before"))
                    };
                }
                Some(_) if *until >= now => holder.clone(),
                Some(_) => return Err(gone("this worker's lease on the call ran out")),
                None => return Err(gone("the call is claimed by another worker")),
            },
            None => return Err(gone("the call is not claimed: claim it first")),
        };
        if call.deadline <= now {
            return Err(gone("the call's deadline passed"));
        }
        if !inner.queue.answer_call(id, &holder, now, &result).await? {
            return Err(gone(
                "the call was answered, its lease ran out or its deadline passed meanwhile",
            ));
        }
        inner.calls.answered(id);
        Ok(call.deadline)
    }
}
