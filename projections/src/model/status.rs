//! The workflow status read model: one row per workflow and one per subtask
//! of its current plan, folded with the domain's own `Workflow::apply` plus
//! the times the events were recorded.

use agentledger_domain::workflow::{
    EthicsScores, Priority, SubtaskState, Text, Verdict, Workflow, WorkflowEvent, WorkflowState,
};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::Fact;

/// RUNE's review as shown with a workflow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ethics {
    #[serde(flatten)]
    pub scores: EthicsScores,
    pub passed: bool,
    pub findings: Vec<String>,
}

/// One subtask of the current plan.
#[derive(Debug, Clone, PartialEq)]
pub struct SubtaskStatus {
    pub id: String,
    /// Position in the plan, from 0.
    pub ordinal: i32,
    pub title: String,
    pub tool: String,
    pub depends_on: Vec<String>,
    pub state: SubtaskState,
    pub attempts: i16,
    /// Shared, not copied: a fold (and every replay step or progress
    /// update cloned from it) holds the same text.
    pub output: Option<Arc<str>>,
    /// When its first attempt started.
    pub started_at: Option<DateTime<Utc>>,
    /// When it succeeded, failed for good or was skipped.
    pub finished_at: Option<DateTime<Utc>>,
}

/// One workflow as the status read model holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkflowStatus {
    pub id: Uuid,
    pub state: WorkflowState,
    pub priority: Priority,
    /// Shared like subtask outputs; set by the submission alone.
    pub request: Arc<str>,
    pub round: i16,
    pub progress_done: i32,
    pub progress_total: i32,
    /// Lubit's latest verdict and risk.
    pub verdict: Option<Verdict>,
    pub risk: Option<f64>,
    pub ethics: Option<Ethics>,
    pub owner: String,
    pub tenant: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
    pub last_position: u64,
    pub version: u64,
    pub subtasks: Vec<SubtaskStatus>,
}

/// A workflow's fold and its status, kept together while projecting.
#[derive(Debug, Clone)]
pub struct StatusFold {
    workflow: Workflow,
    status: WorkflowStatus,
}

impl StatusFold {
    /// The fold after the workflow's first event.
    pub fn start(fact: &Fact) -> Self {
        let at = fact.recorded.recorded_at;
        let mut fold = Self {
            workflow: Workflow::default(),
            status: WorkflowStatus {
                id: fact.workflow,
                state: WorkflowState::New,
                priority: Priority::Normal,
                request: Arc::from(""),
                round: 0,
                progress_done: 0,
                progress_total: 0,
                verdict: None,
                risk: None,
                ethics: None,
                owner: fact.metadata.owner.clone(),
                tenant: fact.metadata.tenant.clone(),
                created_at: at,
                updated_at: at,
                completed_at: None,
                last_position: 0,
                version: 0,
                subtasks: Vec::new(),
            },
        };
        fold.apply(fact);
        fold
    }

    /// The version of the last event applied.
    pub fn version(&self) -> u64 {
        self.status.version
    }

    /// The status now.
    pub fn status(&self) -> &WorkflowStatus {
        &self.status
    }

