//! Roles served by agents outside the service (workers in any language,
//! language models behind them). When a role is served externally, the
//! runtime does not decide at that step: it hands the workflow's queue row
//! to the role ([`hand_over`]), and a worker claims it under a lease, reads
//! the context the built-in agent would have seen, and submits a decision.
//! The decision is checked against the role's schema, recorded with the
//! version the task was handed out at (so a late or second decision can
//! never land), with the worker as its actor and the policy it declares;
//! then the row goes back to the runtime for the next step.
//!
//! A task's id names the workflow and the stream version it waits at
//! (`<workflow>:<version>`). The decision's event ids are derived from the
//! task and the worker, so the same decision sent twice is stored once, and
//! a different decision for a task already decided is refused.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use agentledger_domain::names::AgentRole;
use agentledger_domain::workflow::{
    handle, Command, DomainError, Priority, Text, Verdict, Workflow, WorkflowEvent, WorkflowState,
    MAX_REVISIONS,
};
use agentledger_eventstore::{Actor, ActorKind, PolicyRef, Position, StoreError};
use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use uuid::Uuid;

use super::drive::Outcome;
use super::{fingerprint, positions, History, Inner, Recorder, Runtime, RuntimeError};
use crate::queue::Assignment;

/// The longest lease a worker may ask for, and the one it gets by default.
pub const MAX_TASK_LEASE: Duration = Duration::from_secs(600);
pub const DEFAULT_TASK_LEASE: Duration = Duration::from_secs(60);

/// Where task keys live (UUIDv5).
const TASK_NAMESPACE: Uuid = Uuid::from_u128(0x6167_6c65_6467_6572_7461_736b_0000_0001);

/// A task: the decision workflow `workflow` waits for at stream `version`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TaskId {
    pub workflow: Uuid,
    pub version: u64,
}

impl TaskId {
    /// The task's key in the queue.
    pub fn key(&self) -> Uuid {
        Uuid::new_v5(&TASK_NAMESPACE, self.to_string().as_bytes())
    }

    /// The id of the `index`th event of a decision on this task made by
    /// the lease `holder` (credential and worker id): the same decision
    /// sent again by that worker is the same event, while another worker
    /// of the same credential deciding alike is not.
    fn event_id(&self, holder: &str, index: usize) -> Uuid {
        Uuid::new_v5(&self.key(), format!("{holder}\u{0}{index}").as_bytes())
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.workflow, self.version)
    }
}

impl FromStr for TaskId {
    type Err = DomainError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || DomainError::BadInput(format!("{text:?} is not a task id"));
        let (workflow, version) = text.split_once(':').ok_or_else(bad)?;
        Ok(Self {
            workflow: workflow.parse().map_err(|_| bad())?,
            version: version.parse().map_err(|_| bad())?,
        })
    }
}

/// A worker, as its credential and its own words name it.
#[derive(Debug, Clone)]
pub struct Worker {
    /// The worker's own id (`gatekeeper-7`): the actor's name. Empty when
    /// submitting: the worker named by the lease.
    pub id: String,
    /// The version the worker declares.
    pub version: String,
    /// The credential's stable identity and how it proved it.
    pub subject: String,
    pub method: String,
    /// The credential's tenant: the worker sees only its tasks.
    pub tenant: String,
}

/// A lease holder's name: `subject#id`.
fn holder_of(subject: &str, id: &str) -> String {
    format!("{subject}#{id}")
}

impl Worker {
    /// Who holds a lease: the credential and the worker id, so that two
    /// credentials choosing the same worker id do not share leases.
    pub(super) fn holder(&self) -> String {
        holder_of(&self.subject, &self.id)
    }

    fn actor(&self, role: AgentRole) -> Actor {
        Actor {
            kind: ActorKind::Agent,
            name: self.id.clone(),
            version: self.version.clone(),
            subject: self.subject.clone(),
            method: self.method.clone(),
            role: role.as_str().to_string(),
        }
    }

