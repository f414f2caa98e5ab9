//! The audit trail read model: one row per event, in a reviewer's words:
//! who decided (actor, role, version, policy), what (kind and a one-line
//! summary), why (the rationale as recorded), when, and the event's hash.

use agentledger_domain::workflow::{join_column, Text, Verdict, WorkflowEvent};
use agentledger_eventstore::ActorKind;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{AgentRole, Fact};

/// One row of the audit trail.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEntry {
    pub position: u64,
    pub workflow_id: Uuid,
    /// The workflow's tenant, from the event's envelope.
    pub tenant: String,
    pub version: u64,
    pub event_type: String,
    /// What happened, as a stable dotted name: `gate.approve`,
    /// `subtask.failed`, `ethics.flagged`, `completed`, …
    pub kind: String,
    /// `agent`, `human` or `system`.
    pub actor_kind: String,
    pub actor: String,
    pub actor_version: String,
    pub role: Option<AgentRole>,
    pub summary: String,
    /// The reasons as the decider gave them (rationale, comment, reasons,
    /// error), empty where an event has none.
    pub rationale: String,
    pub policy_fingerprint: Option<String>,
    pub recorded_at: DateTime<Utc>,
    /// Hex SHA-256 of the event in its stream's chain.
    pub hash: String,
}

impl AuditEntry {
    /// The row for `fact`.
    pub fn of(fact: &Fact) -> Self {
        let actor = &fact.metadata.actor;
        Self {
            position: fact.recorded.global_position,
            workflow_id: fact.workflow,
            tenant: fact.metadata.tenant.clone(),
            version: fact.recorded.stream_version,
            event_type: fact.recorded.event_type.clone(),
            kind: kind(&fact.event).to_string(),
            actor_kind: match actor.kind {
                ActorKind::Agent => "agent",
                ActorKind::Human => "human",
                ActorKind::System => "system",
            }
            .to_string(),
            actor: actor.name.clone(),
            actor_version: actor.version.clone(),
            role: (actor.kind == ActorKind::Agent)
                .then(|| AgentRole::parse(&actor.role).or_else(|| AgentRole::of_agent(&actor.name)))
                .flatten(),
            summary: summary(&fact.event),
            rationale: rationale(&fact.event),
            policy_fingerprint: fact.metadata.policy.as_ref().map(|p| p.fingerprint.clone()),
            recorded_at: fact.recorded.recorded_at,
            hash: hex::encode(fact.recorded.hash),
        }
    }
}

/// The stable kind of an event.
pub fn kind(event: &WorkflowEvent) -> &'static str {
    use WorkflowEvent as E;
    match event {
        E::WorkflowSubmitted { .. } => "submitted",
        E::AnalysisProduced { .. } => "analysis",
        E::GateDecided { verdict, .. } => match verdict {
            Verdict::Approve => "gate.approve",
            Verdict::Revise => "gate.revise",
            Verdict::Reject => "gate.reject",
            Verdict::Escalate => "gate.escalate",
        },
        E::HumanDecisionRecorded { approve: true, .. } => "human.approve",
        E::HumanDecisionRecorded { approve: false, .. } => "human.reject",
        E::SubtaskStarted { .. } => "subtask.started",
        E::SubtaskSucceeded { .. } => "subtask.succeeded",
        E::SubtaskFailed { .. } => "subtask.failed",
        E::SubtaskSkipped { .. } => "subtask.skipped",
        E::SubtaskEscalated { .. } => "subtask.escalated",
        E::ExecutionFinished { .. } => "execution.finished",
        E::EthicsReviewed { passed: true, .. } => "ethics.passed",
        E::EthicsReviewed { passed: false, .. } => "ethics.flagged",
        E::WorkflowCompleted {} => "completed",
        E::WorkflowRejected { .. } => "rejected",
        E::WorkflowFailed { .. } => "failed",
        E::WorkflowFlagged { .. } => "flagged",
        E::WorkflowCancelled { .. } => "cancelled",
    }
}

/// The reasons an event records, as recorded. Personal text keeps its
/// stored form ([`Text::to_column`]): sealed text stays ciphertext here and
/// is opened only when shown, while its key exists.
pub fn rationale(event: &WorkflowEvent) -> String {
    use WorkflowEvent as E;
    match event {
        E::AnalysisProduced { rationale, .. } | E::GateDecided { rationale, .. } => {
            rationale.to_column()
        }
        E::HumanDecisionRecorded { comment, .. } => comment.to_column(),
        E::SubtaskFailed { error, .. } => error.to_column(),
        E::SubtaskSkipped { reason, .. }
        | E::SubtaskEscalated { reason, .. }
        | E::WorkflowFailed { reason } => reason.to_column(),
        E::EthicsReviewed {
            rationale: Some(rationale),
            ..
        } => rationale.to_column(),
        E::EthicsReviewed { findings, .. } | E::WorkflowFlagged { findings } => {
            join_column(findings, "; ")
        }
        E::WorkflowRejected { reasons } => join_column(reasons, "; "),
        E::WorkflowCancelled { reason } => reason.as_ref().map(Text::to_column).unwrap_or_default(),
        _ => String::new(),
    }
}

