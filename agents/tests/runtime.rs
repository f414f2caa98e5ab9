//! The runtime end to end on the in-memory store and queue: the sample
//! requests reach the states the reference policies lead them to, and
//! escalation, cancellation and retries behave as documented.

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use agentledger_agents::{
    InMemoryWorkQueue, RuntimeConfig, SystemClock, Tool, ToolCall, ToolFailure, ToolRegistry,
};
use agentledger_domain::policy::gitcode::GitCodeConfig;
use agentledger_domain::tools::ToolSpec;
use agentledger_domain::workflow::{FailureKind, Verdict, WorkflowEvent, WorkflowState};
use agentledger_eventstore::{Actor, EventStore, InMemoryEventStore};
use async_trait::async_trait;
use common::*;

fn in_memory(tools: ToolRegistry, config: RuntimeConfig) -> (Arc<dyn EventStore>, Running) {
    let store: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::default());
    let running = Running::start(
        store.clone(),
        Arc::new(InMemoryWorkQueue::default()),
        tools,
        Arc::new(SystemClock),
        config,
    );
    (store, running)
}

fn quick_retries() -> RuntimeConfig {
    RuntimeConfig {
        gitcode: GitCodeConfig {
            backoff_initial_ms: 1,
            ..GitCodeConfig::default()
        },
        ..RuntimeConfig::default()
    }
}

async fn submit(running: &Running, request: &str) -> uuid::Uuid {
    running
        .runtime
        .submit(agentledger_agents::Submission {
            request: request.into(),
            ..Default::default()
        })
        .await
        .expect("a valid submission")
}

#[tokio::test]
async fn sample_requests_reach_the_states_their_policies_lead_to() {
    let (store, running) = in_memory(ToolRegistry::default(), RuntimeConfig::default());
    let mut ids = Vec::new();
    for (request, _) in REQUESTS {
        ids.push(submit(&running, request).await);
    }
    let seen = settle(&*store, &ids).await;
    for (id, (request, expected)) in ids.iter().zip(REQUESTS) {
        let followed = &seen[id];
        assert_eq!(followed.workflow.state, *expected, "{request}");
        assert_each_decision_once(*id, followed);
        for event in &followed.events {
            let metadata = event.metadata().unwrap();
            assert_eq!(metadata.correlation_id, Some(*id));
            if event.event_type != "WorkflowSubmitted" {
                assert!(metadata.causation_id.is_some(), "{}", event.event_type);
            }
            if ["AnalysisProduced", "GateDecided", "EthicsReviewed"]
                .contains(&event.event_type.as_str())
            {
                let policy = metadata.policy.expect("agent decisions name their policy");
                assert_eq!(policy.fingerprint.len(), 64);
                assert!(!metadata.inputs.is_empty(), "decisions name their inputs");
                assert!(metadata.inputs.iter().all(|p| *p < event.global_position));
            }
        }
    }
    // The partly toolless request went through one revision.
    let revised = &seen[&ids[9]];
    assert!(revised.decoded.iter().any(|e| matches!(
        e,
        WorkflowEvent::GateDecided {
            verdict: Verdict::Revise,
            ..
        }
    )));
    running.stop().await;
}