    /// Whether `holder` is this worker (any worker of this credential
    /// when the id is empty); the holder's worker id.
    pub(super) fn holds<'h>(&self, holder: &'h str) -> Option<&'h str> {
        let (subject, id) = holder.rsplit_once('#')?;
        (subject == self.subject && (self.id.is_empty() || id == self.id)).then_some(id)
    }

    pub(super) fn check(&self, id_required: bool) -> Result<(), DomainError> {
        let fine = |s: &str, max: usize| {
            !s.trim().is_empty() && s.chars().count() <= max && !s.chars().any(char::is_control)
        };
        // `#` separates the credential from the worker id in a lease holder.
        if (id_required || !self.id.is_empty()) && (!fine(&self.id, 128) || self.id.contains('#')) {
            return Err(DomainError::BadInput(
                "the worker id must be 1 to 128 characters, without control characters or '#'"
                    .into(),
            ));
        }
        if !self.version.is_empty() && !fine(&self.version, 64) {
            return Err(DomainError::BadInput(
                "the worker version must be at most 64 characters, without control characters"
                    .into(),
            ));
        }
        Ok(())
    }
}

/// The policy a worker says it decided by.
#[derive(Debug, Clone, Default)]
pub struct DeclaredPolicy {
    pub name: Option<String>,
    pub version: Option<String>,
    /// Of its configuration (prompt, model, rules); derived from name and
    /// version when not given.
    pub fingerprint: Option<String>,
}

/// A claimed task, with what the worker needs to decide.
#[derive(Debug, Clone)]
pub struct AgentTask {
    pub id: TaskId,
    pub role: AgentRole,
    /// Claims of this task so far, this one included.
    pub attempt: i32,
    /// What the built-in agent would see (see [`context`]).
    pub context: Value,
    pub lease_expires_at: DateTime<Utc>,
}

/// The role whose decision a workflow in `state` waits for.
pub fn stage_of(state: WorkflowState) -> Option<AgentRole> {
    match state {
        WorkflowState::Submitted | WorkflowState::Analysing => Some(AgentRole::Analyst),
        WorkflowState::Gating => Some(AgentRole::Gatekeeper),
        WorkflowState::Executing => Some(AgentRole::Executor),
        WorkflowState::Reviewing => Some(AgentRole::Ethics),
        _ => None,
    }
}

/// Hands the claimed workflow to the external workers of `role`; the claim
/// ends here.
pub(super) async fn hand_over(
    inner: &Inner,
    history: &History,
    role: AgentRole,
) -> Result<Outcome, RuntimeError> {
    let task = TaskId {
        workflow: history.id,
        version: history.events.len() as u64,
    };
    let assignment = Assignment {
        role,
        task: task.key(),
        version: task.version,
        tenant: history.tenant.clone(),
    };
    let now = inner.clock.now();
    if inner
        .queue
        .assign(&inner.config.owner, history.id, &assignment, now)
        .await?
    {
        tracing::debug!(%task, role = role.as_str(), "handed to external workers");
        // Nobody listening is fine.
        let _ = inner.task_signal.send(role);
    } else {
        tracing::debug!(%task, "the claim was lost before the hand-over");
    }
    Ok(Outcome::HandedOver)
}

/// Where the row goes after a decision: back to the runtimes with the
/// workflow's priority, or away when nothing automatic is left to do.
fn next_step(workflow: &Workflow) -> Option<Priority> {
    (!workflow.state.is_final() && workflow.state != WorkflowState::AwaitingHuman)
        .then_some(workflow.priority)
}

fn lost(message: &str) -> RuntimeError {
    RuntimeError::TaskLost(message.to_string())
}

impl Runtime {
    /// Whether this runtime leaves `role`'s decisions to external workers.
    pub fn serves_externally(&self, role: AgentRole) -> bool {
        self.inner.config.external.contains(&role)
    }

