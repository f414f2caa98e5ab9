//! Driving one claimed workflow: fold it, let the agent whose turn it is
//! decide, record the decision, repeat until a hand-off.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use agentledger_domain::policy::{gitcode, lubit, rune, sena};
use agentledger_domain::workflow::{
    handle, CacheRef, Command, FailureKind, Priority, Text, ToolIntent, Verdict, Workflow,
    WorkflowEvent, WorkflowState,
};
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use sha2::Digest;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::{positions, History, Inner, Recorded, Recorder, RuntimeError};
use crate::cache;
use crate::clock;
use crate::faults::FaultPoint;
use crate::queue::Claim;
use crate::tool::{DeclaredCall, ToolCall, ToolFailure};
use crate::trace;
use agentledger_domain::names::AgentRole;

/// How a claim ended, and so what happens to its queue row.
#[derive(Debug)]
pub(super) enum Outcome {
    /// Final or waiting for a person: the row goes (unless new work came).
    Settled,
    /// Approved: back in the queue, ordered by the gate's priority.
    Requeue(Priority),
    /// Someone else recorded first; let the row go for a fresh look.
    Superseded,
    /// The stream does not exist (yet).
    NoStream,
    /// Nothing can move (a plan the executor cannot schedule); look again later.
    Stuck,
    /// The runtime died or stopped: leave everything as it is.
    Dead,
    /// Given to the external workers of a role: the row is theirs now.
    HandedOver,
}

pub(super) async fn drive(inner: &Inner, claim: Claim, history: Option<History>) {
    let id = claim.workflow;
    let outcome = match drive_claim(inner, &claim, history).await {
        Ok(outcome) => outcome,
        Err(RuntimeError::Rejected(e)) => {
            // The fold and the policies disagree: a bug, not bad input.
            tracing::error!(workflow = %id, error = %e, "a policy produced a command the domain refused");
            Outcome::Stuck
        }
        Err(e) => {
            tracing::warn!(workflow = %id, error = %e, "driving the workflow failed; it will be retried");
            Outcome::Stuck
        }
    };
    tracing::debug!(workflow = %id, ?outcome, owner = %inner.config.owner, "claim ended");
    if matches!(outcome, Outcome::Dead) || inner.dead.is_cancelled() {
        return;
    }
    let queue = &inner.queue;
    let owner = &inner.config.owner;
    let now = inner.clock.now();
    let later = |d: Duration| now + chrono::Duration::from_std(d).unwrap_or_default();
    let mut requeued = matches!(outcome, Outcome::Requeue(_) | Outcome::Superseded);
    let result = match outcome {
        // Work enqueued while this claim ran (a person's decision) keeps the
        // row: it is claimable at once, and its record's wake-up may have
        // been skipped because this runtime held the workflow.
        Outcome::Settled => queue
            .complete(owner, id, claim.seq, now)
            .await
            .map(|released| requeued = released),
        Outcome::Requeue(priority) => queue.release(owner, id, Some(priority), now).await,
        Outcome::Superseded => queue.release(owner, id, None, now).await,
        Outcome::NoStream
            if now - claim.enqueued_at
                > chrono::Duration::from_std(inner.config.orphan_grace).unwrap_or_default() =>
        {
            tracing::warn!(workflow = %id, "queued workflow has no events; dropping its row");
            queue
                .complete(owner, id, claim.seq, now)
                .await
                .map(|released| requeued = released)
        }
        // Its submission may not have committed yet.
        Outcome::NoStream => {
            queue
                .release(
                    owner,
                    id,
                    None,
                    later(inner.config.poll_interval.min(Duration::from_millis(200))),
                )
                .await
        }
        Outcome::Stuck => {
            queue
                .release(owner, id, None, later(inner.config.lease))
                .await
        }
        Outcome::HandedOver => Ok(()),
        Outcome::Dead => unreachable!("handled above"),
    };
    if let Err(e) = result {
        tracing::warn!(workflow = %id, error = %e, "updating the queue failed; the lease will expire");
    }
    inner.forget(id);
    if requeued {
        // The row is claimable now: don't leave it to the next poll.
        inner.wake.notify_one();
    }
}

