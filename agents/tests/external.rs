//! Roles served by external workers, on real PostgreSQL: tasks handed out
//! and claimed under leases, decisions checked and recorded once with the
//! worker as the actor, leases that run out, workers that die.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use agentledger_agents::{
    AgentTask, DeclaredPolicy, ManualClock, PostgresWorkQueue, Runtime, RuntimeConfig,
    RuntimeError, Submission, SystemClock, TaskId, ToolRegistry, WorkQueue, Worker,
};
use agentledger_domain::names::AgentRole;
use agentledger_domain::workflow::{DomainError, WorkflowEvent, WorkflowState};
use agentledger_eventstore::testing::TestDatabase;
use agentledger_eventstore::{Actor, EventStore, Metadata};
use common::*;
use serde_json::{json, Value};
use uuid::Uuid;

const REQUEST: &str = "Count the words of this request, then list its keywords.";

fn all_external() -> RuntimeConfig {
    RuntimeConfig {
        external: BTreeSet::from([AgentRole::Analyst, AgentRole::Gatekeeper, AgentRole::Ethics]),
        ..RuntimeConfig::default()
    }
}

async fn postgres(db: &TestDatabase) -> (Arc<dyn EventStore>, Arc<dyn WorkQueue>) {
    let store = db.store().await;
    let queue = Arc::new(PostgresWorkQueue::new(store.pool().clone()));
    (Arc::new(store) as Arc<dyn EventStore>, queue)
}

fn worker(id: &str, subject: &str) -> Worker {
    Worker {
        id: id.into(),
        version: "2.1.0".into(),
        subject: subject.into(),
        method: "api_key".into(),
        tenant: "default".into(),
    }
}

/// A worker's policy: a two-step plan (three with a lookup where the
/// external `crm_lookup` tool is offered), approval, a passing review.
fn decision_for(task: &AgentTask) -> Value {
    match task.role {
        AgentRole::Analyst => {
            let mut plan = json!({
                "subtasks": [
                    { "id": "count", "title": "Count the words of the request", "tool": "text_stats" },
                    { "id": "keys", "title": "List the keywords", "tool": "keywords", "dependsOn": ["count"] }
                ],
                "confidence": 0.9,
                "rationale": "two steps, the second reads the first"
            });
            let offered = task.context["tools"]
                .as_array()
                .is_some_and(|tools| tools.iter().any(|t| t["name"] == "crm_lookup"));
            if offered {
                plan["subtasks"].as_array_mut().unwrap().push(
                    json!({ "id": "crm", "title": "Look the customer up", "tool": "crm_lookup" }),
                );
            }
            plan
        }
        AgentRole::Gatekeeper => json!({
            "verdict": "APPROVE",
            "priority": task.context["priority"],
            "risk": 0.1,
            "reasons": ["the plan is sound"],
            "rationale": "nothing risky in it"
        }),
        _ => json!({
            "transparency": 0.9, "collaboration": 0.9, "autonomy": 1.0, "fairness": 1.0,
            "passed": true, "findings": [], "rationale": "검토 완료: 문제 없음"
        }),
    }
}

fn policy(role: AgentRole) -> DeclaredPolicy {
    DeclaredPolicy {
        name: Some(format!("{}-test", role.as_str().to_lowercase())),
        version: Some("7".into()),
        fingerprint: None,
    }
}

async fn submit(runtime: &Runtime, request: &str) -> Uuid {
    runtime
        .submit(Submission {
            request: request.into(),
            ..Default::default()
        })
        .await
        .expect("submitted")
}

/// Waits for this runtime's next hand-over to `role` (no polling).
async fn handed_over(signals: &mut tokio::sync::broadcast::Receiver<AgentRole>, role: AgentRole) {
    tokio::time::timeout(Duration::from_secs(30), async {
        while signals.recv().await.expect("signals stay open") != role {}
    })
    .await
    .expect("the task was handed over");
}

async fn claim(runtime: &Runtime, role: AgentRole, worker: &Worker) -> AgentTask {
    runtime
        .claim_agent_task(role, worker, Duration::from_secs(30))
        .await
        .expect("claimed")
        .expect("a task waits")
}

async fn stream_len(store: &dyn EventStore, id: Uuid) -> usize {
    store
        .read_stream(&agentledger_agents::stream_of(id), 0, 1000)
        .await
        .unwrap()
        .len()
}