    /// The JSON Schema of `role`'s decisions; `None` for the executor.
    pub fn agent_decision_schema(&self, role: AgentRole) -> Option<&Value> {
        self.inner.decisions.schema(role)
    }

    /// Signals, by role, that this process handed a task out; workers wait
    /// on these instead of polling (other processes' tasks are found by a
    /// claim, which the signal's subscriber also makes now and then).
    pub fn agent_task_signals(&self) -> tokio::sync::broadcast::Receiver<AgentRole> {
        self.inner.task_signal.subscribe()
    }

    /// Claims the next task of `role` for `worker` (highest priority first)
    /// under a lease of `lease` (capped at [`MAX_TASK_LEASE`]); `None` when
    /// there is none. Tasks whose workflow moved on meanwhile (cancelled,
    /// or decided by a worker whose row was not given back) are given back
    /// to the runtimes on the way.
    pub async fn claim_agent_task(
        &self,
        role: AgentRole,
        worker: &Worker,
        lease: Duration,
    ) -> Result<Option<AgentTask>, RuntimeError> {
        worker.check(true)?;
        if !self.serves_externally(role) {
            return Err(DomainError::BadInput(format!(
                "the {} role is served by the built-in agent on this server",
                role.as_str()
            ))
            .into());
        }
        let inner = &self.inner;
        let lease = lease.clamp(Duration::from_secs(1), MAX_TASK_LEASE);
        let holder = worker.holder();
        loop {
            let now = inner.clock.now();
            let Some(claim) = inner
                .queue
                .claim_task(role, &worker.tenant, &holder, now, lease)
                .await?
            else {
                return Ok(None);
            };
            let task = TaskId {
                workflow: claim.workflow,
                version: claim.assignment.version,
            };
            let history = History::load(&*inner.store, inner.keys(), claim.workflow).await?;
            match history {
                Some(history)
                    if history.events.len() as u64 == task.version
                        && stage_of(history.workflow.state) == Some(role) =>
                {
                    let lease_expires_at = claim.lease.map_or(now, |(_, until)| until);
                    return Ok(Some(AgentTask {
                        id: task,
                        role,
                        attempt: claim.attempt,
                        context: context(role, &history, &inner.tools.specs()),
                        lease_expires_at,
                    }));
                }
                history => {
                    let next = history.as_ref().and_then(|h| next_step(&h.workflow));
                    tracing::info!(%task, "task outdated by its workflow; given back");
                    inner
                        .queue
                        .finish_task(claim.assignment.task, next, now)
                        .await?;
                    if next.is_some() {
                        inner.wake.notify_one();
                    }
                }
            }
        }
    }

    /// Extends `worker`'s lease on `task` by `lease` from now; a lease that
    /// ran out is lost ([`RuntimeError::TaskLost`]).
    pub async fn renew_agent_task(
        &self,
        task: TaskId,
        worker: &Worker,
        lease: Duration,
    ) -> Result<DateTime<Utc>, RuntimeError> {
        let inner = &self.inner;
        let now = inner.clock.now();
        let until =
            crate::queue::lease_end(now, lease.clamp(Duration::from_secs(1), MAX_TASK_LEASE));
        if inner
            .queue
            .renew_task(task.key(), &worker.holder(), now, until)
            .await?
        {
            Ok(until)
        } else {
            Err(lost(
                "this worker holds no lease on the task: it ran out, or the task was decided",
            ))
        }
    }

    /// Gives `worker`'s task back to its role, claimable again after a
    /// pause that grows with its attempts (at most 30 s).
    pub async fn fail_agent_task(
        &self,
        task: TaskId,
        worker: &Worker,
        error: &str,
    ) -> Result<(), RuntimeError> {
        let inner = &self.inner;
        let now = inner.clock.now();
        let attempt = inner
            .queue
            .task(task.key())
            .await?
            .map_or(1, |t| t.attempt.max(1));
        let pause = chrono::Duration::seconds(i64::from(attempt.min(30)));
        if !inner
            .queue
            .release_task(task.key(), &worker.holder(), now, now + pause)
            .await?
        {
            return Err(lost(
                "this worker holds no lease on the task: it ran out, or the task was decided",
            ));
        }
        let error: String = error.chars().take(1000).collect();
        tracing::warn!(%task, worker = %worker.id, attempt, %error, "an external worker gave a task back");
        Ok(())
    }