async fn drive_claim(
    inner: &Inner,
    claim: &Claim,
    known: Option<History>,
) -> Result<Outcome, RuntimeError> {
    if inner.crash_at(FaultPoint::AfterClaim) {
        return Ok(Outcome::Dead);
    }
    let history = match known {
        Some(history) => Some(history),
        None => History::load(&*inner.store, inner.keys(), claim.workflow).await?,
    };
    let Some(mut history) = history else {
        return Ok(Outcome::NoStream);
    };
    loop {
        if inner.dead.is_cancelled() {
            return Ok(Outcome::Dead);
        }
        if let Some(role) = super::stage_of(history.workflow.state)
            .filter(|role| inner.config.external.contains(role))
        {
            return super::external::hand_over(inner, &history, role).await;
        }
        let agents = &inner.agents;
        let step = match history.workflow.state {
            WorkflowState::Submitted | WorkflowState::Analysing => {
                analyse(inner, &mut history)
                    .instrument(trace::agent_span(&agents.sena.actor))
                    .await?
            }
            WorkflowState::Gating => {
                gate(inner, &mut history, claim.priority)
                    .instrument(trace::agent_span(&agents.lubit.actor))
                    .await?
            }
            WorkflowState::Executing => {
                execute(inner, &mut history)
                    .instrument(trace::agent_span(&agents.gitcode.actor))
                    .await?
            }
            WorkflowState::Reviewing => {
                review(inner, &mut history)
                    .instrument(trace::agent_span(&agents.rune.actor))
                    .await?
            }
            _ => Some(Outcome::Settled),
        };
        if let Some(outcome) = step {
            return Ok(outcome);
        }
    }
}

/// `None` to go on with the next stage, or how the claim ends.
type Step = Option<Outcome>;

fn recorded(written: bool, inner: &Inner, point: FaultPoint) -> Step {
    if !written {
        Some(Outcome::Superseded)
    } else if inner.crash_at(point) {
        Some(Outcome::Dead)
    } else {
        None
    }
}

async fn analyse(inner: &Inner, history: &mut History) -> Result<Step, RuntimeError> {
    let workflow = &history.workflow;
    let analysis = sena::analyse(
        &inner.config.sena,
        workflow.request.as_str(),
        workflow.round,
        &inner.tools.specs(),
    );
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
    let inputs = positions(seen);
    let causation = history.last().map(|r| r.event_id);
    let command = Command::RecordAnalysis {
        model: None,
        subtasks: analysis.subtasks,
        confidence: analysis.confidence,
        rationale: analysis.rationale,
    };
    let (command, recorder) = by_model_or(
        inner,
        history,
        AgentRole::Analyst,
        command,
        &inner.agents.sena,
    )
    .await;
    let appended_from = history.events.len();
    let written = history
        .record(&*inner.store, &recorder, vec![command], causation, inputs)
        .await?;
    if written && inner.llm.is_some() {
        remember_answer(inner, &history.events[appended_from..]);
    }
    Ok(recorded(written, inner, FaultPoint::AfterAnalysis))
}

async fn gate(
    inner: &Inner,
    history: &mut History,
    claimed: Priority,
) -> Result<Step, RuntimeError> {
    let Some(analysis) =
        history.last_where(|e| matches!(e, WorkflowEvent::AnalysisProduced { .. }))
    else {
        return Err(RuntimeError::Corrupt("gating without an analysis".into()));
    };
    let WorkflowEvent::AnalysisProduced {
        subtasks,
        confidence,
        ..
    } = &analysis.event
    else {
        unreachable!("matched above");
    };
    let registered = inner.tools.names();
    let workflow = &history.workflow;
    let decision = lubit::decide(
        &inner.config.lubit,
        &lubit::GateInput {
            request: workflow.request.as_str(),
            round: workflow.round,
            subtasks,
            confidence: *confidence,
            priority: workflow.priority,
            registered: &registered,
        },
    );
    let inputs = positions([&history.events[0], analysis]);
    let causation = Some(analysis.event_id);
    let command = Command::RecordGate {
        model: None,
        verdict: decision.verdict,
        priority: decision.priority,
        risk: decision.risk,
        reasons: decision.reasons,
        rationale: decision.rationale,
    };
    let (command, recorder) = by_model_or(
        inner,
        history,
        AgentRole::Gatekeeper,
        command,
        &inner.agents.lubit,
    )
    .await;
    let Command::RecordGate {
        verdict, priority, ..
    } = command
    else {
        unreachable!("a gate decision stays one");
    };
    let appended_from = history.events.len();
    let written = history
        .record(&*inner.store, &recorder, vec![command], causation, inputs)
        .await?;
    if written && inner.llm.is_some() {
        remember_answer(inner, &history.events[appended_from..]);
    }
    // An approval whose priority differs from the one the claim was made
    // under goes back to the queue, where the new priority orders it; with
    // the same priority, the claim's place in the queue was already right.
    Ok(
        recorded(written, inner, FaultPoint::AfterGate).or(match verdict {
            Verdict::Approve if priority != claimed => Some(Outcome::Requeue(priority)),
            _ => None,
        }),
    )
}