#[tokio::test]
async fn three_roles_decided_by_workers_are_recorded_with_the_worker_as_actor() {
    let db = TestDatabase::create().await;
    let (store, queue) = postgres(&db).await;
    let running = Running::start(
        store.clone(),
        queue.clone(),
        ToolRegistry::default(),
        Arc::new(SystemClock),
        all_external(),
    );
    let runtime = running.runtime.clone();
    let mut signals = runtime.agent_task_signals();
    let id = submit(&runtime, REQUEST).await;
    let workers = [
        (AgentRole::Analyst, worker("analyst-1", "apikey:a")),
        (AgentRole::Gatekeeper, worker("gate-1", "apikey:g")),
        (AgentRole::Ethics, worker("ethics-1", "apikey:e")),
    ];
    for (role, worker) in &workers {
        handed_over(&mut signals, *role).await;
        let task = claim(&runtime, *role, worker).await;
        assert_eq!(task.id.workflow, id);
        assert_eq!(task.attempt, 1);
        assert_eq!(task.context["request"], REQUEST);
        match role {
            AgentRole::Analyst => assert!(task.context["tools"]
                .as_array()
                .unwrap()
                .iter()
                .any(|t| t["name"] == "text_stats")),
            AgentRole::Gatekeeper => {
                assert_eq!(
                    task.context["analysis"]["subtasks"][1]["dependsOn"][0],
                    "count"
                )
            }
            _ => {
                assert_eq!(task.context["subtasks"][0]["state"], "SUCCEEDED");
                assert!(task.context["subtasks"][1]["output"].is_string());
            }
        }
        runtime
            .submit_agent_decision(task.id, worker, &decision_for(&task), policy(*role))
            .await
            .expect("recorded");
    }
    let seen = settle(&*store, &[id]).await;
    let followed = &seen[&id];
    assert_eq!(followed.workflow.state, WorkflowState::Completed);
    assert_each_decision_once(id, followed);
    for (role, worker) in &workers {
        let event_type = match role {
            AgentRole::Analyst => "AnalysisProduced",
            AgentRole::Gatekeeper => "GateDecided",
            _ => "EthicsReviewed",
        };
        let event = followed
            .events
            .iter()
            .find(|e| e.event_type == event_type)
            .unwrap();
        let metadata: Metadata = event.metadata().unwrap();
        let Actor {
            name,
            version,
            subject,
            role: actor_role,
            ..
        } = metadata.actor;
        assert_eq!(
            (name.as_str(), version.as_str(), subject.as_str()),
            (worker.id.as_str(), "2.1.0", worker.subject.as_str())
        );
        assert_eq!(actor_role, role.as_str());
        let policy = metadata.policy.unwrap();
        assert_eq!(
            policy.name,
            format!("{}-test", role.as_str().to_lowercase())
        );
        assert_eq!(policy.version, "7");
        assert_eq!(policy.fingerprint.len(), 64);
    }
    // The executor stayed built in; the review's rationale is kept.
    assert!(followed
        .decoded
        .iter()
        .any(|e| matches!(e, WorkflowEvent::SubtaskSucceeded { .. })));
    assert!(followed.decoded.iter().any(|e| matches!(
        e,
        WorkflowEvent::EthicsReviewed { rationale: Some(r), .. } if r.as_str() == "검토 완료: 문제 없음"
    )));
    assert_eq!(queue.waiting().await.unwrap(), 0, "no row left behind");
    running.stop().await;
}