    /// Records `worker`'s decision on `task`; returns the position of the
    /// workflow's last event. Checked before anything is written:
    /// the decision against its role's schema ([`RuntimeError::InvalidDecision`]),
    /// the worker's lease ([`RuntimeError::TaskLost`]), the domain's rules.
    /// The same decision sent again by the same worker is stored once.
    pub async fn submit_agent_decision(
        &self,
        task: TaskId,
        worker: &Worker,
        decision: &Value,
        policy: DeclaredPolicy,
    ) -> Result<Position, RuntimeError> {
        worker.check(false)?;
        let inner = &self.inner;
        let mut history = History::load(&*inner.store, inner.keys(), task.workflow)
            .await?
            .filter(|h| h.tenant == worker.tenant)
            .ok_or(DomainError::NotFound)?;
        let at = usize::try_from(task.version)
            .ok()
            .filter(|at| *at > 0 && *at <= history.events.len())
            .ok_or(DomainError::NotFound)?;
        let before = Workflow::from_events(history.events[..at].iter().map(|r| &r.event));
        let role = stage_of(before.state)
            .filter(|r| *r != AgentRole::Executor)
            .ok_or(DomainError::NotFound)?;
        let command = inner.decisions.parse(role, decision)?;
        if at < history.events.len() {
            return self
                .decided_before(&history, &before, task, worker, command)
                .await;
        }
        let now = inner.clock.now();
        let row = inner.queue.task(task.key()).await?.ok_or_else(|| {
            lost("no such task is open: it was not handed out, or it went back to the built-in agents")
        })?;
        let worker_id = match &row.lease {
            Some((holder, until)) => match worker.holds(holder) {
                Some(id) if *until >= now => id.to_string(),
                Some(_) => {
                    return Err(lost(
                        "this worker's lease on the task ran out; claim it again",
                    ))
                }
                None => return Err(lost("the task is claimed by another worker")),
            },
            None => return Err(lost("the task is not claimed: claim it first")),
        };
        let submitter = worker;
        let worker = Worker {
            id: worker_id,
            ..worker.clone()
        };
        let holder = worker.holder();
        // Refuse what the domain refuses before the append, as a bad input.
        handle(&history.workflow, command.clone())?;
        let recorder = Recorder {
            actor: worker.actor(role),
            policy: Some(policy_ref(role, &worker, policy)),
        };
        let causation = history.last().map(|r| r.event_id);
        let inputs = inputs_of(role, &history);
        let written = history
            .record_with_ids(
                &*inner.store,
                &recorder,
                vec![command.clone()],
                causation,
                inputs,
                &|index| task.event_id(&holder, index),
            )
            .await;
        match written {
            Ok(true) => {}
            // Another decision landed first, or this one was stored already
            // with other sealed bytes: judge by what the stream now holds.
            Ok(false) | Err(RuntimeError::Store(StoreError::IdempotencyMismatch { .. })) => {
                let history = History::load(&*inner.store, inner.keys(), task.workflow)
                    .await?
                    .ok_or(DomainError::NotFound)?;
                return self
                    .decided_before(&history, &before, task, submitter, command)
                    .await;
            }
            Err(e) => return Err(e),
        }
        self.give_back(task, &history.workflow).await;
        Ok(history.last().map_or(0, |r| r.position))
    }