async fn review(inner: &Inner, history: &mut History) -> Result<Step, RuntimeError> {
    let events: Vec<WorkflowEvent> = history.events.iter().map(|r| r.event.clone()).collect();
    let review = rune::review(&inner.config.rune, &events);
    let inputs = positions(&history.events);
    let causation = history.last().map(|r| r.event_id);
    let command = Command::RecordEthics {
        model: None,
        scores: review.scores,
        passed: review.passed,
        findings: review.findings,
        rationale: None,
    };
    let (command, recorder) = by_model_or(
        inner,
        history,
        AgentRole::Ethics,
        command,
        &inner.agents.rune,
    )
    .await;
    let appended_from = history.events.len();
    let written = history
        .record(&*inner.store, &recorder, vec![command], causation, inputs)
        .await?;
    if written && inner.llm.is_some() {
        remember_answer(inner, &history.events[appended_from..]);
    }
    Ok(recorded(written, inner, FaultPoint::AfterReview))
}

/// `role`'s decision: the model's when a model serves the role and its
/// answer holds (the role's schema, then the domain's rules); otherwise
/// `reference`, the reference policy's, with the model's failure recorded
/// beside it (`fallback`). Without a model, `reference` as it is.
async fn by_model_or(
    inner: &Inner,
    history: &History,
    role: AgentRole,
    reference: Command,
    reference_recorder: &Recorder,
) -> (Command, Recorder) {
    let Some((model, recorders)) = inner.llm.as_ref() else {
        return (reference, reference_recorder.clone());
    };
    let Some((_, recorder)) = recorders.iter().find(|(r, _)| *r == role) else {
        return (reference, reference_recorder.clone());
    };
    let (Some(schema), context) = (
        inner.decisions.schema(role),
        super::external::context(role, history, &inner.tools.specs()),
    ) else {
        return (reference, reference_recorder.clone());
    };
    // The model decides on the workflow's content, not its id: the same
    // content is the same prompt (and may be answered from the cache).
    let mut context = context;
    if let Some(fields) = context.as_object_mut() {
        fields.remove("workflowId");
    }
    let prepared = model.prepare(role, &context, schema);
    // A subject's answers are sealed under its key: never shared.
    let key = (history.workflow.sealing.is_none() && inner.cache.serves_role(role)).then(|| {
        let policy = recorder
            .policy
            .as_ref()
            .map_or("", |p| p.fingerprint.as_str());
        let schema = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(schema.to_string()));
        cache::model_key(
            &history.tenant,
            policy,
            &schema,
            &prepared.call.prompt_sha256,
        )
    });
    let mut prepared = prepared;
    prepared.call.cache_key = key.map(hex::encode);
    let hit = key.and_then(|key| inner.cache.get(cache::Kind::Model, &key, inner.clock.now()));
    let asked = match hit {
        Some(hit) => crate::llm::LlmAgent::reuse(prepared, &hit.value, hit.position),
        None => model.send(prepared, &*inner.clock).await,
    };
    let mut call = asked.call;
    trace::record_model(&call);
    let decided = asked.decision.and_then(|decision| {
        let command = inner
            .decisions
            .parse(role, &decision)
            .map_err(|e| format!("the answer breaks the decision schema: {e}"))?;
        handle(&history.workflow, command.clone())
            .map_err(|e| format!("the answer breaks the workflow's rules: {e}"))?;
        Ok(command)
    });
    match decided {
        Ok(command) => (command.with_model(call), recorder.clone()),
        Err(reason) => {
            tracing::warn!(workflow = %history.id, role = role.as_str(), %reason, "the model's decision was not used; the reference policy decided");
            call.fallback = true;
            call.fallback_reason = Some(Text::new(reason));
            (reference.with_model(call), reference_recorder.clone())
        }
    }
}

/// Puts the model's fresh answer recorded among `appended` into the
/// cache, at its position, under the key it was recorded with.
fn remember_answer(inner: &Inner, appended: &[Recorded]) {
    for recorded in appended {
        let (WorkflowEvent::AnalysisProduced { model, .. }
        | WorkflowEvent::GateDecided { model, .. }
        | WorkflowEvent::EthicsReviewed { model, .. }) = &recorded.event
        else {
            continue;
        };
        let Some((call, key)) = model.as_ref().and_then(cacheable_answer) else {
            continue;
        };
        inner.cache.put(
            key,
            cache::Entry {
                position: recorded.position,
                value: call.answer.as_str().to_string(),
                recorded_at: inner.clock.now(),
                cost_ms: call.latency_ms,
            },
        );
    }
}

/// A model's fresh answer recorded with a cache key (the cache was on and
/// the workflow had no data subject), and that key.
fn cacheable_answer(
    call: &agentledger_domain::workflow::ModelCall,
) -> Option<(&agentledger_domain::workflow::ModelCall, [u8; 32])> {
    let usable = !call.fallback && call.reused_from.is_none() && call.answer.is_plain();
    let key = call.cache_key.as_deref().and_then(cache::parse_key)?;
    usable.then_some((call, key))
}

