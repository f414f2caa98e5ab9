//! Given events, when a command, then events or an error; and the fold's
//! properties.

use proptest::prelude::*;

use super::*;

fn plan(id: &str, depends_on: &[&str]) -> SubtaskPlan {
    SubtaskPlan {
        id: id.into(),
        title: Text::new(format!("do {id}")),
        tool: "text_stats".into(),
        depends_on: depends_on.iter().map(|d| d.to_string()).collect(),
    }
}

fn submit() -> Command {
    Command::Submit {
        request: Text::new("보고서를 요약해 주세요. 그다음 단어 수를 세어 주세요."),
        input: None,
        priority: Priority::Normal,
        sealing: None,
    }
}

fn analysis() -> Command {
    Command::RecordAnalysis {
        model: None,
        subtasks: vec![plan("st-1", &[]), plan("st-2", &["st-1"])],
        confidence: 0.8,
        rationale: Text::new("two sentences"),
    }
}

fn gate(verdict: Verdict) -> Command {
    Command::RecordGate {
        model: None,
        verdict,
        priority: Priority::High,
        risk: 0.2,
        reasons: vec![],
        rationale: Text::new("ok"),
    }
}

/// Runs commands from the empty state, applying what each yields.
fn given(commands: Vec<Command>) -> (Workflow, Vec<WorkflowEvent>) {
    let mut workflow = Workflow::default();
    let mut history = Vec::new();
    for command in commands {
        let name = command.name();
        let events = handle(&workflow, command).unwrap_or_else(|e| panic!("{name}: {e}"));
        workflow = events.iter().fold(workflow, Workflow::apply);
        history.extend(events);
    }
    (workflow, history)
}

fn executed_and_reviewed() -> Vec<Command> {
    let mut commands = vec![submit(), analysis(), gate(Verdict::Approve)];
    for id in ["st-1", "st-2"] {
        commands.push(Command::StartSubtask {
            subtask: id.into(),
            attempt: 1,
            intent: None,
        });
        commands.push(Command::CompleteSubtask {
            cache: None,
            subtask: id.into(),
            attempt: 1,
            output: Text::new("42"),
        });
    }
    commands.push(Command::FinishExecution);
    commands
}

fn ethics(passed: bool) -> Command {
    let scores = EthicsScores {
        transparency: 1.0,
        collaboration: 1.0,
        autonomy: 1.0,
        fairness: if passed { 1.0 } else { 0.2 },
    };
    Command::RecordEthics {
        model: None,
        scores,
        passed,
        findings: if passed {
            vec![]
        } else {
            vec!["age filter".into()]
        },
        rationale: None,
    }
}

#[test]
fn a_workflow_runs_from_submission_to_completion() {
    let mut commands = executed_and_reviewed();
    commands.push(ethics(true));
    let (workflow, history) = given(commands);
    assert_eq!(workflow.state, WorkflowState::Completed);
    assert_eq!(
        workflow.priority,
        Priority::High,
        "the gate set the priority"
    );
    assert_eq!(workflow.progress(), (2, 2));
    assert_eq!(
        workflow.subtask("st-2").unwrap().output,
        Some(Text::new("42"))
    );
    assert_eq!(history.last().unwrap().event_type(), "WorkflowCompleted");
    assert_eq!(Workflow::from_events(&history), workflow);
}

#[test]
fn a_reject_verdict_is_recorded_with_its_outcome() {
    let (workflow, _) = given(vec![submit(), analysis()]);
    let events = handle(&workflow, gate(Verdict::Reject)).unwrap();
    assert_eq!(
        events
            .iter()
            .map(WorkflowEvent::event_type)
            .collect::<Vec<_>>(),
        ["GateDecided", "WorkflowRejected"]
    );
    assert_eq!(
        events.iter().fold(workflow, Workflow::apply).state,
        WorkflowState::Rejected
    );
}

