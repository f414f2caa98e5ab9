//! Commands, checked against the folded state: each yields the events to
//! append, or a typed error and nothing.

use thiserror::Error;

use crate::privacy::Sealing;

use super::{
    CacheRef, EthicsScores, FailureKind, GateRef, ModelCall, Priority, SubtaskPlan, SubtaskState,
    Text, ToolIntent, Verdict, Workflow, WorkflowEvent, WorkflowState,
};

/// Revision rounds Lubit may ask for; after them it must decide.
pub const MAX_REVISIONS: u8 = 2;
/// Attempts GitCode makes at a subtask.
pub const MAX_ATTEMPTS: u8 = 3;
/// Longest request, in bytes of UTF-8.
pub const MAX_REQUEST_BYTES: usize = 32 * 1024;
/// Longest input document, in bytes of UTF-8.
pub const MAX_INPUT_BYTES: usize = 1024 * 1024;

/// What agents and people ask of a workflow.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Submit {
        request: Text,
        input: Option<Text>,
        priority: Priority,
        /// Seal the personal text under a data subject's key.
        sealing: Option<Sealing>,
    },
    RecordAnalysis {
        subtasks: Vec<SubtaskPlan>,
        confidence: f64,
        rationale: Text,
        model: Option<ModelCall>,
    },
    RecordGate {
        verdict: Verdict,
        priority: Priority,
        risk: f64,
        reasons: Vec<String>,
        rationale: Text,
        model: Option<ModelCall>,
    },
    RecordHumanDecision {
        approve: bool,
        comment: Text,
        /// The gate decision the person saw (see [`GateRef`]).
        answers: Option<GateRef>,
    },
    StartSubtask {
        subtask: String,
        attempt: u8,
        /// For a call to an MCP server: what will be called.
        intent: Option<ToolIntent>,
    },
    CompleteSubtask {
        subtask: String,
        attempt: u8,
        output: Text,
        cache: Option<CacheRef>,
    },
    FailSubtask {
        subtask: String,
        attempt: u8,
        kind: FailureKind,
        error: String,
    },
    SkipSubtask {
        subtask: String,
        reason: String,
    },
    /// The running attempt's outcome is unknown (its executor stopped, or
    /// it timed out after its call was sent) and its tool may not be called
    /// again unasked: fail the attempt as `kind` and ask a person.
    EscalateSubtask {
        subtask: String,
        attempt: u8,
        kind: FailureKind,
        error: String,
        reason: String,
    },
    FinishExecution,
    RecordEthics {
        scores: EthicsScores,
        passed: bool,
        findings: Vec<String>,
        rationale: Option<Text>,
        model: Option<ModelCall>,
    },
    Cancel {
        reason: Option<Text>,
    },
}

impl Command {
    /// The decision with the record of the model behind it (a decision of
    /// the analyst, the gatekeeper or the ethics reviewer; others as they
    /// are).
    pub fn with_model(mut self, call: ModelCall) -> Self {
        match &mut self {
            Self::RecordAnalysis { model, .. }
            | Self::RecordGate { model, .. }
            | Self::RecordEthics { model, .. } => *model = Some(call),
            _ => {}
        }
        self
    }

    /// The command's name, for errors.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Submit { .. } => "submit",
            Self::RecordAnalysis { .. } => "record analysis",
            Self::RecordGate { .. } => "record gate decision",
            Self::RecordHumanDecision { .. } => "record human decision",
            Self::StartSubtask { .. } => "start subtask",
            Self::CompleteSubtask { .. } => "complete subtask",
            Self::FailSubtask { .. } => "fail subtask",
            Self::SkipSubtask { .. } => "skip subtask",
            Self::EscalateSubtask { .. } => "escalate subtask",
            Self::FinishExecution => "finish execution",
            Self::RecordEthics { .. } => "record ethics review",
            Self::Cancel { .. } => "cancel",
        }
    }
}

/// Why a command was refused; nothing is written.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum DomainError {
    /// Not allowed in the workflow's state (`CONFLICT`).
    #[error("cannot {command} a workflow that is {state:?}")]
    InvalidTransition {
        command: &'static str,
        state: WorkflowState,
    },
    /// The workflow does not exist (`NOT_FOUND`).
    #[error("no such workflow")]
    NotFound,
    /// The command's content breaks a rule (`BAD_INPUT`).
    #[error("bad input: {0}")]
    BadInput(String),
}

