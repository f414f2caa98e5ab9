//! GitCode, the executor, as a plan: which subtasks to start, skip or write
//! off next, and how long to back off before a retry. The runtime in
//! `agentledger-agents` runs the tools, keeps the deadlines and sleeps.

use std::collections::HashSet;
use std::time::Duration;

use serde::Serialize;

use crate::workflow::{SubtaskState, ToolIntent, Workflow, WorkflowState, MAX_ATTEMPTS};

/// GitCode's configuration (part of its policy fingerprint).
#[derive(Debug, Clone, Serialize)]
pub struct GitCodeConfig {
    /// Subtasks of one workflow running at once.
    pub max_parallel: usize,
    /// Deadline of one attempt, in milliseconds.
    pub attempt_timeout_ms: u64,
    /// Wait before the second attempt; doubles for each further one.
    pub backoff_initial_ms: u64,
    /// Longest wait between attempts.
    pub backoff_max_ms: u64,
    /// Largest output one tool may give, in bytes as stored (JSON-escaped
    /// text); a larger one fails the attempt as invalid input, without a
    /// retry, instead of an event the store would refuse.
    pub max_output_bytes: usize,
    /// Pure tools (the built-ins) run before their start is recorded, and
    /// their start and result go into one append with what they unblock.
    /// False records every start before its tool runs.
    pub inline_pure_tools: bool,
}

impl Default for GitCodeConfig {
    fn default() -> Self {
        Self {
            max_parallel: 4,
            attempt_timeout_ms: 10_000,
            backoff_initial_ms: 100,
            backoff_max_ms: 2_000,
            max_output_bytes: 1 << 20,
            inline_pure_tools: true,
        }
    }
}

impl GitCodeConfig {
    /// Why `output` may not be recorded, if it is over the cap.
    pub fn refuse_output(&self, output: &str) -> Option<String> {
        // Escaping can only lengthen text; skip the count when it cannot matter.
        if output.len().saturating_mul(6) <= self.max_output_bytes {
            return None;
        }
        let stored = serde_json::to_string(output).map_or(usize::MAX, |s| s.len() - 2);
        (stored > self.max_output_bytes).then(|| {
            format!(
                "the output is {stored} bytes, over the cap of {} bytes ([agents] max_tool_output_bytes)",
                self.max_output_bytes
            )
        })
    }

    /// The deadline of one attempt.
    pub fn attempt_timeout(&self) -> Duration {
        Duration::from_millis(self.attempt_timeout_ms)
    }

    /// How long to wait before `attempt` (1-based): nothing before the
    /// first, then `backoff_initial_ms × 2^(attempt − 2)`, capped.
    pub fn backoff(&self, attempt: u8) -> Duration {
        if attempt <= 1 {
            return Duration::ZERO;
        }
        let factor = 1u64 << u32::from(attempt - 2).min(20);
        Duration::from_millis(
            self.backoff_initial_ms
                .saturating_mul(factor)
                .min(self.backoff_max_ms),
        )
    }
}

/// One thing for the executor to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// The subtask is recorded as running but nobody runs it (its worker
    /// stopped): record the attempt as abandoned.
    Abandon { subtask: String, attempt: u8 },
    /// As [`Action::Abandon`], but the attempt's call went to a tool not
    /// declared idempotent, so its outcome is unknown and calling again
    /// might act twice: record it as abandoned and ask a person.
    Escalate {
        subtask: String,
        attempt: u8,
        reason: String,
    },
    /// A dependency failed or was skipped: record the subtask as skipped.
    Skip { subtask: String, reason: String },
    /// Wait `delay`, then record the start of `attempt` and run the tool.
    Start {
        subtask: String,
        attempt: u8,
        delay: Duration,
    },
    /// Every subtask has ended: record the end of execution.
    Finish,
}

/// Why a person is asked about a call of `intent` whose outcome is
/// unknown (`how` it was lost).
pub fn lost_call(intent: &ToolIntent, how: &str) -> String {
    format!(
        "the call of tool {} on {} (idempotency key {}) may or may not have acted: {how}, \
         and the tool is not declared idempotent; approve to call it again (with the same key), \
         reject to end the workflow",
        intent.tool, intent.server, intent.idempotency_key
    )
}