#[test]
fn revisions_are_limited_to_two_rounds() {
    let (workflow, _) = given(vec![
        submit(),
        analysis(),
        gate(Verdict::Revise),
        analysis(),
        gate(Verdict::Revise),
        analysis(),
    ]);
    assert_eq!((workflow.state, workflow.round), (WorkflowState::Gating, 2));
    assert!(matches!(
        handle(&workflow, gate(Verdict::Revise)),
        Err(DomainError::BadInput(_))
    ));
    assert!(handle(&workflow, gate(Verdict::Escalate)).is_ok());
}

#[test]
fn an_escalation_waits_for_a_person() {
    let (workflow, _) = given(vec![submit(), analysis(), gate(Verdict::Escalate)]);
    assert_eq!(workflow.state, WorkflowState::AwaitingHuman);
    assert!(matches!(
        handle(&workflow, Command::FinishExecution),
        Err(DomainError::InvalidTransition { .. })
    ));
    let approve = Command::RecordHumanDecision {
        approve: true,
        comment: Text::new("looks fine"),
        answers: None,
    };
    let (approved, _) = given(vec![submit(), analysis(), gate(Verdict::Escalate), approve]);
    assert_eq!(approved.state, WorkflowState::Executing);
    let reject = Command::RecordHumanDecision {
        approve: false,
        comment: Text::new("no"),
        answers: None,
    };
    let events = handle(&workflow, reject).unwrap();
    assert_eq!(
        events.iter().fold(workflow, Workflow::apply).state,
        WorkflowState::Rejected
    );
}

fn intent(idempotent: bool) -> Option<crate::workflow::ToolIntent> {
    Some(crate::workflow::ToolIntent {
        server: "http://127.0.0.1:9/mcp".into(),
        tool: "send".into(),
        arguments_sha256: "00".repeat(32),
        idempotency_key: uuid::Uuid::nil(),
        idempotent,
        repeats: None,
    })
}

#[test]
fn a_lost_call_to_a_tool_not_idempotent_waits_for_a_person_who_may_let_it_run_again() {
    let mut commands = vec![submit(), analysis(), gate(Verdict::Approve)];
    commands.push(Command::StartSubtask {
        subtask: "st-1".into(),
        attempt: 1,
        intent: intent(false),
    });
    let (running, _) = given(commands.clone());
    assert_eq!(running.subtask("st-1").unwrap().intent, intent(false));
    commands.push(Command::EscalateSubtask {
        subtask: "st-1".into(),
        attempt: 1,
        kind: FailureKind::Timeout,
        error: "no answer within 10000 ms".into(),
        reason: "outcome unknown".into(),
    });
    let (waiting, history) = given(commands.clone());
    assert_eq!(waiting.state, WorkflowState::AwaitingHuman);
    assert_eq!(
        history[history.len() - 2..]
            .iter()
            .map(WorkflowEvent::event_type)
            .collect::<Vec<_>>(),
        ["SubtaskFailed", "SubtaskEscalated"]
    );
    assert_eq!(
        waiting.subtask("st-1").unwrap().last_failure,
        Some(FailureKind::Timeout)
    );
    assert_eq!(
        waiting.subtask("st-1").unwrap().state,
        SubtaskState::Retrying
    );
    let again = Command::StartSubtask {
        subtask: "st-1".into(),
        attempt: 2,
        intent: intent(false),
    };
    assert!(matches!(
        handle(&waiting, again.clone()),
        Err(DomainError::InvalidTransition { .. })
    ));
    commands.push(Command::RecordHumanDecision {
        approve: true,
        comment: Text::new("the server did nothing; call again"),
        answers: None,
    });
    let (approved, _) = given(commands);
    assert_eq!(approved.state, WorkflowState::Executing);
    assert!(handle(&approved, again).is_ok());
}