#[tokio::test]
async fn a_lease_that_ran_out_goes_to_another_worker_and_the_late_decision_is_refused() {
    let db = TestDatabase::create().await;
    let (store, queue) = postgres(&db).await;
    let clock = ManualClock::new(chrono::Utc::now());
    let running = Running::start(
        store.clone(),
        queue,
        ToolRegistry::default(),
        Arc::new(clock.clone()),
        all_external(),
    );
    let runtime = running.runtime.clone();
    let mut signals = runtime.agent_task_signals();
    let id = submit(&runtime, REQUEST).await;
    handed_over(&mut signals, AgentRole::Analyst).await;
    let slow = worker("slow", "apikey:s");
    let fast = worker("fast", "apikey:f");
    let first = runtime
        .claim_agent_task(AgentRole::Analyst, &slow, Duration::from_secs(5))
        .await
        .unwrap()
        .unwrap();
    // Held: nobody else gets it.
    assert!(runtime
        .claim_agent_task(AgentRole::Analyst, &fast, Duration::from_secs(5))
        .await
        .unwrap()
        .is_none());
    clock.advance(Duration::from_secs(6));
    let renewed = runtime
        .renew_agent_task(first.id, &slow, Duration::from_secs(5))
        .await;
    assert!(
        matches!(renewed, Err(RuntimeError::TaskLost(_))),
        "{renewed:?}"
    );
    let second = claim(&runtime, AgentRole::Analyst, &fast).await;
    assert_eq!(second.id, first.id, "the same task");
    assert_eq!(second.attempt, 2);
    let before = stream_len(&*store, id).await;
    let late = runtime
        .submit_agent_decision(first.id, &slow, &decision_for(&first), policy(first.role))
        .await;
    assert!(matches!(late, Err(RuntimeError::TaskLost(_))), "{late:?}");
    assert_eq!(stream_len(&*store, id).await, before, "nothing written");
    runtime
        .submit_agent_decision(
            second.id,
            &fast,
            &decision_for(&second),
            policy(second.role),
        )
        .await
        .expect("the holder's decision is recorded");
    // The slow worker's decision after the fast one's: refused, nothing written.
    let after = stream_len(&*store, id).await;
    let again = runtime
        .submit_agent_decision(first.id, &slow, &decision_for(&first), policy(first.role))
        .await;
    assert!(matches!(again, Err(RuntimeError::TaskLost(_))), "{again:?}");
    assert_eq!(stream_len(&*store, id).await, after);
    running.stop().await;
}

#[tokio::test]
async fn the_same_decision_twice_is_stored_once_and_a_different_one_is_refused() {
    let db = TestDatabase::create().await;
    let (store, queue) = postgres(&db).await;
    let running = Running::start(
        store.clone(),
        queue,
        ToolRegistry::default(),
        Arc::new(SystemClock),
        RuntimeConfig {
            external: BTreeSet::from([AgentRole::Gatekeeper]),
            ..RuntimeConfig::default()
        },
    );
    let runtime = running.runtime.clone();
    let mut signals = runtime.agent_task_signals();
    let id = submit(&runtime, REQUEST).await;
    handed_over(&mut signals, AgentRole::Gatekeeper).await;
    let gate = worker("gate", "apikey:g");
    let task = claim(&runtime, AgentRole::Gatekeeper, &gate).await;
    // Escalation: the workflow then waits for a person, so the stream
    // stays still while the decision is sent again.
    let escalate = json!({
        "verdict": "ESCALATE", "priority": "HIGH", "risk": 0.7,
        "reasons": ["a person should look"], "rationale": "unsure"
    });
    let first = runtime
        .submit_agent_decision(task.id, &gate, &escalate, policy(task.role))
        .await
        .unwrap();
    let len = stream_len(&*store, id).await;
    let again = runtime
        .submit_agent_decision(task.id, &gate, &escalate, policy(task.role))
        .await
        .expect("the same decision again succeeds");
    assert_eq!(again, first);
    assert_eq!(stream_len(&*store, id).await, len, "stored once");
    // Sent again without a worker id, on the same credential: the same.
    let anonymous = worker("", "apikey:g");
    let resent = runtime
        .submit_agent_decision(task.id, &anonymous, &escalate, policy(task.role))
        .await
        .expect("the credential's own decision, sent again");
    assert_eq!(resent, first);
    // Another worker of the same credential deciding alike did not make
    // this decision: refused, so that the ledger's actor stays the worker
    // that held the lease.
    let twin = worker("twin", "apikey:g");
    let refused = runtime
        .submit_agent_decision(task.id, &twin, &escalate, policy(task.role))
        .await;
    assert!(
        matches!(refused, Err(RuntimeError::TaskLost(_))),
        "{refused:?}"
    );
    assert_eq!(stream_len(&*store, id).await, len, "stored once");
    let mut other = escalate.clone();
    other["verdict"] = json!("REJECT");
    let refused = runtime
        .submit_agent_decision(task.id, &gate, &other, policy(task.role))
        .await;
    assert!(
        matches!(refused, Err(RuntimeError::TaskLost(_))),
        "{refused:?}"
    );
    assert_eq!(stream_len(&*store, id).await, len, "nothing written");
    let history = runtime.load(id).await.unwrap().unwrap();
    assert_eq!(history.workflow.state, WorkflowState::AwaitingHuman);
    running.stop().await;
}