/// The next actions for `workflow`, given the subtasks this executor has in
/// flight (started or waiting out a backoff). Empty when there is nothing to
/// do but wait for those, or when the workflow is not executing.
///
/// Starts are limited to `max_parallel` minus those in flight, in plan order.
/// An escalation comes alone with the abandonments: nothing starts, since
/// the workflow then waits for a person (one escalation at a time; another
/// such attempt is escalated after the person's decision).
pub fn next_actions(
    config: &GitCodeConfig,
    workflow: &Workflow,
    in_flight: &HashSet<String>,
) -> Vec<Action> {
    if workflow.state != WorkflowState::Executing {
        return Vec::new();
    }
    let mut actions = Vec::new();
    let mut escalation = None;
    let mut free = config.max_parallel.max(1).saturating_sub(in_flight.len());
    for subtask in &workflow.subtasks {
        let Some(plan) = &subtask.plan else { continue };
        if in_flight.contains(&plan.id) {
            continue;
        }
        match subtask.state {
            SubtaskState::Running => match &subtask.intent {
                // Another lost call waits for the person's next decision.
                Some(intent)
                    if !intent.idempotent
                        && subtask.attempts < MAX_ATTEMPTS
                        && escalation.is_some() => {}
                Some(intent) if !intent.idempotent && subtask.attempts < MAX_ATTEMPTS => {
                    escalation = Some(Action::Escalate {
                        subtask: plan.id.clone(),
                        attempt: subtask.attempts,
                        reason: lost_call(intent, "its executor stopped before the outcome"),
                    });
                }
                _ => actions.push(Action::Abandon {
                    subtask: plan.id.clone(),
                    attempt: subtask.attempts,
                }),
            },
            SubtaskState::Pending => {
                let blocked = plan.depends_on.iter().find(|dep| {
                    workflow.subtask(dep).is_none_or(|d| {
                        matches!(d.state, SubtaskState::Failed | SubtaskState::Skipped)
                    })
                });
                if let Some(dep) = blocked {
                    let why = match workflow.subtask(dep).map(|d| d.state) {
                        Some(SubtaskState::Skipped) => "was skipped",
                        Some(_) => "failed",
                        None => "is not in the plan",
                    };
                    actions.push(Action::Skip {
                        subtask: plan.id.clone(),
                        reason: format!("dependency {dep} {why}"),
                    });
                    continue;
                }
                let ready = plan.depends_on.iter().all(|dep| {
                    workflow
                        .subtask(dep)
                        .is_some_and(|d| d.state == SubtaskState::Succeeded)
                });
                if ready && free > 0 {
                    free -= 1;
                    actions.push(Action::Start {
                        subtask: plan.id.clone(),
                        attempt: 1,
                        delay: Duration::ZERO,
                    });
                }
            }
            SubtaskState::Retrying if free > 0 => {
                free -= 1;
                let attempt = subtask.attempts + 1;
                actions.push(Action::Start {
                    subtask: plan.id.clone(),
                    attempt,
                    delay: config.backoff(attempt),
                });
            }
            _ => {}
        }
    }
    if let Some(escalation) = escalation {
        actions.retain(|a| matches!(a, Action::Abandon { .. }));
        actions.push(escalation);
        return actions;
    }
    let all_ended = workflow.subtasks.iter().all(|s| s.state.is_final());
    if actions.is_empty() && in_flight.is_empty() && all_ended {
        actions.push(Action::Finish);
    }
    actions
}