    /// Applies the workflow's next event.
    pub fn apply(&mut self, fact: &Fact) {
        use WorkflowEvent as E;
        let at = fact.recorded.recorded_at;
        self.workflow = std::mem::take(&mut self.workflow).apply(&fact.event);
        let w = &self.workflow;
        let status = &mut self.status;
        let replanned = matches!(fact.event, E::AnalysisProduced { .. });
        let previous = if replanned {
            Vec::new()
        } else {
            std::mem::take(&mut status.subtasks)
        };
        // Only a plan sets titles and only a success sets an output: the
        // other events reuse what the fold holds instead of re-encoding
        // every subtask's text once per event.
        let succeeded = match &fact.event {
            E::SubtaskSucceeded { subtask, .. } => Some(subtask.as_str()),
            _ => None,
        };
        status.subtasks = w
            .subtasks
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                let plan = s.plan.as_ref()?;
                let before = previous.iter().find(|p| p.id == plan.id);
                let output = match before {
                    Some(b) if succeeded != Some(plan.id.as_str()) => b.output.clone(),
                    _ => s.output.as_ref().map(|t| Arc::from(t.to_column())),
                };
                Some(SubtaskStatus {
                    id: plan.id.clone(),
                    ordinal: i as i32,
                    title: match before {
                        Some(b) => b.title.clone(),
                        None => plan.title.to_column(),
                    },
                    tool: plan.tool.clone(),
                    depends_on: plan.depends_on.clone(),
                    state: s.state,
                    attempts: i16::from(s.attempts),
                    output,
                    started_at: before.and_then(|b| b.started_at),
                    finished_at: before.and_then(|b| b.finished_at),
                })
            })
            .collect();
        match &fact.event {
            E::SubtaskStarted { subtask, .. } => {
                if let Some(s) = status.subtasks.iter_mut().find(|s| &s.id == subtask) {
                    s.started_at.get_or_insert(at);
                }
            }
            E::SubtaskSucceeded { subtask, .. }
            | E::SubtaskFailed { subtask, .. }
            | E::SubtaskSkipped { subtask, .. } => {
                if let Some(s) = status.subtasks.iter_mut().find(|s| &s.id == subtask) {
                    if s.state.is_final() {
                        s.finished_at = Some(at);
                    }
                }
            }
            E::GateDecided { verdict, risk, .. } => {
                status.verdict = Some(*verdict);
                status.risk = Some(*risk);
            }
            E::EthicsReviewed {
                scores,
                passed,
                findings,
                ..
            } => {
                status.ethics = Some(Ethics {
                    scores: *scores,
                    passed: *passed,
                    // Column forms: sealed findings stay ciphertext.
                    findings: findings.iter().map(Text::to_column).collect(),
                })
            }
            _ => {}
        }
        let (done, total) = w.progress();
        status.state = w.state;
        status.priority = w.priority;
        if matches!(fact.event, E::WorkflowSubmitted { .. }) {
            status.request = Arc::from(w.request.to_column());
        }
        status.round = i16::from(w.round);
        status.progress_done = done as i32;
        status.progress_total = total as i32;
        status.updated_at = at;
        if w.state.is_final() {
            status.completed_at.get_or_insert(at);
        } else {
            status.completed_at = None;
        }
        status.last_position = fact.recorded.global_position;
        status.version = fact.recorded.stream_version;
    }
}

/// The stored name of a workflow state (`AWAITING_HUMAN`, …).
pub fn state_name(state: WorkflowState) -> &'static str {
    use WorkflowState as S;
    match state {
        S::New => "NEW",
        S::Submitted => "SUBMITTED",
        S::Analysing => "ANALYSING",
        S::Gating => "GATING",
        S::AwaitingHuman => "AWAITING_HUMAN",
        S::Executing => "EXECUTING",
        S::Reviewing => "REVIEWING",
        S::Completed => "COMPLETED",
        S::Rejected => "REJECTED",
        S::Failed => "FAILED",
        S::Flagged => "FLAGGED",
        S::Cancelled => "CANCELLED",
    }
}

/// Every workflow state, in the order a workflow passes them.
pub const STATES: [WorkflowState; 12] = {
    use WorkflowState as S;
    [
        S::New,
        S::Submitted,
        S::Analysing,
        S::Gating,
        S::AwaitingHuman,
        S::Executing,
        S::Reviewing,
        S::Completed,
        S::Rejected,
        S::Failed,
        S::Flagged,
        S::Cancelled,
    ]
};

/// The inverse of [`state_name`].
pub fn parse_state(name: &str) -> Option<WorkflowState> {
    STATES.into_iter().find(|s| state_name(*s) == name)
}

/// Stored names of priorities, verdicts and subtask states: their serde names.
pub fn enum_name<T: Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => s,
        _ => String::new(),
    }
}

/// The inverse of [`enum_name`].
pub fn parse_enum<T: serde::de::DeserializeOwned>(name: &str) -> Option<T> {
    serde_json::from_value(serde_json::Value::String(name.to_string())).ok()
}