    /// The stream holds an event at the task's version: this worker's same
    /// decision (stored once: success) or anything else (`TaskLost`).
    async fn decided_before(
        &self,
        history: &History,
        before: &Workflow,
        task: TaskId,
        worker: &Worker,
        command: Command,
    ) -> Result<Position, RuntimeError> {
        let at = task.version as usize;
        let recorded = &history.events[at];
        let moved_on = || {
            lost("the task was decided already, by another worker or agent, or its workflow moved on")
        };
        // Whose decision it is: the stored actor, checked against the id
        // only that worker's decision gets.
        let stored = self
            .inner
            .store
            .read_stream(&history.stream, task.version, 1)
            .await?;
        let Some(actor) = stored
            .first()
            .filter(|e| e.event_id == recorded.event_id)
            .and_then(|e| e.metadata().ok())
            .map(|m| m.actor)
        else {
            return Err(moved_on());
        };
        let by_this_worker = actor.subject == worker.subject
            && (worker.id.is_empty() || actor.name == worker.id)
            && recorded.event_id == task.event_id(&holder_of(&actor.subject, &actor.name), 0);
        if !by_this_worker {
            return Err(moved_on());
        }
        let same = handle(before, command)
            .ok()
            .and_then(|events| events.into_iter().next())
            .is_some_and(|first| first.encode() == recorded.event.encode());
        if !same {
            return Err(lost(
                "this worker recorded a different decision for the task",
            ));
        }
        // A crash may have left the row assigned after the append.
        self.give_back(task, &history.workflow).await;
        Ok(history.last().map_or(0, |r| r.position))
    }

    /// Ends the task's row after its decision: back to the runtimes, or away.
    async fn give_back(&self, task: TaskId, workflow: &Workflow) {
        let inner = &self.inner;
        let next = next_step(workflow);
        match inner
            .queue
            .finish_task(task.key(), next, inner.clock.now())
            .await
        {
            Ok(_) if next.is_some() => inner.wake.notify_one(),
            Ok(_) => {}
            // The next claim of the task finds it decided and gives it back.
            Err(e) => tracing::warn!(%task, error = %e, "giving a decided task back failed"),
        }
    }
}

fn policy_ref(role: AgentRole, worker: &Worker, declared: DeclaredPolicy) -> PolicyRef {
    let name = declared
        .name
        .filter(|n| !n.trim().is_empty())
        .unwrap_or_else(|| format!("{}-external", role.as_str().to_lowercase()));
    let version = declared
        .version
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| worker.version.clone());
    let fingerprint = declared
        .fingerprint
        .filter(|f| !f.trim().is_empty())
        .unwrap_or_else(|| fingerprint(&json!({ "name": name, "version": version })));
    PolicyRef {
        name,
        version,
        fingerprint,
    }
}

/// The events a decision of `role` rests on, as the built-in agents name them.
fn inputs_of(role: AgentRole, history: &History) -> Vec<Position> {
    match role {
        AgentRole::Analyst => {
            let mut seen = vec![&history.events[0]];
            seen.extend(history.last_where(|e| {
                matches!(
                    e,
                    WorkflowEvent::GateDecided {
                        verdict: Verdict::Revise,
                        ..
                    }
                )
            }));
            positions(seen)
        }
        AgentRole::Gatekeeper => {
            let mut seen = vec![&history.events[0]];
            seen.extend(
                history.last_where(|e| matches!(e, WorkflowEvent::AnalysisProduced { .. })),
            );
            positions(seen)
        }
        AgentRole::Executor | AgentRole::Ethics => positions(&history.events),
    }
}

fn text(t: &Text) -> &str {
    t.as_str()
}

fn priority_name(priority: Priority) -> &'static str {
    match priority {
        Priority::Low => "LOW",
        Priority::Normal => "NORMAL",
        Priority::High => "HIGH",
        Priority::Critical => "CRITICAL",
    }
}

fn verdict_name(verdict: Verdict) -> &'static str {
    match verdict {
        Verdict::Approve => "APPROVE",
        Verdict::Reject => "REJECT",
        Verdict::Revise => "REVISE",
        Verdict::Escalate => "ESCALATE",
    }
}