/// The document a subtask's tool works on: the outputs of its dependencies
/// (one per paragraph, in plan order), else the workflow's input document,
/// else the request.
pub fn tool_input(workflow: &Workflow, subtask: &str) -> String {
    let deps = workflow
        .subtask(subtask)
        .and_then(|s| s.plan.as_ref())
        .map(|p| p.depends_on.as_slice())
        .unwrap_or_default();
    if deps.is_empty() {
        return workflow
            .input
            .as_ref()
            .unwrap_or(&workflow.request)
            .as_str()
            .to_string();
    }
    deps.iter()
        .filter_map(|d| workflow.subtask(d)?.output.as_ref())
        .map(|o| o.as_str())
        .collect::<Vec<_>>()
        .join("\n\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workflow::{handle, Command, FailureKind, Priority, SubtaskPlan, Text, Verdict};

    /// A workflow approved for execution with `plan` ((id, deps) pairs).
    fn approved(plan: &[(&str, &[&str])]) -> Workflow {
        let subtasks = plan
            .iter()
            .map(|(id, deps)| SubtaskPlan {
                id: id.to_string(),
                title: Text::new(*id),
                tool: "text_stats".into(),
                depends_on: deps.iter().map(|d| d.to_string()).collect(),
            })
            .collect();
        run(
            Workflow::default(),
            vec![
                Command::Submit {
                    request: Text::new("요청"),
                    input: None,
                    priority: Priority::Normal,
                    sealing: None,
                },
                Command::RecordAnalysis {
                    model: None,
                    subtasks,
                    confidence: 1.0,
                    rationale: Text::new("r"),
                },
                Command::RecordGate {
                    model: None,
                    verdict: Verdict::Approve,
                    priority: Priority::Normal,
                    risk: 0.1,
                    reasons: vec![],
                    rationale: Text::new("ok"),
                },
            ],
        )
    }

    fn run(workflow: Workflow, commands: Vec<Command>) -> Workflow {
        commands.into_iter().fold(workflow, |w, c| {
            let events = handle(&w, c).expect("valid command");
            events.iter().fold(w, Workflow::apply)
        })
    }

    fn start(id: &str, attempt: u8) -> Command {
        Command::StartSubtask {
            subtask: id.into(),
            attempt,
            intent: None,
        }
    }

    fn none() -> HashSet<String> {
        HashSet::new()
    }

    fn starts(actions: &[Action]) -> Vec<&str> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Start { subtask, .. } => Some(subtask.as_str()),
                _ => None,
            })
            .collect()
    }

    fn start_calling(id: &str, attempt: u8, idempotent: bool) -> Command {
        Command::StartSubtask {
            subtask: id.into(),
            attempt,
            intent: Some(crate::workflow::ToolIntent {
                server: "stdio:server".into(),
                tool: "write".into(),
                arguments_sha256: String::new(),
                idempotency_key: uuid::Uuid::nil(),
                idempotent,
                repeats: None,
            }),
        }
    }

    #[test]
    fn a_lost_call_is_escalated_alone_unless_its_tool_is_idempotent() {
        let config = GitCodeConfig::default();
        let w = approved(&[("a", &[]), ("b", &[]), ("c", &[]), ("d", &[])]);
        let w = run(
            w,
            vec![
                start_calling("a", 1, false),
                start_calling("b", 1, true),
                start_calling("c", 1, false),
            ],
        );
        let actions = next_actions(&config, &w, &none());
        assert_eq!(actions.len(), 2, "{actions:?}");
        assert_eq!(
            actions[0],
            Action::Abandon {
                subtask: "b".into(),
                attempt: 1
            }
        );
        assert!(
            matches!(&actions[1], Action::Escalate { subtask, attempt: 1, reason } if subtask == "a" && reason.contains("write")),
            "{actions:?}"
        );
        // On its last attempt there is nothing left to decide: it fails.
        let w = approved(&[("a", &[])]);
        let mut commands = Vec::new();
        for attempt in 1..crate::workflow::MAX_ATTEMPTS {
            commands.push(start_calling("a", attempt, false));
            commands.push(Command::FailSubtask {
                subtask: "a".into(),
                attempt,
                kind: crate::workflow::FailureKind::Error,
                error: "down".into(),
            });
        }
        commands.push(start_calling("a", crate::workflow::MAX_ATTEMPTS, false));
        let w = run(w, commands);
        assert_eq!(
            next_actions(&config, &w, &none()),
            [Action::Abandon {
                subtask: "a".into(),
                attempt: crate::workflow::MAX_ATTEMPTS
            }]
        );
    }

    #[test]
    fn independent_subtasks_start_together_up_to_the_bound() {
        let w = approved(&[("a", &[]), ("b", &[]), ("c", &[]), ("d", &["a"])]);
        let config = GitCodeConfig {
            max_parallel: 2,
            ..GitCodeConfig::default()
        };
        assert_eq!(starts(&next_actions(&config, &w, &none())), ["a", "b"]);
        let busy: HashSet<String> = ["a".to_string()].into();
        assert_eq!(starts(&next_actions(&config, &w, &busy)), ["b"]);
    }

    #[test]
    fn a_dependent_starts_after_its_dependency_succeeds() {
        let w = approved(&[("a", &[]), ("b", &["a"])]);
        let config = GitCodeConfig::default();
        let w = run(w, vec![start("a", 1)]);
        let running: HashSet<String> = ["a".to_string()].into();
        assert!(next_actions(&config, &w, &running).is_empty());
        let w = run(
            w,
            vec![Command::CompleteSubtask {
                cache: None,
                subtask: "a".into(),
                attempt: 1,
                output: Text::new("42 words"),
            }],
        );
        assert_eq!(starts(&next_actions(&config, &w, &none())), ["b"]);
        assert_eq!(tool_input(&w, "b"), "42 words");
        assert_eq!(tool_input(&w, "a"), "요청");
    }

    #[test]
    fn a_retry_backs_off_exponentially_and_a_failure_skips_dependents() {
        let config = GitCodeConfig::default();
        let mut w = approved(&[("a", &[]), ("b", &["a"]), ("c", &["b"])]);
        for attempt in 1..=3 {
            let actions = next_actions(&config, &w, &none());
            assert_eq!(
                actions,
                [Action::Start {
                    subtask: "a".into(),
                    attempt,
                    delay: config.backoff(attempt)
                }]
            );
            w = run(
                w,
                vec![
                    start("a", attempt),
                    Command::FailSubtask {
                        subtask: "a".into(),
                        attempt,
                        kind: FailureKind::Error,
                        error: "boom".into(),
                    },
                ],
            );
        }
        assert_eq!(
            next_actions(&config, &w, &none()),
            [Action::Skip {
                subtask: "b".into(),
                reason: "dependency a failed".into()
            }]
        );
        w = run(
            w,
            vec![Command::SkipSubtask {
                subtask: "b".into(),
                reason: "dependency a failed".into(),
            }],
        );
        assert_eq!(
            next_actions(&config, &w, &none()),
            [Action::Skip {
                subtask: "c".into(),
                reason: "dependency b was skipped".into()
            }]
        );
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let config = GitCodeConfig::default();
        let ms = |a| config.backoff(a).as_millis();
        assert_eq!([ms(1), ms(2), ms(3), ms(4)], [0, 100, 200, 400]);
        assert_eq!(ms(200), 2_000);
    }

    #[test]
    fn a_running_subtask_nobody_runs_is_abandoned() {
        let w = run(approved(&[("a", &[])]), vec![start("a", 1)]);
        assert_eq!(
            next_actions(&GitCodeConfig::default(), &w, &none()),
            [Action::Abandon {
                subtask: "a".into(),
                attempt: 1
            }]
        );
    }

    #[test]
    fn finish_comes_when_every_subtask_ended_and_nothing_is_in_flight() {
        let w = run(
            approved(&[("a", &[])]),
            vec![
                start("a", 1),
                Command::CompleteSubtask {
                    cache: None,
                    subtask: "a".into(),
                    attempt: 1,
                    output: Text::new("x"),
                },
            ],
        );
        assert_eq!(
            next_actions(&GitCodeConfig::default(), &w, &none()),
            [Action::Finish]
        );
        let busy: HashSet<String> = ["a".to_string()].into();
        assert!(next_actions(&GitCodeConfig::default(), &w, &busy).is_empty());
    }
}