/// What a subtask in flight reports.
enum Progress {
    /// Its backoff is over: record the start and run it.
    Due { subtask: String, attempt: u8 },
    /// Its tool returned (or timed out), or the result cache answered.
    Done {
        subtask: String,
        attempt: u8,
        result: Result<String, (FailureKind, String)>,
        /// With the result cache on for a deterministic tool.
        cache: Option<CacheRef>,
        /// What the run took (ms); 0 for a reuse.
        cost_ms: u64,
        /// The call was sent and its answer lost or late: whether it acted
        /// is unknown.
        unknown: bool,
    },
}

async fn execute(inner: &Inner, history: &mut History) -> Result<Step, RuntimeError> {
    let config = &inner.config.gitcode;
    let mut in_flight: HashSet<String> = HashSet::new();
    let mut running: FuturesUnordered<BoxFuture<'_, Progress>> = FuturesUnordered::new();
    // A tool result not yet recorded: it goes into one append with what it
    // unblocks (the next starts, skips, the end of execution), so that a
    // chain of subtasks costs one commit per step, not two.
    let mut result: Option<(Command, String, u8)> = None;
    // What fresh results of cached tools took, by cache key, until recorded.
    let mut costs: HashMap<String, u64> = HashMap::new();
    loop {
        if inner.dead.is_cancelled() {
            return Ok(Some(Outcome::Dead));
        }
        let mut commands: Vec<Command> = Vec::new();
        let mut preview = history.workflow.clone();
        let mut source = None;
        if let Some((command, subtask, attempt)) = result.take() {
            plan(&mut preview, &mut commands, command)?;
            source = Some((subtask, attempt));
        }
        let mut starts = Vec::new();
        let mut finishing = false;
        // Pure tools (the built-ins) run here, before anything is recorded:
        // their start and result go into this append with what they
        // unblock, so a chain of them costs one commit. A crash before the
        // append loses only work that runs again the same (they have no
        // side effects). Other tools have their start recorded first.
        let mut look_again = true;
        while look_again {
            look_again = false;
            for action in gitcode::next_actions(config, &preview, &in_flight) {
                match action {
                    gitcode::Action::Abandon { subtask, attempt } => plan(
                        &mut preview,
                        &mut commands,
                        Command::FailSubtask {
                            subtask,
                            attempt,
                            kind: FailureKind::Abandoned,
                            error: "its worker stopped before it ended (lease expired)".into(),
                        },
                    )?,
                    gitcode::Action::Escalate {
                        subtask,
                        attempt,
                        reason,
                    } => plan(
                        &mut preview,
                        &mut commands,
                        Command::EscalateSubtask {
                            subtask,
                            attempt,
                            kind: FailureKind::Abandoned,
                            error: "its executor stopped between the call and its outcome".into(),
                            reason,
                        },
                    )?,
                    gitcode::Action::Skip { subtask, reason } => plan(
                        &mut preview,
                        &mut commands,
                        Command::SkipSubtask { subtask, reason },
                    )?,
                    gitcode::Action::Start {
                        subtask,
                        attempt,
                        delay,
                    } if delay.is_zero() => {
                        if !(config.inline_pure_tools && runs_inline(inner, &preview, &subtask)) {
                            let (intent, declared) =
                                declare(inner, history, &preview, &subtask).await;
                            in_flight.insert(subtask.clone());
                            commands.push(Command::StartSubtask {
                                subtask: subtask.clone(),
                                attempt,
                                intent,
                            });
                            starts.push((subtask, attempt, declared));
                            continue;
                        }
                        let start = Command::StartSubtask {
                            subtask: subtask.clone(),
                            attempt,
                            intent: None,
                        };
                        plan(&mut preview, &mut commands, start)?;
                        let Progress::Done {
                            result: outcome,
                            cache,
                            cost_ms,
                            ..
                        } = run_tool(
                            inner,
                            (history.id, &history.tenant),
                            &preview,
                            subtask.clone(),
                            attempt,
                            None,
                        )
                        .await
                        else {
                            unreachable!("a tool run ends with its result")
                        };
                        if inner.crash_at(FaultPoint::BeforeSubtaskResult) {
                            return Ok(Some(Outcome::Dead));
                        }
                        note_cost(&mut costs, &cache, cost_ms);
                        plan(
                            &mut preview,
                            &mut commands,
                            result_command(subtask, attempt, outcome, cache),
                        )?;
                        look_again = true;
                    }
                    gitcode::Action::Start {
                        subtask,
                        attempt,
                        delay,
                    } => {
                        in_flight.insert(subtask.clone());
                        let sleep = inner.clock.sleep(delay);
                        running.push(
                            async move {
                                sleep.await;
                                Progress::Due { subtask, attempt }
                            }
                            .boxed(),
                        );
                    }
                    gitcode::Action::Finish => {
                        plan(&mut preview, &mut commands, Command::FinishExecution)?;
                        finishing = true;
                    }
                }
            }
        }
        if !commands.is_empty() {
            let (causation, inputs) = gitcode_basis(history, source);
            let appended_from = history.events.len();
            let written = history
                .record(
                    &*inner.store,
                    &inner.agents.gitcode,
                    commands,
                    causation,
                    inputs,
                )
                .await?;
            if !written {
                return Ok(Some(Outcome::Superseded));
            }
            remember_results(inner, &history.events[appended_from..], &mut costs);
            if history.workflow.state != WorkflowState::Executing && !finishing {
                // An escalation: the workflow waits for a person.
                return Ok(None);
            }
            let started = !starts.is_empty();
            for (subtask, attempt, declared) in starts {
                running.push(run_tool(
                    inner,
                    (history.id, &history.tenant),
                    &history.workflow,
                    subtask,
                    attempt,
                    declared,
                ));
            }
            if started && inner.crash_at(FaultPoint::AfterSubtaskStarted) {
                return Ok(Some(Outcome::Dead));
            }
            if finishing {
                return Ok(recorded(true, inner, FaultPoint::AfterExecution));
            }
            continue;
        }
        let progress = tokio::select! {
            progress = running.next() => progress,
            () = inner.dead.cancelled() => return Ok(Some(Outcome::Dead)),
        };
        let Some(progress) = progress else {
            tracing::error!(workflow = %history.id, "execution cannot move: no subtask is ready or running");
            return Ok(Some(Outcome::Stuck));
        };
        match progress {
            Progress::Due { subtask, attempt } => {
                let causation = history.last().map(|r| r.event_id);
                let inputs = positions(history.last());
                let (intent, declared) = declare(inner, history, &history.workflow, &subtask).await;
                let command = Command::StartSubtask {
                    subtask: subtask.clone(),
                    attempt,
                    intent,
                };
                if !history
                    .record(
                        &*inner.store,
                        &inner.agents.gitcode,
                        vec![command],
                        causation,
                        inputs,
                    )
                    .await?
                {
                    return Ok(Some(Outcome::Superseded));
                }
                running.push(run_tool(
                    inner,
                    (history.id, &history.tenant),
                    &history.workflow,
                    subtask,
                    attempt,
                    declared,
                ));
                if inner.crash_at(FaultPoint::AfterSubtaskStarted) {
                    return Ok(Some(Outcome::Dead));
                }
            }
            Progress::Done {
                subtask,
                attempt,
                result: outcome,
                cache,
                cost_ms,
                unknown,
            } => {
                if inner.crash_at(FaultPoint::BeforeSubtaskResult) {
                    return Ok(Some(Outcome::Dead));
                }
                in_flight.remove(&subtask);
                note_cost(&mut costs, &cache, cost_ms);
                let command = match (unknown, outcome) {
                    (true, Err((kind, error))) => {
                        unknown_outcome(&history.workflow, subtask.clone(), attempt, kind, error)
                    }
                    (_, outcome) => result_command(subtask.clone(), attempt, outcome, cache),
                };
                result = Some((command, subtask, attempt));
            }
        }
    }
}