#[tokio::test]
async fn an_escalated_workflow_waits_for_a_person_and_resumes() {
    let (store, running) = in_memory(ToolRegistry::default(), RuntimeConfig::default());
    let approved = submit(&running, "Delete the duplicate lines, then sort the rest.").await;
    let refused = submit(
        &running,
        "운영 데이터베이스에서 1년이 지난 고객 기록을 모두 삭제해 주세요.",
    )
    .await;
    let seen = settle(&*store, &[approved, refused]).await;
    assert_eq!(seen[&approved].workflow.state, WorkflowState::AwaitingHuman);
    assert_eq!(seen[&refused].workflow.state, WorkflowState::AwaitingHuman);

    running
        .runtime
        .decide_escalation(
            approved,
            decision(true, "checked: only duplicates".into(), "kim"),
        )
        .await
        .unwrap();
    running
        .runtime
        .decide_escalation(
            refused,
            decision(false, "not without a backup".into(), "lee"),
        )
        .await
        .unwrap();
    let seen = follow_until(
        &*store,
        &[approved, refused],
        std::time::Duration::from_secs(60),
        |w| w.state.is_final(),
    )
    .await;
    assert_eq!(seen[&approved].workflow.state, WorkflowState::Completed);
    assert_eq!(seen[&refused].workflow.state, WorkflowState::Rejected);
    let human = seen[&approved]
        .events
        .iter()
        .find(|e| e.event_type == "HumanDecisionRecorded")
        .unwrap();
    let metadata = human.metadata().unwrap();
    assert_eq!(metadata.actor.name, "kim");
    assert!(metadata.policy.is_none());
    // A second decision is refused: the workflow is no longer waiting.
    let again = running
        .runtime
        .decide_escalation(approved, decision(true, String::new(), "kim"))
        .await;
    assert!(again.is_err());
    running.stop().await;
}

#[tokio::test]
async fn bad_submissions_write_nothing() {
    let (store, running) = in_memory(ToolRegistry::default(), RuntimeConfig::default());
    for request in ["", "   \n", &"가".repeat(11_000)] {
        let refused = running
            .runtime
            .submit(agentledger_agents::Submission {
                request: request.to_string(),
                ..Default::default()
            })
            .await;
        assert!(matches!(
            refused,
            Err(agentledger_agents::RuntimeError::Rejected(_))
        ));
    }
    assert_eq!(store.head_position().await.unwrap(), 0);
    running.stop().await;
}

/// Fails its first `failures` attempts at each subtask, then echoes.
struct Flaky {
    failures: u32,
    calls: AtomicU32,
}

#[async_trait]
impl Tool for Flaky {
    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: "flaky",
            description: "fails, then works",
            keywords: &["flaky"],
        }
    }

    async fn run(&self, call: ToolCall) -> Result<String, ToolFailure> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if u32::from(call.attempt) <= self.failures {
            Err(ToolFailure::Error(format!(
                "attempt {} failed",
                call.attempt
            )))
        } else {
            Ok(format!("done on attempt {}", call.attempt))
        }
    }
}