#[test]
fn the_last_attempt_is_not_escalated_and_nothing_else_is_either() {
    let mut commands = vec![submit(), analysis(), gate(Verdict::Approve)];
    for attempt in 1..MAX_ATTEMPTS {
        commands.push(Command::StartSubtask {
            subtask: "st-1".into(),
            attempt,
            intent: intent(false),
        });
        commands.push(Command::FailSubtask {
            subtask: "st-1".into(),
            attempt,
            kind: FailureKind::Error,
            error: "down".into(),
        });
    }
    commands.push(Command::StartSubtask {
        subtask: "st-1".into(),
        attempt: MAX_ATTEMPTS,
        intent: intent(false),
    });
    let (workflow, _) = given(commands);
    let escalate = |subtask: &str, attempt| Command::EscalateSubtask {
        subtask: subtask.into(),
        attempt,
        kind: FailureKind::Abandoned,
        error: "stopped".into(),
        reason: "unknown".into(),
    };
    assert!(matches!(
        handle(&workflow, escalate("st-1", MAX_ATTEMPTS)),
        Err(DomainError::BadInput(_))
    ));
    assert!(matches!(
        handle(&workflow, escalate("st-2", 1)),
        Err(DomainError::BadInput(_))
    ));
}

#[test]
fn a_subtask_out_of_attempts_fails_the_workflow() {
    let mut commands = vec![submit(), analysis(), gate(Verdict::Approve)];
    for attempt in 1..=MAX_ATTEMPTS {
        commands.push(Command::StartSubtask {
            subtask: "st-1".into(),
            attempt,
            intent: None,
        });
        commands.push(Command::FailSubtask {
            subtask: "st-1".into(),
            attempt,
            kind: FailureKind::Timeout,
            error: "timed out".into(),
        });
    }
    commands.push(Command::SkipSubtask {
        subtask: "st-2".into(),
        reason: "st-1 failed".into(),
    });
    let (workflow, history) = given(commands);
    assert_eq!(
        workflow.subtask("st-1").unwrap().state,
        SubtaskState::Failed
    );
    assert!(history.iter().any(|e| matches!(
        e,
        WorkflowEvent::SubtaskFailed {
            attempt: 2,
            will_retry: true,
            ..
        }
    )));
    let start_again = Command::StartSubtask {
        subtask: "st-1".into(),
        attempt: 4,
        intent: None,
    };
    assert!(matches!(
        handle(&workflow, start_again),
        Err(DomainError::BadInput(_))
    ));
    let events = handle(&workflow, Command::FinishExecution).unwrap();
    assert_eq!(events.last().unwrap().event_type(), "WorkflowFailed");
}

#[test]
fn a_flagged_review_needs_a_person() {
    let mut commands = executed_and_reviewed();
    commands.push(ethics(false));
    assert_eq!(given(commands).0.state, WorkflowState::Flagged);
}

#[test]
fn bad_input_and_wrong_states_are_refused() {
    let empty = Command::Submit {
        request: Text::new("   "),
        input: None,
        priority: Priority::Low,
        sealing: None,
    };
    assert!(matches!(
        handle(&Workflow::default(), empty),
        Err(DomainError::BadInput(_))
    ));
    let huge = Command::Submit {
        request: Text::new("가".repeat(MAX_REQUEST_BYTES)),
        input: None,
        priority: Priority::Low,
        sealing: None,
    };
    assert!(matches!(
        handle(&Workflow::default(), huge),
        Err(DomainError::BadInput(_))
    ));
    assert_eq!(
        handle(&Workflow::default(), analysis()),
        Err(DomainError::NotFound)
    );
    let (submitted, _) = given(vec![submit()]);
    assert!(matches!(
        handle(&submitted, submit()),
        Err(DomainError::InvalidTransition { .. })
    ));
    let (done, _) = given(vec![submit(), Command::Cancel { reason: None }]);
    assert_eq!(done.state, WorkflowState::Cancelled);
    assert!(matches!(
        handle(&done, Command::Cancel { reason: None }),
        Err(DomainError::InvalidTransition { .. })
    ));
}