/// Causation and inputs of an executor append: the start of the attempt
/// whose result it records (when it records one), else the last event; and
/// the approval the execution runs under.
fn gitcode_basis(
    history: &History,
    result_of: Option<(String, u8)>,
) -> (Option<uuid::Uuid>, Vec<agentledger_eventstore::Position>) {
    let approval = history.last_where(|e| {
        matches!(
            e,
            WorkflowEvent::GateDecided {
                verdict: Verdict::Approve,
                ..
            } | WorkflowEvent::HumanDecisionRecorded { approve: true, .. }
        )
    });
    let cause = match &result_of {
        Some((subtask, attempt)) => history.last_where(|e| {
            matches!(e, WorkflowEvent::SubtaskStarted { subtask: s, attempt: a, .. } if s == subtask && a == attempt)
        }),
        None => history.last(),
    };
    let mut inputs = positions(approval);
    inputs.extend(cause.map(|r| r.position).filter(|p| !inputs.contains(p)));
    (cause.map(|r| r.event_id), inputs)
}

/// Adds `command` to those of the next append, applied to `preview`, so
/// that a second look at the plan sees what the append will record.
fn plan(
    preview: &mut Workflow,
    commands: &mut Vec<Command>,
    command: Command,
) -> Result<(), RuntimeError> {
    let events = handle(preview, command.clone())?;
    *preview = events.iter().fold(preview.clone(), Workflow::apply);
    commands.push(command);
    Ok(())
}

