//! The events of a workflow stream. The variant name is the stored event
//! type; the fields are the payload (schema version 1).

use serde::{Deserialize, Serialize};

use super::{EthicsScores, Priority, SubtaskPlan, Text, Verdict};

/// Every fact recorded about a workflow, in the words of design §3.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all_fields = "snake_case")]
pub enum WorkflowEvent {
    /// A request arrived.
    WorkflowSubmitted {
        request: Text,
        input: Option<Text>,
        priority: Priority,
    },
    /// Sena's analysis (round 0, then 1 and 2 after revisions).
    AnalysisProduced {
        round: u8,
        subtasks: Vec<SubtaskPlan>,
        confidence: f64,
        rationale: Text,
    },
    /// Lubit's verdict on an analysis.
    GateDecided {
        round: u8,
        verdict: Verdict,
        priority: Priority,
        risk: f64,
        reasons: Vec<String>,
        rationale: Text,
    },
    /// A person approved or rejected an escalated workflow.
    HumanDecisionRecorded { approve: bool, comment: Text },
    /// GitCode began an attempt (1 to 3) at a subtask.
    SubtaskStarted { subtask: String, attempt: u8 },
    /// An attempt succeeded.
    SubtaskSucceeded {
        subtask: String,
        attempt: u8,
        output: Text,
    },
    /// An attempt failed; `will_retry` says whether another follows.
    SubtaskFailed {
        subtask: String,
        attempt: u8,
        error: String,
        will_retry: bool,
    },
    /// A subtask was not run because a dependency failed.
    SubtaskSkipped { subtask: String, reason: String },
    /// Every subtask reached an end.
    ExecutionFinished {
        succeeded: u32,
        failed: u32,
        skipped: u32,
    },
    /// RUNE's review of the whole workflow.
    EthicsReviewed {
        scores: EthicsScores,
        passed: bool,
        findings: Vec<String>,
    },
    /// Final: done and reviewed.
    WorkflowCompleted {},
    /// Final: Lubit or a person said no.
    WorkflowRejected { reasons: Vec<String> },
    /// Final: a subtask exhausted its attempts.
    WorkflowFailed { reason: String },
    /// Final: RUNE flagged it for a person.
    WorkflowFlagged { findings: Vec<String> },
    /// Final: cancelled on request.
    WorkflowCancelled { reason: Option<Text> },
}

impl WorkflowEvent {
    /// The stored event type: the variant's name.
    pub fn event_type(&self) -> &'static str {
        match self {
            Self::WorkflowSubmitted { .. } => "WorkflowSubmitted",
            Self::AnalysisProduced { .. } => "AnalysisProduced",
            Self::GateDecided { .. } => "GateDecided",
            Self::HumanDecisionRecorded { .. } => "HumanDecisionRecorded",
            Self::SubtaskStarted { .. } => "SubtaskStarted",
            Self::SubtaskSucceeded { .. } => "SubtaskSucceeded",
            Self::SubtaskFailed { .. } => "SubtaskFailed",
            Self::SubtaskSkipped { .. } => "SubtaskSkipped",
            Self::ExecutionFinished { .. } => "ExecutionFinished",
            Self::EthicsReviewed { .. } => "EthicsReviewed",
            Self::WorkflowCompleted { .. } => "WorkflowCompleted",
            Self::WorkflowRejected { .. } => "WorkflowRejected",
            Self::WorkflowFailed { .. } => "WorkflowFailed",
            Self::WorkflowFlagged { .. } => "WorkflowFlagged",
            Self::WorkflowCancelled { .. } => "WorkflowCancelled",
        }
    }
}