/// Texts joined for a summary (sealed ones show as `[sealed]`).
fn joined(texts: &[Text]) -> String {
    texts
        .iter()
        .map(Text::as_str)
        .collect::<Vec<_>>()
        .join("; ")
}

/// One line about an event, in a reviewer's words.
pub fn summary(event: &WorkflowEvent) -> String {
    use WorkflowEvent as E;
    let short = |s: &str| -> String {
        let one_line = s.replace('\n', " ");
        let mut out: String = one_line.chars().take(70).collect();
        if one_line.chars().count() > 70 {
            out.push('…');
        }
        out
    };
    match event {
        E::WorkflowSubmitted {
            request, priority, ..
        } => {
            format!("submitted ({priority:?}): {}", short(request.as_str()))
        }
        E::AnalysisProduced {
            round,
            subtasks,
            confidence,
            ..
        } => {
            let tools: Vec<String> = subtasks
                .iter()
                .map(|s| format!("{}={}", s.id, if s.tool.is_empty() { "?" } else { &s.tool }))
                .collect();
            format!(
                "analysis round {round}: {} (confidence {confidence:.2})",
                tools.join(", ")
            )
        }
        E::GateDecided {
            verdict,
            priority,
            risk,
            reasons,
            ..
        } => {
            let why = if reasons.is_empty() {
                String::new()
            } else {
                format!(": {}", short(&joined(reasons)))
            };
            format!("verdict {verdict:?}, priority {priority:?}, risk {risk:.2}{why}")
        }
        E::HumanDecisionRecorded {
            approve, comment, ..
        } => {
            format!(
                "person {}: {}",
                if *approve { "approved" } else { "rejected" },
                short(comment.as_str())
            )
        }
        E::SubtaskStarted {
            subtask,
            attempt,
            intent: None,
        } => format!("{subtask} attempt {attempt} started"),
        E::SubtaskStarted {
            subtask,
            attempt,
            intent: Some(intent),
        } => format!(
            "{subtask} attempt {attempt} started: calls {} on {}{}",
            intent.tool,
            intent.server,
            if intent.idempotent {
                " (idempotent)"
            } else {
                ""
            }
        ),
        E::SubtaskSucceeded {
            subtask,
            attempt,
            output,
            ..
        } => {
            format!(
                "{subtask} attempt {attempt} succeeded: {}",
                short(output.as_str())
            )
        }
        E::SubtaskFailed {
            subtask,
            attempt,
            kind,
            error,
            will_retry,
        } => format!(
            "{subtask} attempt {attempt} failed ({kind:?}): {}{}",
            short(error.as_str()),
            if *will_retry { "; will retry" } else { "" }
        ),
        E::SubtaskSkipped { subtask, reason } => {
            format!("{subtask} skipped: {}", short(reason.as_str()))
        }
        E::SubtaskEscalated {
            subtask, attempt, ..
        } => format!(
            "{subtask} attempt {attempt}: outcome of its call unknown; waiting for a person"
        ),
        E::ExecutionFinished {
            succeeded,
            failed,
            skipped,
        } => {
            format!("execution finished: {succeeded} succeeded, {failed} failed, {skipped} skipped")
        }
        E::EthicsReviewed {
            scores,
            passed,
            findings,
            ..
        } => format!(
            "ethics {}: transparency {:.2}, collaboration {:.2}, autonomy {:.2}, fairness {:.2}{}",
            if *passed { "passed" } else { "FLAGGED" },
            scores.transparency,
            scores.collaboration,
            scores.autonomy,
            scores.fairness,
            if findings.is_empty() {
                String::new()
            } else {
                format!(" ({})", short(&joined(findings)))
            }
        ),
        E::WorkflowCompleted {} => "COMPLETED".into(),
        E::WorkflowRejected { reasons } => format!("REJECTED: {}", short(&joined(reasons))),
        E::WorkflowFailed { reason } => format!("FAILED: {}", short(reason.as_str())),
        E::WorkflowFlagged { .. } => "FLAGGED for a person".into(),
        E::WorkflowCancelled { .. } => "CANCELLED".into(),
    }
}