/// Decides `command` against `workflow`: the events to append, or why not.
pub fn handle(workflow: &Workflow, command: Command) -> Result<Vec<WorkflowEvent>, DomainError> {
    use Command as C;
    use WorkflowEvent as E;
    use WorkflowState as S;
    let state = workflow.state;
    let refuse = |command: &Command| DomainError::InvalidTransition {
        command: command.name(),
        state,
    };
    if state == S::New && !matches!(command, C::Submit { .. }) {
        return Err(DomainError::NotFound);
    }
    match command {
        C::Submit {
            request,
            input,
            priority,
            sealing,
        } if state == S::New => {
            if request.as_str().trim().is_empty() {
                return Err(DomainError::BadInput("the request is empty".into()));
            }
            check_size("request", &request, MAX_REQUEST_BYTES)?;
            if let Some(input) = &input {
                check_size("input document", input, MAX_INPUT_BYTES)?;
            }
            Ok(vec![E::WorkflowSubmitted {
                request,
                input,
                priority,
                sealing,
            }])
        }
        C::RecordAnalysis {
            subtasks,
            confidence,
            rationale,
            model,
        } if matches!(state, S::Submitted | S::Analysing) => {
            check_unit("confidence", confidence)?;
            Ok(vec![E::AnalysisProduced {
                round: workflow.round,
                subtasks,
                confidence,
                rationale,
                model,
            }])
        }
        C::RecordGate {
            verdict,
            priority,
            risk,
            reasons,
            rationale,
            model,
        } if state == S::Gating => {
            check_unit("risk", risk)?;
            if verdict == Verdict::Revise && workflow.round >= MAX_REVISIONS {
                return Err(DomainError::BadInput(format!(
                    "after {MAX_REVISIONS} revision rounds the gate must approve, reject or escalate"
                )));
            }
            let round = workflow.round;
            let mut events = vec![E::GateDecided {
                round,
                verdict,
                priority,
                risk,
                reasons: texts(&reasons),
                rationale,
                model,
            }];
            if verdict == Verdict::Reject {
                events.push(E::WorkflowRejected {
                    reasons: texts(&reasons),
                });
            }
            Ok(events)
        }
        C::RecordHumanDecision {
            approve,
            comment,
            answers,
        } if state == S::AwaitingHuman => {
            let mut events = vec![E::HumanDecisionRecorded {
                approve,
                comment,
                answers,
            }];
            if !approve {
                events.push(E::WorkflowRejected {
                    reasons: vec!["rejected by a person".into()],
                });
            }
            Ok(events)
        }
        C::StartSubtask {
            subtask,
            attempt,
            intent,
        } if state == S::Executing => {
            let current = find(workflow, &subtask)?;
            let next = match current.state {
                SubtaskState::Pending => 1,
                SubtaskState::Retrying => current.attempts + 1,
                _ => {
                    return Err(DomainError::BadInput(format!(
                        "subtask {subtask} is {:?}",
                        current.state
                    )))
                }
            };
            if attempt != next || attempt > MAX_ATTEMPTS {
                return Err(DomainError::BadInput(format!(
                    "subtask {subtask}: attempt {attempt}, expected {next}"
                )));
            }
            Ok(vec![E::SubtaskStarted {
                subtask,
                attempt,
                intent,
            }])
        }
        C::CompleteSubtask {
            subtask,
            attempt,
            output,
            cache,
        } if state == S::Executing => {
            running(workflow, &subtask, attempt)?;
            Ok(vec![E::SubtaskSucceeded {
                subtask,
                attempt,
                output,
                cache,
            }])
        }
        C::FailSubtask {
            subtask,
            attempt,
            kind,
            error,
        } if state == S::Executing => {
            running(workflow, &subtask, attempt)?;
            Ok(vec![E::SubtaskFailed {
                subtask,
                attempt,
                kind,
                error: error.into(),
                will_retry: kind.is_retryable() && attempt < MAX_ATTEMPTS,
            }])
        }
        C::SkipSubtask { subtask, reason } if state == S::Executing => {
            if find(workflow, &subtask)?.state != SubtaskState::Pending {
                return Err(DomainError::BadInput(format!(
                    "subtask {subtask} has already run"
                )));
            }
            Ok(vec![E::SubtaskSkipped {
                subtask,
                reason: reason.into(),
            }])
        }
        C::EscalateSubtask {
            subtask,
            attempt,
            kind,
            error,
            reason,
        } if state == S::Executing => {
            running(workflow, &subtask, attempt)?;
            if attempt >= MAX_ATTEMPTS {
                return Err(DomainError::BadInput(format!(
                    "subtask {subtask} has no attempt left to decide on"
                )));
            }
            Ok(vec![
                E::SubtaskFailed {
                    subtask: subtask.clone(),
                    attempt,
                    kind,
                    error: error.into(),
                    will_retry: true,
                },
                E::SubtaskEscalated {
                    subtask,
                    attempt,
                    reason: reason.into(),
                },
            ])
        }
        C::FinishExecution if state == S::Executing => {
            let count = |wanted: SubtaskState| {
                workflow
                    .subtasks
                    .iter()
                    .filter(|s| s.state == wanted)
                    .count() as u32
            };
            if let Some(open) = workflow.subtasks.iter().find(|s| !s.state.is_final()) {
                let id = open.plan.as_ref().map_or("?", |p| p.id.as_str());
                return Err(DomainError::BadInput(format!(
                    "subtask {id} has not finished"
                )));
            }
            let (succeeded, failed, skipped) = (
                count(SubtaskState::Succeeded),
                count(SubtaskState::Failed),
                count(SubtaskState::Skipped),
            );
            let mut events = vec![E::ExecutionFinished {
                succeeded,
                failed,
                skipped,
            }];
            if failed > 0 {
                events.push(E::WorkflowFailed {
                    reason: format!("{failed} subtask(s) failed after {MAX_ATTEMPTS} attempts")
                        .into(),
                });
            }
            Ok(events)
        }
        C::RecordEthics {
            scores,
            passed,
            findings,
            rationale,
            model,
        } if state == S::Reviewing => {
            for (name, score) in [
                ("transparency", scores.transparency),
                ("collaboration", scores.collaboration),
                ("autonomy", scores.autonomy),
                ("fairness", scores.fairness),
            ] {
                check_unit(name, score)?;
            }
            let outcome = if passed {
                E::WorkflowCompleted {}
            } else {
                E::WorkflowFlagged {
                    findings: texts(&findings),
                }
            };
            Ok(vec![
                E::EthicsReviewed {
                    scores,
                    passed,
                    findings: texts(&findings),
                    rationale,
                    model,
                },
                outcome,
            ])
        }
        C::Cancel { reason } if !state.is_final() => Ok(vec![E::WorkflowCancelled { reason }]),
        other => Err(refuse(&other)),
    }
}

