//! The `Workflow` aggregate: its state is a pure fold over its events
//! ([`Workflow::apply`]), and commands are checked against that state
//! ([`handle`]) to produce new events or a typed error.
//!
//! ```text
//! Submitted → (analysis) → Gating → Executing → Reviewing → Completed
//!     ↑ revise, at most 2 rounds: Analysing ┘  ├ reject → Rejected   ├ flag → Flagged
//!                                              └ escalate → AwaitingHuman → approve / reject
//! any non-final state: cancel → Cancelled; a subtask out of attempts → Failed
//! ```
//!
//! `Submitted` waits for the first analysis, `Analysing` for a revised one.
//! Outcomes are recorded with the decision that causes them, in one append
//! (a reject verdict is `GateDecided` + `WorkflowRejected`).

mod command;
mod event;

use serde::{Deserialize, Serialize};

pub use command::{
    handle, Command, DomainError, MAX_ATTEMPTS, MAX_INPUT_BYTES, MAX_REQUEST_BYTES, MAX_REVISIONS,
};
pub use event::{DecodeError, FailureKind, WorkflowEvent};

/// Free text that may carry personal data: the request, the input document,
/// subtask titles and outputs, rationales that quote them, human comments.
/// One type, so that crypto-shredding can find every such field. Its `Debug`
/// shows the length only, keeping the text out of logs.
#[derive(Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Text(String);

impl Text {
    /// Wraps `text`.
    pub fn new(text: impl Into<String>) -> Self {
        Self(text.into())
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Text {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Text({} chars)", self.0.chars().count())
    }
}

/// How urgent a workflow is; orders the queue of waiting work.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Priority {
    Low,
    #[default]
    Normal,
    High,
    Critical,
}

/// Where a workflow stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum WorkflowState {
    /// Not submitted yet (the state before the first event).
    #[default]
    New,
    Submitted,
    Analysing,
    Gating,
    AwaitingHuman,
    Executing,
    Reviewing,
    Completed,
    Rejected,
    Failed,
    Flagged,
    Cancelled,
}

impl WorkflowState {
    /// Completed, rejected, failed, flagged or cancelled.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Self::Completed | Self::Rejected | Self::Failed | Self::Flagged | Self::Cancelled
        )
    }
}

/// Lubit's verdict on an analysis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Approve,
    Revise,
    Reject,
    Escalate,
}

/// One step of Sena's plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubtaskPlan {
    /// Unique within the analysis, e.g. `st-1`.
    pub id: String,
    pub title: Text,
    /// A tool registry name.
    pub tool: String,
    /// Ids of subtasks whose outputs this one takes as input.
    pub depends_on: Vec<String>,
}

/// RUNE's four scores, each in [0, 1].
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct EthicsScores {
    pub transparency: f64,
    pub collaboration: f64,
    pub autonomy: f64,
    pub fairness: f64,
}

/// Where a subtask stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SubtaskState {
    #[default]
    Pending,
    Running,
    /// Failed, another attempt to come.
    Retrying,
    Succeeded,
    Failed,
    Skipped,
}

impl SubtaskState {
    /// Succeeded, failed or skipped.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Skipped)
    }
}

/// A subtask of the current plan and its progress.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Subtask {
    pub plan: Option<SubtaskPlan>,
    pub state: SubtaskState,
    pub attempts: u8,
    pub output: Option<Text>,
}

/// The state of one workflow, as folded from its events.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Workflow {
    pub state: WorkflowState,
    pub priority: Priority,
    pub request: Text,
    pub input: Option<Text>,
    /// The analysis round the workflow is in (0 until a revision is asked).
    pub round: u8,
    pub subtasks: Vec<Subtask>,
    pub verdict: Option<Verdict>,
    pub ethics: Option<(EthicsScores, bool)>,
    /// Events applied so far.
    pub events: u64,
}

