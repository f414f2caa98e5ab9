//! The runtime on real PostgreSQL: many workflows at once, two runtimes on
//! one database, a runtime that dies mid-execution, retries.

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use agentledger_agents::{
    Clock, FaultPlan, FaultPoint, ManualClock, PostgresWorkQueue, Runtime, RuntimeConfig,
    Submission, SystemClock, Tool, ToolCall, ToolFailure, ToolRegistry, WorkQueue,
};
use agentledger_domain::policy::gitcode::GitCodeConfig;
use agentledger_domain::tools::ToolSpec;
use agentledger_domain::workflow::{FailureKind, WorkflowEvent, WorkflowState};
use agentledger_eventstore::testing::TestDatabase;
use agentledger_eventstore::{EventStore, RecordedEvent};
use async_trait::async_trait;
use common::*;
use uuid::Uuid;

/// Three built-in tools in a chain (as `bench workflows` runs).
const THREE_STEPS: &str =
    "1. Extract the figures from the text: 12, 7.5 and 30\n2. Sort them in descending order\n3. Compute their total";

async fn postgres(db: &TestDatabase) -> (Arc<dyn EventStore>, Arc<dyn WorkQueue>) {
    let store = db.store().await;
    let queue = Arc::new(PostgresWorkQueue::new(store.pool().clone()));
    (Arc::new(store) as Arc<dyn EventStore>, queue)
}

/// Submits `count` sample requests at once through `runtimes` in turn.
async fn submit_concurrently(runtimes: &[Runtime], count: usize) -> Vec<(Uuid, WorkflowState)> {
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..count {
        let runtime = runtimes[i % runtimes.len()].clone();
        let (request, expected) = REQUESTS[i % REQUESTS.len()];
        tasks.spawn(async move {
            let id = runtime
                .submit(Submission {
                    request: request.into(),
                    ..Default::default()
                })
                .await
                .expect("submitted");
            (id, expected)
        });
    }
    tasks.join_all().await
}

fn assert_all_as_expected(
    submitted: &[(Uuid, WorkflowState)],
    seen: &std::collections::HashMap<Uuid, Followed>,
) {
    for (id, expected) in submitted {
        let followed = &seen[id];
        assert_eq!(followed.workflow.state, *expected, "{id}");
        assert_each_decision_once(*id, followed);
    }
}

#[tokio::test]
async fn two_hundred_concurrent_workflows_each_reach_their_final_state_once() {
    let db = TestDatabase::create().await;
    let (store, queue) = postgres(&db).await;
    let running = Running::start(
        store.clone(),
        queue.clone(),
        ToolRegistry::default(),
        Arc::new(SystemClock),
        RuntimeConfig::default(),
    );
    let submitted = submit_concurrently(std::slice::from_ref(&running.runtime), 200).await;
    let ids: Vec<Uuid> = submitted.iter().map(|(id, _)| *id).collect();
    let seen = settle(&*store, &ids).await;
    assert_all_as_expected(&submitted, &seen);
    running.stop().await;
    assert_eq!(
        queue.waiting().await.unwrap(),
        0,
        "settled workflows leave the queue"
    );
}

#[tokio::test]
async fn two_runtimes_on_one_database_record_each_decision_once() {
    let db = TestDatabase::create().await;
    // Two stores: separate pools, writers and tailers, as two processes have.
    let mut runtimes = Vec::new();
    let mut stores = Vec::new();
    for name in ["node-a", "node-b"] {
        let (store, queue) = postgres(&db).await;
        stores.push(store.clone());
        runtimes.push(Running::start(
            store,
            queue,
            ToolRegistry::default(),
            Arc::new(SystemClock),
            RuntimeConfig {
                owner: name.into(),
                // Small claims, so that both nodes get work.
                claim_batch: 4,
                ..RuntimeConfig::default()
            },
        ));
    }
    let handles: Vec<Runtime> = runtimes.iter().map(|r| r.runtime.clone()).collect();
    let submitted = submit_concurrently(&handles, 200).await;
    let ids: Vec<Uuid> = submitted.iter().map(|(id, _)| *id).collect();
    let seen = settle(&*stores[0], &ids).await;
    assert_all_as_expected(&submitted, &seen);
    for running in runtimes {
        running.stop().await;
    }
}