/// The command that records an attempt's outcome.
fn result_command(
    subtask: String,
    attempt: u8,
    outcome: Result<String, (FailureKind, String)>,
    cache: Option<CacheRef>,
) -> Command {
    match outcome {
        Ok(output) => Command::CompleteSubtask {
            subtask,
            attempt,
            output: Text::new(output),
            cache,
        },
        Err((kind, error)) => Command::FailSubtask {
            subtask,
            attempt,
            kind,
            error,
        },
    }
}

/// The command for an attempt whose call was sent and whose outcome is
/// unknown: for a declared call of a tool not idempotent, with attempts
/// left, the attempt fails and a person decides; otherwise it fails (as
/// `kind`) and is retried as usual, its repeat keeping the call's key.
fn unknown_outcome(
    workflow: &Workflow,
    subtask: String,
    attempt: u8,
    kind: FailureKind,
    error: String,
) -> Command {
    let intent = workflow
        .subtask(&subtask)
        .and_then(|s| s.intent.as_ref())
        .filter(|i| !i.idempotent && attempt < agentledger_domain::workflow::MAX_ATTEMPTS);
    match intent {
        Some(intent) => Command::EscalateSubtask {
            reason: gitcode::lost_call(intent, &error),
            subtask,
            attempt,
            kind,
            error,
        },
        None => Command::FailSubtask {
            subtask,
            attempt,
            kind,
            error,
        },
    }
}

/// Keeps what a fresh cached result took, until its event is recorded.
fn note_cost(costs: &mut HashMap<String, u64>, cache: &Option<CacheRef>, cost_ms: u64) {
    if let Some(CacheRef {
        key,
        reused_from: None,
    }) = cache
    {
        costs.insert(key.clone(), cost_ms);
    }
}

/// Puts fresh results of cached tools among `appended` into the cache, at
/// the positions that recorded them.
fn remember_results(inner: &Inner, appended: &[Recorded], costs: &mut HashMap<String, u64>) {
    for recorded in appended {
        if let WorkflowEvent::SubtaskSucceeded {
            output,
            cache:
                Some(CacheRef {
                    key,
                    reused_from: None,
                }),
            ..
        } = &recorded.event
        {
            let Some(parsed) = cache::parse_key(key).filter(|_| output.is_plain()) else {
                continue;
            };
            let value = output.as_str();
            inner.cache.put(
                parsed,
                cache::Entry {
                    position: recorded.position,
                    value: value.to_string(),
                    recorded_at: inner.clock.now(),
                    cost_ms: costs.remove(key).unwrap_or(0),
                },
            );
        }
    }
}

/// Whether `subtask`'s tool is pure, so that it may run before its start
/// is recorded.
fn runs_inline(inner: &Inner, workflow: &Workflow, subtask: &str) -> bool {
    workflow
        .subtask(subtask)
        .and_then(|s| s.plan.as_ref())
        .and_then(|plan| inner.tools.get(&plan.tool))
        .is_some_and(|tool| tool.pure())
}

/// What the run of an attempt is handed about its declared call: the call,
/// or why it could not be declared (the attempt then fails so).
type Declared = Option<Result<DeclaredCall, ToolFailure>>;

/// The intent of `subtask`'s next call, for a tool that declares its calls
/// ([`crate::Tool::intent`]): what the start of the attempt records, and
/// what the run is handed. The idempotency key is the id the start event
/// will have, unless the last attempt's call was lost (abandoned, timed
/// out): the repeat then keeps its key, so that a server that keeps keys
/// acts at most once. `(None, None)` for other tools.
async fn declare(
    inner: &Inner,
    history: &History,
    workflow: &Workflow,
    subtask: &str,
) -> (Option<ToolIntent>, Declared) {
    let Some(current) = workflow.subtask(subtask) else {
        return (None, None);
    };
    let Some(plan) = current.plan.as_ref() else {
        return (None, None);
    };
    let Some(tool) = inner.tools.get(&plan.tool) else {
        return (None, None);
    };
    let input = gitcode::tool_input(workflow, subtask);
    let asked = tokio::select! {
        asked = tool.intent(plan.title.as_str(), &input) => asked,
        () = inner.dead.cancelled() => {
            return (None, Some(Err(ToolFailure::Error("the runtime stopped".into()))));
        }
    };
    let call = match asked {
        None => return (None, None),
        Some(Err(failure)) => return (None, Some(Err(failure))),
        Some(Ok(call)) => call,
    };
    let arguments = serde_json::Value::Object(call.arguments);
    let digest = sha2::Sha256::digest(agentledger_eventstore::chain::canonical_json(&arguments));
    let serde_json::Value::Object(arguments) = arguments else {
        unreachable!("built as an object")
    };
    let arguments_sha256 = hex::encode(digest);
    // A lost call made again keeps its key (same server, tool and arguments).
    let repeated = current
        .intent
        .as_ref()
        .filter(|_| {
            matches!(
                current.last_failure,
                Some(FailureKind::Abandoned | FailureKind::Timeout)
            )
        })
        .filter(|last| {
            (&last.server, &last.tool, &last.arguments_sha256)
                == (&call.server, &call.tool, &arguments_sha256)
        })
        .and_then(|last| {
            let first = history
                .events
                .iter()
                .find(|r| r.event_id == last.idempotency_key)?;
            Some((last.idempotency_key, first.position))
        });
    let (key, repeats) = match repeated {
        Some((key, position)) => (key, Some(position)),
        None => (uuid::Uuid::now_v7(), None),
    };
    (
        Some(ToolIntent {
            server: call.server,
            tool: call.tool,
            arguments_sha256,
            idempotency_key: key,
            repeats,
            idempotent: call.idempotent,
        }),
        Some(Ok(DeclaredCall {
            idempotency_key: key,
            arguments,
        })),
    )
}