#[tokio::test]
async fn invalid_decisions_and_strangers_are_refused_with_nothing_written() {
    let db = TestDatabase::create().await;
    let (store, queue) = postgres(&db).await;
    let running = Running::start(
        store.clone(),
        queue,
        ToolRegistry::default(),
        Arc::new(SystemClock),
        all_external(),
    );
    let runtime = running.runtime.clone();
    let mut signals = runtime.agent_task_signals();
    let id = submit(&runtime, REQUEST).await;
    handed_over(&mut signals, AgentRole::Analyst).await;
    // Another tenant's worker sees no task, and cannot decide this one.
    let stranger = Worker {
        tenant: "other".into(),
        ..worker("w", "apikey:x")
    };
    assert!(runtime
        .claim_agent_task(AgentRole::Analyst, &stranger, Duration::from_secs(5))
        .await
        .unwrap()
        .is_none());
    let analyst = worker("analyst", "apikey:a");
    let task = claim(&runtime, AgentRole::Analyst, &analyst).await;
    let len = stream_len(&*store, id).await;
    let refused = runtime
        .submit_agent_decision(task.id, &stranger, &decision_for(&task), policy(task.role))
        .await;
    assert!(
        matches!(refused, Err(RuntimeError::Rejected(DomainError::NotFound))),
        "{refused:?}"
    );
    // A worker of the same tenant with another credential does not hold it.
    let other = worker("analyst", "apikey:b");
    let refused = runtime
        .submit_agent_decision(task.id, &other, &decision_for(&task), policy(task.role))
        .await;
    assert!(
        matches!(refused, Err(RuntimeError::TaskLost(_))),
        "{refused:?}"
    );
    let bad = [
        (
            json!({ "subtasks": [], "confidence": 0.5, "rationale": "" }),
            "/subtasks",
        ),
        (
            json!({ "subtasks": [{ "id": "a", "title": "t", "tool": "shell" }], "confidence": 0.5, "rationale": "" }),
            "/subtasks/0/tool",
        ),
        (
            json!({ "subtasks": [{ "id": "a", "title": "t", "tool": "keywords", "dependsOn": ["b"] }], "confidence": 0.5, "rationale": "" }),
            "/subtasks",
        ),
        (
            json!({ "subtasks": [{ "id": "a", "title": "t", "tool": "keywords" }], "confidence": 2, "rationale": "" }),
            "/confidence",
        ),
        (json!("approve"), ""),
    ];
    for (decision, path) in bad {
        match runtime
            .submit_agent_decision(task.id, &analyst, &decision, policy(task.role))
            .await
        {
            Err(RuntimeError::InvalidDecision(invalid)) => {
                assert_eq!(invalid.path, path, "{decision}: {invalid}")
            }
            other => panic!("{decision}: {other:?}"),
        }
    }
    let unknown = TaskId {
        workflow: Uuid::now_v7(),
        version: 1,
    };
    let refused = runtime
        .submit_agent_decision(unknown, &analyst, &decision_for(&task), policy(task.role))
        .await;
    assert!(
        matches!(refused, Err(RuntimeError::Rejected(DomainError::NotFound))),
        "{refused:?}"
    );
    assert_eq!(stream_len(&*store, id).await, len, "nothing written");
    // A role the server decides itself takes no claims.
    let builtin = Runtime::new(
        store.clone(),
        Arc::new(agentledger_agents::InMemoryWorkQueue::default()),
        ToolRegistry::default(),
        Arc::new(SystemClock),
        RuntimeConfig::default(),
    );
    let refused = builtin
        .claim_agent_task(AgentRole::Analyst, &analyst, Duration::from_secs(5))
        .await;
    assert!(
        matches!(
            refused,
            Err(RuntimeError::Rejected(DomainError::BadInput(_)))
        ),
        "{refused:?}"
    );
    running.stop().await;
}