impl Workflow {
    /// Folds `events` from the empty state.
    pub fn from_events<'a>(events: impl IntoIterator<Item = &'a WorkflowEvent>) -> Self {
        events.into_iter().fold(Self::default(), Self::apply)
    }

    /// The state after `event`. Total: a recorded event always applies (the
    /// history is the truth; commands are where rules are enforced), so the
    /// fold never panics, whatever a stream holds.
    pub fn apply(mut self, event: &WorkflowEvent) -> Self {
        use WorkflowEvent as E;
        self.events += 1;
        match event {
            E::WorkflowSubmitted {
                request,
                input,
                priority,
            } => {
                self.state = WorkflowState::Submitted;
                self.request = request.clone();
                self.input = input.clone();
                self.priority = *priority;
            }
            E::AnalysisProduced {
                round, subtasks, ..
            } => {
                self.state = WorkflowState::Gating;
                self.round = *round;
                self.subtasks = subtasks
                    .iter()
                    .map(|p| Subtask {
                        plan: Some(p.clone()),
                        ..Subtask::default()
                    })
                    .collect();
            }
            E::GateDecided {
                verdict, priority, ..
            } => {
                self.verdict = Some(*verdict);
                self.priority = *priority;
                self.state = match verdict {
                    Verdict::Approve => WorkflowState::Executing,
                    Verdict::Revise => {
                        self.round = self.round.saturating_add(1);
                        WorkflowState::Analysing
                    }
                    Verdict::Escalate => WorkflowState::AwaitingHuman,
                    // The outcome event that accompanies it makes it final.
                    Verdict::Reject => self.state,
                };
            }
            E::HumanDecisionRecorded { approve, .. } => {
                if *approve {
                    self.state = WorkflowState::Executing;
                }
            }
            E::SubtaskStarted { subtask, attempt } => {
                if let Some(s) = self.subtask_mut(subtask) {
                    s.state = SubtaskState::Running;
                    s.attempts = s.attempts.max(*attempt);
                }
            }
            E::SubtaskSucceeded {
                subtask, output, ..
            } => {
                if let Some(s) = self.subtask_mut(subtask) {
                    s.state = SubtaskState::Succeeded;
                    s.output = Some(output.clone());
                }
            }
            E::SubtaskFailed {
                subtask,
                will_retry,
                ..
            } => {
                if let Some(s) = self.subtask_mut(subtask) {
                    s.state = if *will_retry {
                        SubtaskState::Retrying
                    } else {
                        SubtaskState::Failed
                    };
                }
            }
            E::SubtaskSkipped { subtask, .. } => {
                if let Some(s) = self.subtask_mut(subtask) {
                    s.state = SubtaskState::Skipped;
                }
            }
            E::ExecutionFinished { .. } => self.state = WorkflowState::Reviewing,
            E::EthicsReviewed { scores, passed, .. } => self.ethics = Some((*scores, *passed)),
            E::WorkflowCompleted {} => self.state = WorkflowState::Completed,
            E::WorkflowRejected { .. } => self.state = WorkflowState::Rejected,
            E::WorkflowFailed { .. } => self.state = WorkflowState::Failed,
            E::WorkflowFlagged { .. } => self.state = WorkflowState::Flagged,
            E::WorkflowCancelled { .. } => self.state = WorkflowState::Cancelled,
        }
        self
    }

    /// The subtask with `id` in the current plan.
    pub fn subtask(&self, id: &str) -> Option<&Subtask> {
        self.subtasks
            .iter()
            .find(|s| s.plan.as_ref().is_some_and(|p| p.id == id))
    }

    fn subtask_mut(&mut self, id: &str) -> Option<&mut Subtask> {
        self.subtasks
            .iter_mut()
            .find(|s| s.plan.as_ref().is_some_and(|p| p.id == id))
    }

    /// Subtasks done (succeeded, failed or skipped) and in all.
    pub fn progress(&self) -> (usize, usize) {
        (
            self.subtasks.iter().filter(|s| s.state.is_final()).count(),
            self.subtasks.len(),
        )
    }
}

#[cfg(test)]
mod tests;