/// One attempt of `subtask`'s tool, under the attempt deadline, with its
/// input from `workflow` (workflow `id`) and its declared call, if any.
fn run_tool<'a>(
    inner: &'a Inner,
    history: (uuid::Uuid, &str),
    workflow: &Workflow,
    subtask: String,
    attempt: u8,
    declared: Declared,
) -> BoxFuture<'a, Progress> {
    let plan = workflow.subtask(&subtask).and_then(|s| s.plan.clone());
    let input = gitcode::tool_input(workflow, &subtask);
    // A subject's results are sealed under its key: never shared.
    let shareable = workflow.sealing.is_none();
    let (workflow, tenant) = (history.0, history.1.to_string());
    let span = trace::tool_span(
        plan.as_ref().map_or("", |p| p.tool.as_str()),
        crate::runtime::call_id(workflow, &subtask, attempt),
        &subtask,
        attempt,
    );
    let done = span.clone();
    async move {
        let Some(plan) = plan else {
            return Progress::Done {
                subtask,
                attempt,
                result: Err((FailureKind::Invalid, "not in the plan".into())),
                cache: None,
                cost_ms: 0,
                unknown: false,
            };
        };
        let Some(tool) = inner.tools.get(&plan.tool).cloned() else {
            let error = if plan.tool.is_empty() {
                "no tool was chosen for it".to_string()
            } else {
                format!("no tool named {:?} is registered", plan.tool)
            };
            return Progress::Done {
                subtask,
                attempt,
                result: Err((FailureKind::Invalid, error)),
                cache: None,
                cost_ms: 0,
                unknown: false,
            };
        };
        let key =
            (shareable && tool.deterministic() && inner.cache.serves_tool(&plan.tool)).then(|| {
                cache::tool_key(
                    &tenant,
                    &plan.tool,
                    &tool.origin(),
                    plan.title.as_str(),
                    &input,
                )
            });
        if let Some(key) = key {
            if let Some(hit) = inner.cache.get(cache::Kind::Tool, &key, inner.clock.now()) {
                return Progress::Done {
                    subtask,
                    attempt,
                    result: Ok(hit.value),
                    cache: Some(CacheRef {
                        key: hex::encode(key),
                        reused_from: Some(hit.position),
                    }),
                    cost_ms: 0,
                    unknown: false,
                };
            }
        }
        let declared = match declared {
            None => None,
            Some(Ok(call)) => Some(call),
            Some(Err(failure)) => {
                let kind = match failure {
                    ToolFailure::Invalid(_) => FailureKind::Invalid,
                    _ => FailureKind::Error,
                };
                return Progress::Done {
                    subtask,
                    attempt,
                    result: Err((kind, format!("the call could not be declared: {failure}"))),
                    cache: None,
                    cost_ms: 0,
                    unknown: false,
                };
            }
        };
        let sent_somewhere = declared.is_some();
        let started = inner.clock.now();
        let cancel = CancellationToken::new();
        let limit = inner.config.gitcode.attempt_timeout();
        let call = ToolCall {
            workflow,
            subtask: subtask.clone(),
            attempt,
            tenant,
            instruction: plan.title.as_str().to_string(),
            input,
            deadline: crate::queue::lease_end(inner.clock.now(), limit),
            cancel: cancel.clone(),
            declared,
        };
        // A tool that panics (a bug in it) fails its own attempt, which is
        // retried like an error; the drive and its other attempts go on.
        let running = std::panic::AssertUnwindSafe(tool.run(call))
            .catch_unwind()
            .map(|ran| {
                ran.unwrap_or_else(|panic| {
                    let text = agentledger_eventstore::health::panic_message(&*panic);
                    tracing::error!(%workflow, tool = %plan.tool, panic = %text, "a tool panicked");
                    inner.config.health.counted(super::claims::TOOL_TASK);
                    Err(ToolFailure::Error(format!("the tool panicked: {text}")))
                })
            });
        let result = match clock::timeout(&*inner.clock, limit, running).await {
            Some(Ok(output)) => match inner.config.gitcode.refuse_output(&output) {
                None => Ok(output),
                Some(why) => Err((FailureKind::Invalid, why)),
            },
            Some(Err(ToolFailure::Error(e))) => Err((FailureKind::Error, e)),
            Some(Err(ToolFailure::Invalid(e))) => Err((FailureKind::Invalid, e)),
            Some(Err(ToolFailure::Unknown(e))) => Err((FailureKind::Abandoned, e)),
            None => {
                cancel.cancel();
                Err((
                    FailureKind::Timeout,
                    format!("no result within {} ms", limit.as_millis()),
                ))
            }
        };
        // A declared call that timed out or lost its answer may have acted.
        let unknown = sent_somewhere
            && matches!(
                result,
                Err((FailureKind::Abandoned | FailureKind::Timeout, _))
            );
        let cost_ms = u64::try_from((inner.clock.now() - started).num_milliseconds()).unwrap_or(0);
        if let Err((kind, _)) = &result {
            // timeout, error, invalid, abandoned
            done.record("error.type", format!("{kind:?}").to_lowercase().as_str());
        }
        Progress::Done {
            subtask,
            attempt,
            cache: key.filter(|_| result.is_ok()).map(|key| CacheRef {
                key: hex::encode(key),
                reused_from: None,
            }),
            result,
            cost_ms,
            unknown,
        }
    }
    .instrument(span)
    .boxed()
}