#[test]
fn events_round_trip_through_json_under_their_type_names() {
    let (_, history) = given(executed_and_reviewed());
    for event in history {
        let json = serde_json::to_value(&event).unwrap();
        assert_eq!(json["type"], event.event_type());
        assert_eq!(
            serde_json::from_value::<WorkflowEvent>(json).unwrap(),
            event
        );
    }
}

#[test]
fn events_encode_without_the_tag_and_decode_back() {
    let (_, history) = given(executed_and_reviewed());
    for event in history {
        let (event_type, version, payload) = event.encode();
        assert!(payload.get("type").is_none(), "{event_type}");
        assert_eq!(
            WorkflowEvent::decode(event_type, version, &payload).unwrap(),
            event
        );
    }
}

#[test]
fn a_schema_1_subtask_failure_is_upcast_to_an_error() {
    let v1 =
        serde_json::json!({"subtask": "st-1", "attempt": 2, "error": "boom", "will_retry": true});
    assert_eq!(
        WorkflowEvent::decode("SubtaskFailed", 1, &v1).unwrap(),
        WorkflowEvent::SubtaskFailed {
            subtask: "st-1".into(),
            attempt: 2,
            kind: FailureKind::Error,
            error: "boom".into(),
            will_retry: true,
        }
    );
}

/// Schema versions that only turned strings into `Text` read older
/// payloads as they are.
#[test]
fn payloads_from_before_reasons_became_text_still_load() {
    let v2 = serde_json::json!({"subtask": "st-1", "attempt": 1, "kind": "timeout",
        "error": "deadline passed", "will_retry": true});
    let WorkflowEvent::SubtaskFailed { error, .. } =
        WorkflowEvent::decode("SubtaskFailed", 2, &v2).unwrap()
    else {
        panic!("a subtask failure")
    };
    assert_eq!(error.as_str(), "deadline passed");
    let v1 = serde_json::json!({"reasons": ["no registered tool for st-1"]});
    assert_eq!(
        WorkflowEvent::decode("WorkflowRejected", 1, &v1).unwrap(),
        WorkflowEvent::WorkflowRejected {
            reasons: vec![Text::new("no registered tool for st-1")]
        }
    );
}

#[test]
fn unknown_newer_or_malformed_payloads_are_typed_errors() {
    let empty = serde_json::json!({});
    assert!(matches!(
        WorkflowEvent::decode("Greeted", 1, &empty),
        Err(DecodeError::UnknownType(_))
    ));
    assert!(matches!(
        WorkflowEvent::decode("SubtaskFailed", 4, &empty),
        Err(DecodeError::NewerSchema { known: 3, .. })
    ));
    assert!(matches!(
        WorkflowEvent::decode("SubtaskStarted", 1, &empty),
        Err(DecodeError::Invalid { .. })
    ));
    assert!(matches!(
        WorkflowEvent::decode("WorkflowCompleted", 1, &serde_json::json!([])),
        Err(DecodeError::Invalid { .. })
    ));
}

#[test]
fn an_invalid_tool_input_is_not_retried() {
    let mut commands = vec![submit(), analysis(), gate(Verdict::Approve)];
    commands.push(Command::StartSubtask {
        subtask: "st-1".into(),
        attempt: 1,
        intent: None,
    });
    let (workflow, _) = given(commands);
    let events = handle(
        &workflow,
        Command::FailSubtask {
            subtask: "st-1".into(),
            attempt: 1,
            kind: FailureKind::Invalid,
            error: "no numbers".into(),
        },
    )
    .unwrap();
    assert!(matches!(
        events[..],
        [WorkflowEvent::SubtaskFailed {
            will_retry: false,
            ..
        }]
    ));
}

#[test]
fn text_debug_output_hides_the_text() {
    assert_eq!(format!("{:?}", Text::new("김민수(34)")), "Text(7 chars)");
}