fn attempts(followed: &Followed, subtask: &str) -> Vec<(u8, bool)> {
    followed
        .decoded
        .iter()
        .filter_map(|e| match e {
            WorkflowEvent::SubtaskSucceeded {
                subtask: s,
                attempt,
                ..
            } if s == subtask => Some((*attempt, true)),
            WorkflowEvent::SubtaskFailed {
                subtask: s,
                attempt,
                ..
            } if s == subtask => Some((*attempt, false)),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn a_tool_that_fails_twice_succeeds_on_the_third_attempt() {
    let tools = ToolRegistry::default().register(Flaky {
        failures: 2,
        calls: AtomicU32::new(0),
    });
    let (store, running) = in_memory(tools, quick_retries());
    let id = submit(&running, "Run the flaky step.").await;
    let seen = settle(&*store, &[id]).await;
    let followed = &seen[&id];
    assert_eq!(followed.workflow.state, WorkflowState::Completed);
    assert_eq!(
        attempts(followed, "st-1"),
        [(1, false), (2, false), (3, true)]
    );
    running.stop().await;
}

#[tokio::test]
async fn a_tool_that_always_fails_fails_the_workflow_and_skips_dependents() {
    let tools = ToolRegistry::default().register(Flaky {
        failures: 3,
        calls: AtomicU32::new(0),
    });
    let (store, running) = in_memory(tools, quick_retries());
    let id = submit(
        &running,
        "Run the flaky step. Then count the words of its output.",
    )
    .await;
    let seen = settle(&*store, &[id]).await;
    let followed = &seen[&id];
    assert_eq!(followed.workflow.state, WorkflowState::Failed);
    assert_eq!(
        attempts(followed, "st-1"),
        [(1, false), (2, false), (3, false)]
    );
    assert!(followed.decoded.iter().any(|e| matches!(
        e,
        WorkflowEvent::SubtaskFailed {
            attempt: 3,
            will_retry: false,
            kind: FailureKind::Error,
            ..
        }
    )));
    assert!(followed.decoded.iter().any(|e| matches!(
        e,
        WorkflowEvent::SubtaskSkipped { subtask, reason } if subtask == "st-2" && reason.as_str() == "dependency st-1 failed"
    )));
    assert_each_decision_once(id, followed);
    running.stop().await;
}

#[tokio::test]
async fn a_cancelled_workflow_stops() {
    let (store, running) = in_memory(ToolRegistry::default(), RuntimeConfig::default());
    let id = submit(&running, "Delete the old notes.").await;
    settle(&*store, &[id]).await; // escalated: waiting for a person
    running
        .runtime
        .cancel(id, Some("no longer needed".into()), &Actor::human("kim"))
        .await
        .unwrap();
    let seen = follow_until(&*store, &[id], std::time::Duration::from_secs(60), |w| {
        w.state.is_final()
    })
    .await;
    assert_eq!(seen[&id].workflow.state, WorkflowState::Cancelled);
    assert!(
        running
            .runtime
            .cancel(id, None, &Actor::human("kim"))
            .await
            .is_err(),
        "final states cannot be cancelled"
    );
    running.stop().await;
}

#[tokio::test]
async fn an_idempotency_key_returns_the_first_workflow_and_refuses_another_request() {
    let (store, running) = in_memory(ToolRegistry::default(), RuntimeConfig::default());
    let submission = |request: &str| agentledger_agents::Submission {
        request: request.into(),
        idempotency_key: Some("order-42".into()),
        owner: Some("kim".into()),
        ..Default::default()
    };
    let first = running
        .runtime
        .submit_recorded(submission("Sort the tags."))
        .await
        .unwrap();
    assert!(!first.existing);
    let head = store.head_position().await.unwrap();
    let again = running
        .runtime
        .submit_recorded(submission("Sort the tags."))
        .await
        .unwrap();
    assert_eq!(
        (again.id, again.position, again.existing),
        (first.id, first.position, true)
    );
    let other = running
        .runtime
        .submit_recorded(submission("Count the tags."))
        .await;
    assert!(matches!(
        other,
        Err(agentledger_agents::RuntimeError::KeyReused)
    ));
    // Another owner's key is another workflow.
    let mut theirs = submission("Sort the tags.");
    theirs.owner = Some("lee".into());
    let theirs = running.runtime.submit_recorded(theirs).await.unwrap();
    assert_ne!(theirs.id, first.id);
    settle(&*store, &[first.id, theirs.id]).await;
    let events = store.read_all(1, 10_000).await.unwrap();
    let submissions = events
        .iter()
        .filter(|e| e.event_type == "WorkflowSubmitted")
        .count();
    assert_eq!(submissions, 2, "the repeated key wrote nothing");
    assert!(head >= first.position);
    running.stop().await;
}

/// Crypto-shredding in the runtime: the agents work on the plain text, the
/// store only ever holds it sealed, a reload opens it while the key exists
/// and shows it erased after; a subject without keys configured is refused
/// with nothing written.
#[tokio::test]
async fn a_subjects_text_is_sealed_at_rest_used_by_the_agents_and_erased_when_forgotten() {
    use agentledger_domain::workflow::ERASED;
    use agentledger_eventstore::subject_keys::InMemorySubjectKeys;

    let store: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::default());
    let runtime = agentledger_agents::Runtime::new(
        store.clone(),
        Arc::new(InMemoryWorkQueue::default()),
        ToolRegistry::default(),
        Arc::new(SystemClock),
        RuntimeConfig::default(),
    )
    .with_subject_keys(Arc::new(InMemorySubjectKeys::default()));
    let running = Running::start_runtime(runtime);
    let request = "이영희(41세)의 상담 기록을 요약해 주세요. 그다음 단어 수를 세어 주세요.";
    let submission = agentledger_agents::Submission {
        request: request.into(),
        subject: Some("상담자-17".into()),
        idempotency_key: Some("k-17".into()),
        ..Default::default()
    };
    let id = running.runtime.submit(submission.clone()).await.unwrap();
    let seen = settle(&*store, &[id]).await;
    assert_eq!(seen[&id].workflow.state, WorkflowState::Completed);
    let stored: String = seen[&id]
        .events
        .iter()
        .map(|e| e.payload.to_string())
        .collect();
    assert!(!stored.contains("이영희"), "sealed at rest: {stored}");
    // The agents saw the text: the summary output is about it.
    let loaded = running.runtime.load(id).await.unwrap().unwrap();
    assert_eq!(loaded.workflow.request.as_str(), request);
    let outputs: Vec<&str> = loaded
        .workflow
        .subtasks
        .iter()
        .filter_map(|s| s.output.as_ref().map(|o| o.as_str()))
        .collect();
    assert!(outputs.iter().any(|o| o.contains("이영희")), "{outputs:?}");
    // The same key and request again: the same workflow, nothing written.
    let head = store.head_position().await.unwrap();
    assert_eq!(running.runtime.submit(submission).await.unwrap(), id);

    let forgotten = running
        .runtime
        .forget_subject("default", "상담자-17", &Actor::human("dpo"))
        .await
        .unwrap();
    assert!(forgotten.key_id.is_some());
    let erased = running.runtime.load(id).await.unwrap().unwrap();
    assert_eq!(erased.workflow.request.as_str(), ERASED);
    assert!(erased.workflow.subtasks.iter().all(|s| s
        .plan
        .as_ref()
        .is_some_and(|p| p.title.as_str() == ERASED)
        && s.output.as_ref().is_none_or(|o| o.as_str() == ERASED)));
    // Forgetting is recorded (one event, on the privacy stream), and the
    // chains still verify.
    assert_eq!(store.head_position().await.unwrap(), head + 1);
    let again = running
        .runtime
        .forget_subject("default", "상담자-17", &Actor::human("dpo"))
        .await
        .unwrap();
    assert_eq!(again.key_id, None, "nothing left to destroy");
    assert_eq!(
        store.head_position().await.unwrap(),
        head + 1,
        "nor to record"
    );
    assert!(
        agentledger_eventstore::verify_ledger(&*store, |_, _| {})
            .await
            .unwrap()
            .ok
    );
    running.stop().await;

    // A runtime without subject keys refuses a subject; nothing is written.
    let (plain_store, plain) = in_memory(ToolRegistry::default(), RuntimeConfig::default());
    let refused = plain
        .runtime
        .submit(agentledger_agents::Submission {
            request: "Summarise the notes.".into(),
            subject: Some("someone".into()),
            ..Default::default()
        })
        .await;
    assert!(matches!(
        refused,
        Err(agentledger_agents::RuntimeError::Rejected(
            agentledger_domain::workflow::DomainError::BadInput(_)
        ))
    ));
    assert_eq!(plain_store.head_position().await.unwrap(), 0);
    plain.stop().await;
}

/// A person's decision as the tests make it: by `by`, no position check,
/// self-approval allowed (the submitter here is `anonymous`).
fn decision(approve: bool, comment: String, by: &str) -> agentledger_agents::HumanDecision {
    agentledger_agents::HumanDecision {
        approve,
        comment,
        by: Actor::human(by),
        expected_position: None,
        allow_self: true,
    }
}