#[tokio::test]
async fn a_cancelled_workflow_s_task_is_not_handed_to_a_worker() {
    let db = TestDatabase::create().await;
    let (store, queue) = postgres(&db).await;
    let running = Running::start(
        store.clone(),
        queue.clone(),
        ToolRegistry::default(),
        Arc::new(SystemClock),
        all_external(),
    );
    let runtime = running.runtime.clone();
    let mut signals = runtime.agent_task_signals();
    let id = submit(&runtime, REQUEST).await;
    handed_over(&mut signals, AgentRole::Analyst).await;
    runtime
        .cancel(id, Some("changed my mind".into()), &Actor::human("ops"))
        .await
        .unwrap();
    let analyst = worker("analyst", "apikey:a");
    assert!(runtime
        .claim_agent_task(AgentRole::Analyst, &analyst, Duration::from_secs(5))
        .await
        .unwrap()
        .is_none());
    assert_eq!(queue.waiting().await.unwrap(), 0, "its row is gone");
    running.stop().await;
}

/// A worker that serves `role` until `stop`: waits for a signal, claims
/// until nothing is left, decides each task.
async fn serve_role(
    runtime: Runtime,
    role: AgentRole,
    worker: Worker,
    stop: tokio_util::sync::CancellationToken,
) -> usize {
    let mut signals = runtime.agent_task_signals();
    let mut decided = 0;
    while !stop.is_cancelled() {
        while let Some(task) = runtime
            .claim_agent_task(role, &worker, Duration::from_secs(1))
            .await
            .expect("claims succeed")
        {
            match runtime
                .submit_agent_decision(task.id, &worker, &decision_for(&task), policy(role))
                .await
            {
                Ok(_) => decided += 1,
                // Its lease ran out under load and another worker decided.
                Err(RuntimeError::TaskLost(_)) => {}
                Err(e) => panic!("{role:?}: {e}"),
            }
        }
        // Leases that run out send no signal: look again now and then.
        tokio::select! {
            _ = signals.recv() => {}
            () = tokio::time::sleep(Duration::from_millis(250)) => {}
            () = stop.cancelled() => {}
        }
    }
    decided
}

/// A worker that runs the `crm_lookup` tool until `stop`; answers with a
/// record naming the input's length.
async fn serve_tool(
    runtime: Runtime,
    worker: Worker,
    stop: tokio_util::sync::CancellationToken,
) -> usize {
    use agentledger_agents::CallAnswer;
    let mut signals = runtime.tool_call_signals();
    let tools = vec!["crm_lookup".to_string()];
    let mut answered = 0;
    while !stop.is_cancelled() {
        while let Some(call) = runtime
            .claim_tool_call(&tools, &worker, Duration::from_secs(1))
            .await
            .expect("claims succeed")
        {
            let record = format!(
                "customer record, {} chars of input",
                call.input.chars().count()
            );
            match runtime
                .answer_tool_call(call.id, &worker, CallAnswer::Output(record))
                .await
            {
                Ok(_) => answered += 1,
                Err(RuntimeError::TaskLost(_)) => {}
                Err(e) => panic!("crm_lookup: {e}"),
            }
        }
        tokio::select! {
            _ = signals.recv() => {}
            () = tokio::time::sleep(Duration::from_millis(250)) => {}
            () = stop.cancelled() => {}
        }
    }
    answered
}