/// Fills the result cache from the ledger's recent events (at most 16 per
/// entry it holds, none older than its age limit), as a restarted process
/// finds it: fresh tool results and model answers at the positions that
/// recorded them.
pub(super) async fn warm_cache(inner: std::sync::Arc<Inner>) {
    const PAGE: usize = 1_000;
    let config = inner.cache.config().clone();
    if !config.enabled {
        return;
    }
    let head = match inner.store.head_position().await {
        Ok(head) => head,
        Err(e) => {
            tracing::warn!(error = %e, "the result cache starts empty: the ledger could not be read");
            return;
        }
    };
    let oldest = chrono::Duration::from_std(config.max_age)
        .ok()
        .and_then(|age| inner.clock.now().checked_sub_signed(age));
    let mut from = head.saturating_sub(config.max_entries as u64 * 16) + 1;
    let mut warmed = 0usize;
    while from <= head {
        let page = match inner.store.read_all(from, PAGE).await {
            Ok(page) if !page.is_empty() => page,
            Ok(_) => break,
            Err(e) => {
                tracing::warn!(error = %e, warmed, "the result cache was filled only in part");
                return;
            }
        };
        for event in page.iter().filter(|e| e.global_position <= head) {
            from = event.global_position + 1;
            if oldest.is_some_and(|oldest| event.recorded_at < oldest)
                || !matches!(
                    event.event_type.as_str(),
                    "SubtaskSucceeded" | "AnalysisProduced" | "GateDecided" | "EthicsReviewed"
                )
            {
                continue;
            }
            let Ok(decoded) =
                WorkflowEvent::decode(&event.event_type, event.schema_version, &event.payload)
            else {
                continue;
            };
            let entry = |value: &str, cost_ms| cache::Entry {
                position: event.global_position,
                value: value.to_string(),
                recorded_at: event.recorded_at,
                cost_ms,
            };
            match &decoded {
                WorkflowEvent::SubtaskSucceeded {
                    output,
                    cache:
                        Some(CacheRef {
                            key,
                            reused_from: None,
                        }),
                    ..
                } if output.is_plain() => {
                    if let Some(key) = cache::parse_key(key) {
                        inner.cache.put(key, entry(output.as_str(), 0));
                        warmed += 1;
                    }
                }
                WorkflowEvent::AnalysisProduced {
                    model: Some(call), ..
                }
                | WorkflowEvent::GateDecided {
                    model: Some(call), ..
                }
                | WorkflowEvent::EthicsReviewed {
                    model: Some(call), ..
                } => {
                    if let Some((call, key)) = cacheable_answer(call) {
                        inner
                            .cache
                            .put(key, entry(call.answer.as_str(), call.latency_ms));
                        warmed += 1;
                    }
                }
                _ => {}
            }
        }
        if page.last().is_some_and(|e| e.global_position >= head) {
            break;
        }
    }
    tracing::info!(warmed, "the result cache was filled from the ledger");
}