/// A tool whose start is recorded before it runs (every tool but the pure
/// built-ins, or all with `record_every_start`): a runtime that dies after
/// recording the start leaves an attempt that the next owner abandons.
#[tokio::test]
async fn a_runtime_killed_mid_execution_leaves_its_workflow_to_another() {
    let db = TestDatabase::create().await;
    let clock = ManualClock::new(chrono::Utc::now());
    let config = |owner: &str| RuntimeConfig {
        owner: owner.into(),
        gitcode: GitCodeConfig {
            backoff_initial_ms: 0,
            inline_pure_tools: false,
            ..GitCodeConfig::default()
        },
        ..RuntimeConfig::default()
    };
    let (store, queue) = postgres(&db).await;
    let doomed = Running::start_runtime(Runtime::with_faults(
        store.clone(),
        queue.clone(),
        ToolRegistry::default(),
        Arc::new(clock.clone()),
        config("doomed"),
        Some(FaultPlan::at(FaultPoint::AfterSubtaskStarted, 1)),
    ));
    let id = doomed
        .runtime
        .submit(Submission {
            request: "Count the words of this sentence.".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let runtime = doomed.runtime.clone();
    doomed.ended().await;
    assert!(runtime.is_dead());
    let history = runtime.load(id).await.unwrap().unwrap();
    assert_eq!(
        history.workflow.state,
        WorkflowState::Executing,
        "died with the subtask running"
    );

    // The survivor finds the row leased; once the lease has run out on the
    // clock, it claims the workflow and finishes it.
    let survivor = Running::start(
        store.clone(),
        queue.clone(),
        ToolRegistry::default(),
        Arc::new(clock.clone()),
        config("survivor"),
    );
    clock.sleepers_at_least(3).await; // its poll wait, its lease renewal and its sweep
    clock.advance(RuntimeConfig::default().lease + Duration::from_secs(1));
    let seen = follow_until(&*store, &[id], Duration::from_secs(60), |w| {
        w.state.is_final()
    })
    .await;
    let followed = &seen[&id];
    assert_eq!(followed.workflow.state, WorkflowState::Completed);
    let attempts: Vec<_> = followed
        .decoded
        .iter()
        .filter_map(|e| match e {
            WorkflowEvent::SubtaskStarted { attempt, .. } => Some(format!("start {attempt}")),
            WorkflowEvent::SubtaskFailed { attempt, kind, .. } => {
                Some(format!("{kind:?} {attempt}"))
            }
            WorkflowEvent::SubtaskSucceeded { attempt, .. } => Some(format!("ok {attempt}")),
            _ => None,
        })
        .collect();
    assert_eq!(attempts, ["start 1", "Abandoned 1", "start 2", "ok 2"]);
    assert_each_decision_once(id, followed);
    survivor.stop().await;
    assert_eq!(queue.waiting().await.unwrap(), 0);
}

/// Pure tools run before anything of the execution is recorded: a runtime
/// that dies with their results in hand has recorded nothing of them, and
/// the next owner runs them again, each start and result recorded once.
#[tokio::test]
async fn a_runtime_killed_before_recording_pure_tool_results_leaves_nothing_half_done() {
    let db = TestDatabase::create().await;
    let clock = ManualClock::new(chrono::Utc::now());
    let config = |owner: &str| RuntimeConfig {
        owner: owner.into(),
        ..RuntimeConfig::default()
    };
    let (store, queue) = postgres(&db).await;
    let doomed = Running::start_runtime(Runtime::with_faults(
        store.clone(),
        queue.clone(),
        ToolRegistry::default(),
        Arc::new(clock.clone()),
        config("doomed"),
        Some(FaultPlan::at(FaultPoint::BeforeSubtaskResult, 1)),
    ));
    let id = doomed
        .runtime
        .submit(Submission {
            request: THREE_STEPS.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let runtime = doomed.runtime.clone();
    doomed.ended().await;
    assert!(runtime.is_dead());
    let history = runtime.load(id).await.unwrap().unwrap();
    assert_eq!(history.workflow.state, WorkflowState::Executing);
    assert!(
        !history
            .events
            .iter()
            .any(|r| matches!(r.event, WorkflowEvent::SubtaskStarted { .. })),
        "nothing of the execution was recorded"
    );

    let survivor = Running::start(
        store.clone(),
        queue.clone(),
        ToolRegistry::default(),
        Arc::new(clock.clone()),
        config("survivor"),
    );
    clock.sleepers_at_least(3).await;
    clock.advance(RuntimeConfig::default().lease + Duration::from_secs(1));
    let seen = follow_until(&*store, &[id], Duration::from_secs(60), |w| {
        w.state.is_final()
    })
    .await;
    let followed = &seen[&id];
    assert_eq!(followed.workflow.state, WorkflowState::Completed);
    let attempts: Vec<_> = followed
        .decoded
        .iter()
        .filter_map(|e| match e {
            WorkflowEvent::SubtaskStarted {
                subtask, attempt, ..
            } => Some(format!("start {subtask} {attempt}")),
            WorkflowEvent::SubtaskSucceeded {
                subtask, attempt, ..
            } => Some(format!("ok {subtask} {attempt}")),
            WorkflowEvent::SubtaskFailed { .. } => Some("failed".into()),
            _ => None,
        })
        .collect();
    assert_eq!(
        attempts,
        [
            "start st-1 1",
            "ok st-1 1",
            "start st-2 1",
            "ok st-2 1",
            "start st-3 1",
            "ok st-3 1"
        ]
    );
    assert_each_decision_once(id, followed);
    survivor.stop().await;
}

/// A chain of subtasks on pure tools costs the executor one append: every
/// start, result and the end of execution share one transaction's
/// positions, one causation (the approval) and one recorded time.
#[tokio::test]
async fn a_chain_of_pure_tools_is_recorded_in_one_append() {
    let db = TestDatabase::create().await;
    let (store, queue) = postgres(&db).await;
    let running = Running::start(
        store.clone(),
        queue.clone(),
        ToolRegistry::default(),
        Arc::new(SystemClock),
        RuntimeConfig::default(),
    );
    let id = running
        .runtime
        .submit(Submission {
            request: THREE_STEPS.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let seen = follow_until(&*store, &[id], Duration::from_secs(60), |w| {
        w.state.is_final()
    })
    .await;
    let followed = &seen[&id];
    assert_eq!(followed.workflow.state, WorkflowState::Completed);
    let execution: Vec<&RecordedEvent> = followed
        .events
        .iter()
        .map(|e| &**e)
        .filter(|e| e.metadata().unwrap().actor.name == "gitcode")
        .collect();
    let types: Vec<&str> = execution.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(
        types,
        [
            "SubtaskStarted",
            "SubtaskSucceeded",
            "SubtaskStarted",
            "SubtaskSucceeded",
            "SubtaskStarted",
            "SubtaskSucceeded",
            "ExecutionFinished"
        ]
    );
    let first = execution[0];
    for (i, event) in execution.iter().enumerate() {
        assert_eq!(event.global_position, first.global_position + i as u64);
        assert_eq!(event.recorded_at, first.recorded_at, "one append");
        assert_eq!(
            event.metadata().unwrap().causation_id,
            first.metadata().unwrap().causation_id
        );
    }
    let approval = followed
        .events
        .iter()
        .find(|e| e.event_type == "GateDecided")
        .unwrap();
    assert_eq!(
        first.metadata().unwrap().causation_id,
        Some(approval.event_id),
        "the execution answers the approval"
    );
    running.stop().await;
}

/// Fails its first `failures` attempts, then succeeds.
struct Flaky {
    failures: u8,
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
        if call.attempt <= self.failures {
            Err(ToolFailure::Error(format!(
                "attempt {} failed",
                call.attempt
            )))
        } else {
            Ok("fine".into())
        }
    }
}

#[tokio::test]
async fn retries_are_recorded_attempt_by_attempt_on_postgres() {
    let db = TestDatabase::create().await;
    let (store, queue) = postgres(&db).await;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let config = RuntimeConfig {
        gitcode: GitCodeConfig {
            backoff_initial_ms: 1,
            ..GitCodeConfig::default()
        },
        ..RuntimeConfig::default()
    };
    let mut outcomes = Vec::new();
    for (failures, expected) in [(2, WorkflowState::Completed), (3, WorkflowState::Failed)] {
        let flaky = Arc::new(Flaky {
            failures,
            calls: AtomicU32::new(0),
        });
        let tools = ToolRegistry::default().register(SharedTool(flaky.clone()));
        let running = Running::start(
            store.clone(),
            queue.clone(),
            tools,
            clock.clone(),
            config.clone(),
        );
        let id = running
            .runtime
            .submit(Submission {
                request: "Run the flaky step. Then count the words.".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        let seen = settle(&*store, &[id]).await;
        running.stop().await;
        assert_eq!(seen[&id].workflow.state, expected);
        assert_eq!(
            flaky.calls.load(Ordering::SeqCst),
            3,
            "three attempts, each run once"
        );
        outcomes.push(seen[&id].decoded.clone());
    }
    let failed = &outcomes[1];
    assert!(failed.iter().any(|e| matches!(
        e,
        WorkflowEvent::SubtaskFailed {
            attempt: 3,
            will_retry: false,
            kind: FailureKind::Error,
            ..
        }
    )));
    assert!(failed
        .iter()
        .any(|e| matches!(e, WorkflowEvent::SubtaskSkipped { subtask, .. } if subtask == "st-2")));
}

/// A tool shared with the test, so that it can count calls.
struct SharedTool<T>(Arc<T>);

#[async_trait]
impl<T: Tool> Tool for SharedTool<T> {
    fn spec(&self) -> ToolSpec {
        self.0.spec()
    }

    async fn run(&self, call: ToolCall) -> Result<String, ToolFailure> {
        self.0.run(call).await
    }

    async fn intent(
        &self,
        instruction: &str,
        input: &str,
    ) -> Option<Result<agentledger_agents::CallPlan, ToolFailure>> {
        self.0.intent(instruction, input).await
    }
}

/// Answers with `bytes` bytes of Korean text (three bytes a character).
struct Verbose {
    bytes: usize,
    calls: AtomicU32,
}

#[async_trait]
impl Tool for Verbose {
    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: "verbose",
            description: "talks at length",
            keywords: &["verbose"],
        }
    }

    async fn run(&self, _call: ToolCall) -> Result<String, ToolFailure> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Ok("가".repeat(self.bytes / 3))
    }
}

#[tokio::test]
async fn a_tool_output_over_the_cap_fails_its_subtask_once_and_the_workflow_ends() {
    let db = TestDatabase::create().await;
    let (store, queue) = postgres(&db).await;
    let cap = 60_000;
    let config = RuntimeConfig {
        gitcode: GitCodeConfig {
            max_output_bytes: cap,
            ..GitCodeConfig::default()
        },
        ..RuntimeConfig::default()
    };
    let mut ended = Vec::new();
    for bytes in [cap, cap + 3] {
        let verbose = Arc::new(Verbose {
            bytes,
            calls: AtomicU32::new(0),
        });
        let running = Running::start(
            store.clone(),
            queue.clone(),
            ToolRegistry::default().register(SharedTool(verbose.clone())),
            Arc::new(SystemClock),
            config.clone(),
        );
        let id = running
            .runtime
            .submit(Submission {
                request: "Run the verbose step.".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        let seen = settle(&*store, &[id]).await;
        running.stop().await;
        ended.push((
            seen[&id].workflow.state,
            verbose.calls.load(Ordering::SeqCst),
            seen[&id].decoded.clone(),
        ));
    }
    // Exactly at the cap: recorded whole.
    assert_eq!(ended[0].0, WorkflowState::Completed);
    assert!(ended[0].2.iter().any(|e| matches!(
        e,
        WorkflowEvent::SubtaskSucceeded { output, .. } if output.as_str().len() == cap
    )));
    // Over it: one attempt, failed as invalid with the reason, nothing stored.
    assert_eq!(ended[1].0, WorkflowState::Failed);
    assert_eq!(ended[1].1, 1, "no retry of an output that cannot be stored");
    assert!(ended[1].2.iter().any(|e| matches!(
        e,
        WorkflowEvent::SubtaskFailed { kind: FailureKind::Invalid, will_retry: false, error, .. }
            if error.as_str().contains("over the cap")
    )));
    assert!(!ended[1]
        .2
        .iter()
        .any(|e| matches!(e, WorkflowEvent::SubtaskSucceeded { .. })));
}

/// Panics once (a bug in a tool), then works: in `run`, or, with
/// `in_intent`, while the executor asks it what it will call (which runs in
/// the drive itself).
struct PanicsOnce {
    in_intent: bool,
    panicked: AtomicU32,
    runs: AtomicU32,
}

impl PanicsOnce {
    fn new(in_intent: bool) -> Arc<Self> {
        Arc::new(Self {
            in_intent,
            panicked: AtomicU32::new(0),
            runs: AtomicU32::new(0),
        })
    }

    fn first_time(&self) -> bool {
        self.panicked.fetch_add(1, Ordering::SeqCst) == 0
    }
}

#[async_trait]
impl Tool for PanicsOnce {
    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: "fragile",
            description: "panics once",
            keywords: &["fragile"],
        }
    }

    async fn intent(
        &self,
        _instruction: &str,
        _input: &str,
    ) -> Option<Result<agentledger_agents::CallPlan, ToolFailure>> {
        if self.in_intent && self.first_time() {
            panic!("the fragile tool broke while planning");
        }
        None
    }

    async fn run(&self, _call: ToolCall) -> Result<String, ToolFailure> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        if !self.in_intent && self.first_time() {
            panic!("the fragile tool broke");
        }
        Ok("mended".into())
    }
}

/// Runs one workflow through `tool` on PostgreSQL; what was recorded, how
/// long it took to settle, and the runtime's health.
async fn through_fragile(
    tool: Arc<PanicsOnce>,
) -> (
    Followed,
    Duration,
    Vec<(String, agentledger_eventstore::health::TaskHealth)>,
) {
    let db = TestDatabase::create().await;
    let (store, queue) = postgres(&db).await;
    let config = RuntimeConfig {
        gitcode: GitCodeConfig {
            backoff_initial_ms: 1,
            ..GitCodeConfig::default()
        },
        ..RuntimeConfig::default()
    };
    let health = config.health.clone();
    let running = Running::start(
        store.clone(),
        queue,
        ToolRegistry::default().register(SharedTool(tool)),
        Arc::new(SystemClock),
        config,
    );
    let started = std::time::Instant::now();
    let id = running
        .runtime
        .submit(Submission {
            request: "Run the fragile step. Then count the words.".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut seen = settle(&*store, &[id]).await;
    let took = started.elapsed();
    running.stop().await;
    (seen.remove(&id).unwrap(), took, health.snapshot())
}

fn restarts(health: &[(String, agentledger_eventstore::health::TaskHealth)], task: &str) -> u64 {
    health
        .iter()
        .find(|(t, _)| t == task)
        .unwrap_or_else(|| panic!("{task} is not reported: {health:?}"))
        .1
        .restarts
}

#[tokio::test]
async fn a_tool_that_panics_fails_its_attempt_only_and_is_counted() {
    let tool = PanicsOnce::new(false);
    let (followed, took, health) = through_fragile(tool.clone()).await;
    assert_eq!(followed.workflow.state, WorkflowState::Completed);
    assert_eq!(tool.runs.load(Ordering::SeqCst), 2, "retried once");
    let failures: Vec<String> = followed
        .events
        .iter()
        .filter(|e| e.event_type == "SubtaskFailed")
        .map(|e| e.payload.to_string())
        .collect();
    assert_eq!(failures.len(), 1);
    assert!(
        failures[0].contains("the tool panicked: the fragile tool broke"),
        "{failures:?}"
    );
    assert_eq!(restarts(&health, "tools"), 1);
    assert_eq!(restarts(&health, "agents"), 0, "the drive went on");
    assert!(took < Duration::from_secs(10), "{took:?}");
}

#[tokio::test]
async fn a_drive_that_panics_is_counted_and_its_workflow_driven_again() {
    let tool = PanicsOnce::new(true);
    let (followed, took, health) = through_fragile(tool.clone()).await;
    // Not stuck under a lease renewed for ever: handed back after a second
    // (well before the 30 s lease would have run out), driven again from
    // its history, and completed.
    assert_eq!(followed.workflow.state, WorkflowState::Completed);
    assert_eq!(restarts(&health, "agents"), 1);
    assert_eq!(tool.runs.load(Ordering::SeqCst), 1);
    assert!(took < Duration::from_secs(10), "{took:?}");
}