#[tokio::test]
async fn a_hundred_workflows_through_several_workers_per_role_one_of_them_dying() {
    let db = TestDatabase::create().await;
    let (store, queue) = postgres(&db).await;
    let running = Running::start(
        store.clone(),
        queue.clone(),
        ToolRegistry::default(),
        Arc::new(SystemClock),
        RuntimeConfig {
            external_tools: vec![crm_lookup()],
            ..all_external()
        },
    );
    let runtime = running.runtime.clone();
    // A worker that claims one gatekeeper task and dies holding it.
    let mut signals = runtime.agent_task_signals();
    let doomed = submit(&runtime, REQUEST).await;
    handed_over(&mut signals, AgentRole::Analyst).await;
    let analyst = worker("analyst-0", "apikey:a");
    let task = claim(&runtime, AgentRole::Analyst, &analyst).await;
    runtime
        .submit_agent_decision(task.id, &analyst, &decision_for(&task), policy(task.role))
        .await
        .unwrap();
    handed_over(&mut signals, AgentRole::Gatekeeper).await;
    let dying = worker("gate-dies", "apikey:g");
    let held = runtime
        .claim_agent_task(AgentRole::Gatekeeper, &dying, Duration::from_secs(1))
        .await
        .unwrap()
        .expect("the dying worker holds a task");
    assert_eq!(held.id.workflow, doomed);

    let stop = tokio_util::sync::CancellationToken::new();
    let mut workers = tokio::task::JoinSet::new();
    for (role, name) in [
        (AgentRole::Analyst, "analyst"),
        (AgentRole::Gatekeeper, "gate"),
        (AgentRole::Ethics, "ethics"),
    ] {
        for i in 1..=2 {
            let worker = worker(&format!("{name}-{i}"), &format!("apikey:{name}"));
            workers.spawn(serve_role(runtime.clone(), role, worker, stop.clone()));
        }
    }
    let mut ids = vec![doomed];
    ids.push(submit(&runtime, REQUEST).await);
    // A tool worker that claims the first call and dies holding it.
    let mut calls = runtime.tool_call_signals();
    let tool_dies = worker("crm-dies", "apikey:crm");
    let crm = vec!["crm_lookup".to_string()];
    let abandoned = loop {
        if let Some(call) = runtime
            .claim_tool_call(&crm, &tool_dies, Duration::from_secs(1))
            .await
            .unwrap()
        {
            break call;
        }
        tokio::time::timeout(Duration::from_secs(30), calls.recv())
            .await
            .expect("a call is posted")
            .unwrap();
    };
    let mut tool_workers = tokio::task::JoinSet::new();
    for i in 1..=2 {
        let worker = worker(&format!("crm-{i}"), "apikey:crm");
        tool_workers.spawn(serve_tool(runtime.clone(), worker, stop.clone()));
    }
    for _ in 0..98 {
        ids.push(submit(&runtime, REQUEST).await);
    }
    let seen = follow_until(&*store, &ids, Duration::from_secs(120), |w| {
        settled(w.state)
    })
    .await;
    stop.cancel();
    let decided: usize = workers.join_all().await.into_iter().sum();
    let answered: usize = tool_workers.join_all().await.into_iter().sum();
    // Every lookup answered by the live workers, the abandoned one too
    // (after its lease ran out, within its deadline: the same attempt).
    let lookups: Vec<_> = ids
        .iter()
        .flat_map(|id| seen[id].decoded.iter())
        .filter_map(|e| match e {
            WorkflowEvent::SubtaskSucceeded {
                subtask, attempt, ..
            } if subtask == "crm" => Some(*attempt),
            _ => None,
        })
        .collect();
    assert_eq!(lookups.len(), ids.len(), "one lookup per workflow");
    assert!(answered >= ids.len(), "{answered} answers");
    let retaken = seen[&abandoned.workflow]
        .decoded
        .iter()
        .any(|e| matches!(e, WorkflowEvent::SubtaskSucceeded { subtask, attempt: 1, .. } if subtask == "crm"));
    assert!(retaken, "the abandoned call was answered by another worker");
    let late = runtime
        .answer_tool_call(
            abandoned.id,
            &tool_dies,
            agentledger_agents::CallAnswer::Output("late".into()),
        )
        .await;
    assert!(matches!(late, Err(RuntimeError::TaskLost(_))), "{late:?}");
    for id in &ids {
        let followed = &seen[id];
        assert_eq!(followed.workflow.state, WorkflowState::Completed, "{id}");
        assert_each_decision_once(*id, followed);
    }
    // 3 decisions each, but the doomed workflow's analysis was made above.
    assert_eq!(decided, ids.len() * 3 - 1);
    let gate = seen[&doomed]
        .events
        .iter()
        .find(|e| e.event_type == "GateDecided")
        .unwrap();
    let actor = gate.metadata().unwrap().actor;
    assert_ne!(actor.name, "gate-dies", "the dead worker decided nothing");
    let late = runtime
        .submit_agent_decision(held.id, &dying, &decision_for(&held), policy(held.role))
        .await;
    assert!(matches!(late, Err(RuntimeError::TaskLost(_))), "{late:?}");
    assert_eq!(queue.waiting().await.unwrap(), 0);
    running.stop().await;
}

fn crm_lookup() -> agentledger_agents::ExternalToolSpec {
    agentledger_agents::ExternalToolSpec {
        name: "crm_lookup".into(),
        description: "Looks a customer up in the CRM".into(),
        keywords: vec!["customer".into(), "고객".into()],
        deterministic: false,
    }
}