fn arb_failure_kind() -> impl Strategy<Value = FailureKind> {
    prop_oneof![
        Just(FailureKind::Error),
        Just(FailureKind::Invalid),
        Just(FailureKind::Timeout),
        Just(FailureKind::Abandoned)
    ]
}

fn arb_command() -> impl Strategy<Value = Command> {
    let id = prop_oneof![
        Just("st-1".to_string()),
        Just("st-2".to_string()),
        Just("st-9".to_string())
    ];
    let verdict = prop_oneof![
        Just(Verdict::Approve),
        Just(Verdict::Revise),
        Just(Verdict::Reject),
        Just(Verdict::Escalate)
    ];
    prop_oneof![
        Just(submit()),
        Just(analysis()),
        verdict.prop_map(gate),
        any::<bool>().prop_map(|approve| Command::RecordHumanDecision {
            approve,
            comment: Text::new("c"),
            answers: None,
        }),
        (id.clone(), 0u8..5, any::<Option<bool>>()).prop_map(|(subtask, attempt, calls)| {
            Command::StartSubtask {
                subtask,
                attempt,
                intent: calls.and_then(intent),
            }
        }),
        (id.clone(), 0u8..5).prop_map(|(subtask, attempt)| Command::EscalateSubtask {
            subtask,
            attempt,
            kind: FailureKind::Abandoned,
            error: "stopped".into(),
            reason: "unknown".into(),
        }),
        (id.clone(), 0u8..5).prop_map(|(subtask, attempt)| Command::CompleteSubtask {
            cache: None,
            subtask,
            attempt,
            output: Text::new("o")
        }),
        (id.clone(), 0u8..5, arb_failure_kind()).prop_map(|(subtask, attempt, kind)| {
            Command::FailSubtask {
                subtask,
                attempt,
                kind,
                error: "e".into(),
            }
        }),
        id.prop_map(|subtask| Command::SkipSubtask {
            subtask,
            reason: "r".into()
        }),
        Just(Command::FinishExecution),
        any::<bool>().prop_map(ethics),
        Just(Command::Cancel { reason: None }),
    ]
}

proptest! {
    /// Whatever commands arrive, the state kept by applying each accepted
    /// command's events equals folding the whole recorded history, and a
    /// refused command changes nothing.
    #[test]
    fn handled_state_equals_the_fold_of_its_events(commands in prop::collection::vec(arb_command(), 0..40)) {
        let mut workflow = Workflow::default();
        let mut history = Vec::new();
        for command in commands {
            if let Ok(events) = handle(&workflow, command) {
                prop_assert!(!events.is_empty());
                workflow = events.iter().fold(workflow, Workflow::apply);
                history.extend(events);
            }
            prop_assert_eq!(&Workflow::from_events(&history), &workflow);
        }
        if workflow.state.is_final() {
            let cancelled = handle(&workflow, Command::Cancel { reason: None });
            prop_assert!(cancelled.is_err(), "a final workflow was cancelled");
        }
    }

    /// The fold accepts any sequence of events, even ones no command would produce.
    #[test]
    fn the_fold_never_panics(events in prop::collection::vec(arb_command(), 0..40)) {
        // Events produced from arbitrary states, applied to a fresh workflow in any order.
        let mut all = Vec::new();
        let mut workflow = Workflow::default();
        for command in events {
            for state in [WorkflowState::New, WorkflowState::Submitted, WorkflowState::Gating, WorkflowState::Executing,
                          WorkflowState::Reviewing, WorkflowState::AwaitingHuman] {
                let probe = Workflow { state, ..workflow.clone() };
                if let Ok(produced) = handle(&probe, command.clone()) {
                    all.extend(produced);
                }
            }
            workflow = all.iter().fold(Workflow::default(), Workflow::apply);
        }
        let reversed: Vec<_> = all.iter().rev().cloned().collect();
        let _ = Workflow::from_events(&reversed);
    }
}