fn find<'a>(workflow: &'a Workflow, id: &str) -> Result<&'a super::Subtask, DomainError> {
    workflow
        .subtask(id)
        .ok_or_else(|| DomainError::BadInput(format!("no subtask {id} in the plan")))
}

fn running(workflow: &Workflow, id: &str, attempt: u8) -> Result<(), DomainError> {
    let subtask = find(workflow, id)?;
    if subtask.state != SubtaskState::Running || subtask.attempts != attempt {
        return Err(DomainError::BadInput(format!(
            "subtask {id} is not running attempt {attempt}"
        )));
    }
    Ok(())
}

fn texts(items: &[String]) -> Vec<Text> {
    items.iter().map(|s| Text::new(s.as_str())).collect()
}

fn check_size(what: &str, text: &Text, max: usize) -> Result<(), DomainError> {
    let size = text.as_str().len();
    if size > max {
        return Err(DomainError::BadInput(format!(
            "the {what} is {size} bytes; the limit is {max}"
        )));
    }
    Ok(())
}

fn check_unit(what: &str, value: f64) -> Result<(), DomainError> {
    if !(0.0..=1.0).contains(&value) {
        return Err(DomainError::BadInput(format!(
            "{what} must be between 0 and 1, not {value}"
        )));
    }
    Ok(())
}