/// Waits for this runtime's next call of `tool` (no polling).
async fn call_posted(signals: &mut tokio::sync::broadcast::Receiver<(String, String)>, tool: &str) {
    tokio::time::timeout(Duration::from_secs(30), async {
        while signals.recv().await.expect("signals stay open").1 != tool {}
    })
    .await
    .expect("a call was posted");
}

#[tokio::test]
async fn an_external_tool_is_chosen_by_sena_run_by_workers_and_retried_by_the_executor() {
    use agentledger_agents::CallAnswer;
    let db = TestDatabase::create().await;
    let (store, queue) = postgres(&db).await;
    let mut config = RuntimeConfig {
        external_tools: vec![crm_lookup()],
        ..RuntimeConfig::default()
    };
    config.gitcode.backoff_initial_ms = 10;
    let running = Running::start(
        store.clone(),
        queue,
        ToolRegistry::default(),
        Arc::new(SystemClock),
        config,
    );
    let runtime = running.runtime.clone();
    assert_eq!(runtime.external_tools(), vec!["crm_lookup"]);
    let mut signals = runtime.tool_call_signals();
    let id = submit(
        &runtime,
        "Look up the customer record of 고객 42, then count the words of it.",
    )
    .await;
    let tools = vec!["crm_lookup".to_string()];
    let (w1, w2) = (worker("crm-1", "apikey:c"), worker("crm-2", "apikey:c"));
    // A name this server does not serve externally is a bad input.
    let unknown = runtime
        .claim_tool_call(&["text_stats".to_string()], &w1, Duration::from_secs(30))
        .await;
    assert!(
        matches!(
            unknown,
            Err(RuntimeError::Rejected(DomainError::BadInput(_)))
        ),
        "{unknown:?}"
    );
    // `#` separates the key from the worker id in a lease: not in an id.
    let hashed = runtime
        .claim_tool_call(
            &tools,
            &worker("crm#1", "apikey:c"),
            Duration::from_secs(30),
        )
        .await;
    assert!(
        matches!(
            hashed,
            Err(RuntimeError::Rejected(DomainError::BadInput(_)))
        ),
        "{hashed:?}"
    );
    call_posted(&mut signals, "crm_lookup").await;
    let first = runtime
        .claim_tool_call(&tools, &w1, Duration::from_secs(30))
        .await
        .unwrap()
        .expect("the call waits");
    assert_eq!((first.workflow, first.attempt), (id, 1));
    assert_eq!(first.tool, "crm_lookup");
    assert!(first.input.contains("고객 42"), "{}", first.input);
    // Held: nobody else gets it; another tenant's worker never sees it.
    assert!(runtime
        .claim_tool_call(&tools, &w2, Duration::from_secs(30))
        .await
        .unwrap()
        .is_none());
    // PostgreSQL's text cannot hold NUL: a bad input, nothing stored.
    let nul = runtime
        .answer_tool_call(first.id, &w1, CallAnswer::Output("a\0b".into()))
        .await;
    assert!(
        matches!(nul, Err(RuntimeError::Rejected(DomainError::BadInput(_)))),
        "{nul:?}"
    );
    // An error: the executor records it and posts the next attempt.
    runtime
        .answer_tool_call(first.id, &w1, CallAnswer::Error("the CRM is down".into()))
        .await
        .expect("answered");
    call_posted(&mut signals, "crm_lookup").await;
    let mut stranger = worker("crm-9", "apikey:x");
    stranger.tenant = "other".into();
    assert!(runtime
        .claim_tool_call(&tools, &stranger, Duration::from_secs(30))
        .await
        .unwrap()
        .is_none());
    let second = runtime
        .claim_tool_call(&tools, &w2, Duration::from_secs(30))
        .await
        .unwrap()
        .expect("the retry waits");
    assert_eq!((second.workflow, second.attempt), (id, 2));
    assert_ne!(second.id, first.id);
    // The first worker cannot answer the second attempt, nor differently
    // the first one; the same answer again is accepted.
    let stolen = runtime
        .answer_tool_call(second.id, &w1, CallAnswer::Output("mine".into()))
        .await;
    assert!(
        matches!(stolen, Err(RuntimeError::TaskLost(_))),
        "{stolen:?}"
    );
    let changed = runtime
        .answer_tool_call(first.id, &w1, CallAnswer::Output("fine after all".into()))
        .await;
    assert!(
        matches!(changed, Err(RuntimeError::TaskLost(_))),
        "{changed:?}"
    );
    runtime
        .answer_tool_call(first.id, &w1, CallAnswer::Error("the CRM is down".into()))
        .await
        .expect("the same answer again");
    let record = "고객 42: 김민수, Seoul, since 2019";
    runtime
        .answer_tool_call(second.id, &w2, CallAnswer::Output(record.into()))
        .await
        .expect("answered");

    let seen = settle(&*store, &[id]).await;
    let followed = &seen[&id];
    assert_eq!(followed.workflow.state, WorkflowState::Completed);
    assert_each_decision_once(id, followed);
    let crm = followed.workflow.subtask("st-1").unwrap();
    assert_eq!(crm.plan.as_ref().unwrap().tool, "crm_lookup");
    assert!(followed.decoded.iter().any(|e| matches!(
        e,
        WorkflowEvent::SubtaskFailed { subtask, attempt: 1, error, will_retry: true, .. }
            if subtask == "st-1" && error.as_str() == "the CRM is down"
    )));
    assert!(followed.decoded.iter().any(|e| matches!(
        e,
        WorkflowEvent::SubtaskSucceeded { subtask, attempt: 2, output, .. }
            if subtask == "st-1" && output.as_str() == record
    )));
    // The next subtask read the worker's output.
    let stats = followed.workflow.subtask("st-2").unwrap();
    assert_eq!(stats.plan.as_ref().unwrap().tool, "text_stats");
    assert!(followed.decoded.iter().any(|e| matches!(
        e,
        WorkflowEvent::SubtaskSucceeded { subtask, .. } if subtask == "st-2"
    )));
    running.stop().await;
}