/// What a worker of `role` sees: what the built-in agent would. Every
/// role gets the request, the input document, the priority and the
/// revision round; then
/// - ANALYST: the tools it may plan with, and the gatekeeper's feedback
///   when it asked for a revision;
/// - GATEKEEPER: the analysis to judge and the revisions left;
/// - ETHICS: the analysis, the gate's verdict, a person's decision if one
///   was made, and every subtask with its attempts and output.
pub fn context(
    role: AgentRole,
    history: &History,
    tools: &[agentledger_domain::tools::ToolSpec],
) -> Value {
    let workflow = &history.workflow;
    let last_analysis = history.last_where(|e| matches!(e, WorkflowEvent::AnalysisProduced { .. }));
    let analysis = last_analysis.map(|r| match &r.event {
        WorkflowEvent::AnalysisProduced {
            round,
            subtasks,
            confidence,
            rationale,
            ..
        } => json!({
            "round": round,
            "subtasks": subtasks.iter().map(|s| json!({
                "id": s.id,
                "title": text(&s.title),
                "tool": s.tool,
                "dependsOn": s.depends_on,
            })).collect::<Vec<_>>(),
            "confidence": confidence,
            "rationale": text(rationale),
        }),
        _ => Value::Null,
    });
    let gate = history
        .last_where(|e| matches!(e, WorkflowEvent::GateDecided { .. }))
        .map(|r| match &r.event {
            WorkflowEvent::GateDecided {
                round,
                verdict,
                priority,
                risk,
                reasons,
                rationale,
                ..
            } => json!({
                "round": round,
                "verdict": verdict_name(*verdict),
                "priority": priority_name(*priority),
                "risk": risk,
                "reasons": reasons.iter().map(text).collect::<Vec<_>>(),
                "rationale": text(rationale),
            }),
            _ => Value::Null,
        });
    let mut context = json!({
        "workflowId": history.id,
        "request": text(&workflow.request),
        "input": workflow.input.as_ref().map(text),
        "priority": priority_name(workflow.priority),
        "round": workflow.round,
    });
    let extra = match role {
        AgentRole::Analyst => json!({
            "tools": tools.iter().map(|t| json!({
                "name": t.name,
                "description": t.description,
                "keywords": t.keywords,
            })).collect::<Vec<_>>(),
            // Present on a revision round: what the gatekeeper asked for.
            "feedback": gate.filter(|g| g["verdict"] == "REVISE"),
        }),
        AgentRole::Gatekeeper => json!({
            "analysis": analysis,
            "tools": tools.iter().map(|t| t.name).collect::<Vec<_>>(),
            "revisionsLeft": MAX_REVISIONS.saturating_sub(workflow.round),
        }),
        AgentRole::Executor | AgentRole::Ethics => {
            let human = history
                .last_where(|e| matches!(e, WorkflowEvent::HumanDecisionRecorded { .. }))
                .map(|r| match &r.event {
                    WorkflowEvent::HumanDecisionRecorded {
                        approve, comment, ..
                    } => json!({ "approve": approve, "comment": text(comment) }),
                    _ => Value::Null,
                });
            json!({
                "analysis": analysis,
                "gate": gate,
                "humanDecision": human,
                "subtasks": workflow.subtasks.iter().map(|s| json!({
                    "id": s.plan.as_ref().map(|p| p.id.as_str()),
                    "title": s.plan.as_ref().map(|p| text(&p.title)),
                    "tool": s.plan.as_ref().map(|p| p.tool.as_str()),
                    "state": s.state,
                    "attempts": s.attempts,
                    "output": s.output.as_ref().map(text),
                })).collect::<Vec<_>>(),
            })
        }
    };
    if let (Value::Object(context), Value::Object(extra)) = (&mut context, extra) {
        context.extend(extra);
    }
    context
}