#[tokio::test]
async fn a_call_nobody_answers_times_out_and_a_late_answer_is_refused() {
    use agentledger_agents::CallAnswer;
    let db = TestDatabase::create().await;
    let (store, queue) = postgres(&db).await;
    let clock = ManualClock::new(chrono::Utc::now());
    let mut config = RuntimeConfig {
        external_tools: vec![crm_lookup()],
        ..RuntimeConfig::default()
    };
    config.gitcode.attempt_timeout_ms = 5_000;
    // The retry starts at once: the manual clock moves only once, below.
    config.gitcode.backoff_initial_ms = 0;
    let running = Running::start(
        store.clone(),
        queue.clone(),
        ToolRegistry::default(),
        Arc::new(clock.clone()),
        config,
    );
    let runtime = running.runtime.clone();
    let mut signals = runtime.tool_call_signals();
    let id = submit(&runtime, "Find the customer 7 in the CRM.").await;
    call_posted(&mut signals, "crm_lookup").await;
    let tools = vec!["crm_lookup".to_string()];
    let slow = worker("slow", "apikey:s");
    let call = runtime
        .claim_tool_call(&tools, &slow, Duration::from_secs(60))
        .await
        .unwrap()
        .expect("the call waits");
    let before = stream_len(&*store, id).await;
    // Past the deadline: the executor records a timeout and retries.
    clock.advance(Duration::from_secs(6));
    call_posted(&mut signals, "crm_lookup").await;
    let late = runtime
        .answer_tool_call(call.id, &slow, CallAnswer::Output("too late".into()))
        .await;
    assert!(matches!(late, Err(RuntimeError::TaskLost(_))), "{late:?}");
    assert!(
        queue.call(call.id).await.unwrap().is_none(),
        "the timed-out call is gone"
    );
    let history = runtime.load(id).await.unwrap().unwrap();
    assert!(history.events.len() > before);
    assert!(history.events.iter().any(|r| matches!(
        &r.event,
        WorkflowEvent::SubtaskFailed {
            attempt: 1,
            kind: agentledger_domain::workflow::FailureKind::Timeout,
            will_retry: true,
            ..
        }
    )));
    let retry = runtime
        .claim_tool_call(&tools, &slow, Duration::from_secs(60))
        .await
        .unwrap()
        .expect("the second attempt waits");
    assert_eq!(retry.attempt, 2);
    runtime
        .answer_tool_call(retry.id, &slow, CallAnswer::Output("고객 7".into()))
        .await
        .unwrap();
    let seen = settle(&*store, &[id]).await;
    assert_eq!(seen[&id].workflow.state, WorkflowState::Completed);
    running.stop().await;
}
