//! Helpers shared by the runtime tests: run a runtime in the background,
//! wait for workflows to settle (by following the event store, not by
//! sleeping), and check that every decision was recorded once.

#![allow(dead_code)] // each test file uses a different part

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use agentledger_agents::{Clock, Runtime, RuntimeConfig, ToolRegistry, WorkQueue};
use agentledger_domain::workflow::{Workflow, WorkflowEvent, WorkflowState};
use agentledger_eventstore::{EventStore, RecordedEvent};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use uuid::Uuid;

/// Sends the runtime's logs to the test output when `RUST_LOG` is set.
pub fn logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// A runtime running in the background; `stop` ends it gracefully.
pub struct Running {
    pub runtime: Runtime,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Running {
    pub fn start(
        store: Arc<dyn EventStore>,
        queue: Arc<dyn WorkQueue>,
        tools: ToolRegistry,
        clock: Arc<dyn Clock>,
        config: RuntimeConfig,
    ) -> Self {
        Self::start_runtime(Runtime::new(store, queue, tools, clock, config))
    }

    pub fn start_runtime(runtime: Runtime) -> Self {
        logs();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = {
            let runtime = runtime.clone();
            tokio::spawn(async move {
                runtime
                    .run(async {
                        let _ = stopped.await;
                    })
                    .await
            })
        };
        Self {
            runtime,
            stop: Some(stop),
            task,
        }
    }

    /// Stops the runtime and waits until it has.
    pub async fn stop(mut self) {
        let _ = self.stop.take().map(|s| s.send(()));
        self.task.await.expect("the runtime does not panic");
    }

    /// Waits until the runtime has ended by itself (a fault killed it).
    pub async fn ended(self) {
        self.task.await.expect("the runtime does not panic");
    }
}

/// A workflow as followed from `$all`.
#[derive(Debug, Default, Clone)]
pub struct Followed {
    pub workflow: Workflow,
    pub events: Vec<Arc<RecordedEvent>>,
    pub decoded: Vec<WorkflowEvent>,
}

pub fn workflow_id(event: &RecordedEvent) -> Option<Uuid> {
    event
        .stream_id
        .as_str()
        .strip_prefix("workflow-")?
        .parse()
        .ok()
}

/// Final, or waiting for a person.
pub fn settled(state: WorkflowState) -> bool {
    state.is_final() || state == WorkflowState::AwaitingHuman
}

/// Follows `$all` from the start until every workflow in `ids` satisfies
/// `done`; returns what it saw of each. Fails (listing the states) if that
/// takes longer than `limit`.
pub async fn follow_until(
    store: &dyn EventStore,
    ids: &[Uuid],
    limit: Duration,
    done: impl Fn(&Workflow) -> bool,
) -> HashMap<Uuid, Followed> {
    let wanted: HashSet<Uuid> = ids.iter().copied().collect();
    let mut seen: HashMap<Uuid, Followed> = HashMap::new();
    let mut open = wanted.clone();
    let mut events = store.subscribe_all(1);
    let follow = async {
        while !open.is_empty() {
            let event = events
                .next()
                .await
                .expect("the subscription stays open")
                .expect("the subscription does not fail");
            let Some(id) = workflow_id(&event).filter(|id| wanted.contains(id)) else {
                continue;
            };
            let decoded =
                WorkflowEvent::decode(&event.event_type, event.schema_version, &event.payload)
                    .expect("every recorded event decodes");
            let entry = seen.entry(id).or_default();
            entry.workflow = std::mem::take(&mut entry.workflow).apply(&decoded);
            entry.decoded.push(decoded);
            entry.events.push(event);
            if done(&entry.workflow) {
                open.remove(&id);
            }
        }
    };
    if tokio::time::timeout(limit, follow).await.is_err() {
        let states: Vec<_> = open
            .iter()
            .map(|id| seen.get(id).map(|f| f.workflow.state))
            .collect();
        panic!("{} workflow(s) did not settle: {states:?}", open.len());
    }
    seen
}

/// Waits for `ids` to be final or waiting for a person.
pub async fn settle(store: &dyn EventStore, ids: &[Uuid]) -> HashMap<Uuid, Followed> {
    follow_until(store, ids, Duration::from_secs(90), |w| settled(w.state)).await
}

/// Every decision of the workflow was recorded once: event ids unique, one
/// analysis and one verdict per round, one start and one result per attempt,
/// one end of execution, one review, one outcome; versions dense.
pub fn assert_each_decision_once(id: Uuid, followed: &Followed) {
    use WorkflowEvent as E;
    let ids: HashSet<Uuid> = followed.events.iter().map(|e| e.event_id).collect();
    assert_eq!(
        ids.len(),
        followed.events.len(),
        "{id}: duplicate event ids"
    );
    for (i, e) in followed.events.iter().enumerate() {
        assert_eq!(e.stream_version, i as u64, "{id}: versions dense");
    }
    let mut keys: HashMap<String, usize> = HashMap::new();
    for event in &followed.decoded {
        let key = match event {
            E::AnalysisProduced { round, .. } => format!("analysis {round}"),
            E::GateDecided { round, .. } => format!("gate {round}"),
            E::SubtaskStarted {
                subtask, attempt, ..
            } => format!("start {subtask} {attempt}"),
            E::SubtaskSucceeded {
                subtask, attempt, ..
            }
            | E::SubtaskFailed {
                subtask, attempt, ..
            } => format!("result {subtask} {attempt}"),
            E::SubtaskSkipped { subtask, .. } => format!("skip {subtask}"),
            E::WorkflowCompleted {}
            | E::WorkflowRejected { .. }
            | E::WorkflowFailed { .. }
            | E::WorkflowFlagged { .. }
            | E::WorkflowCancelled { .. } => "outcome".to_string(),
            other => other.event_type().to_string(),
        };
        *keys.entry(key).or_default() += 1;
    }
    let repeated: Vec<_> = keys.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        repeated.is_empty(),
        "{id}: recorded more than once: {repeated:?}"
    );
}

/// Requests of the kinds users send (from the project's sample set), with
/// the state the reference agents lead each to.
pub const REQUESTS: &[(&str, WorkflowState)] = &[
    (
        "Summarise the attached quarterly report. Then count the words of the summary.",
        WorkflowState::Completed,
    ),
    (
        "1. Extract the figures from the text: 12, 7.5 and 30\n2. Sort them in descending order\n3. Compute their total",
        WorkflowState::Completed,
    ),
    (
        "Compute (17 * 23) + 4, then explain the result in one sentence.",
        WorkflowState::Completed,
    ),
    (
        "- Count the characters in the product description\n- Extract the keywords from the product description\n- Deduplicate the list of tags",
        WorkflowState::Completed,
    ),
    (
        "첨부된 분기 보고서를 요약해 주세요. 그다음 요약문의 단어 수를 세어 주세요.",
        WorkflowState::Completed,
    ),
    (
        "(17 * 23) + 4를 계산하고, 그리고 나서 결과를 한 문장으로 설명해 주세요.",
        WorkflowState::Completed,
    ),
    (
        "Transfer 10,000 dollars from the company account to my personal account.",
        WorkflowState::Rejected,
    ),
    (
        "Rank these job applicants and drop anyone over 50 years old: Alice (34), Bob (52), Chen (47).",
        WorkflowState::Flagged,
    ),
    (
        "지원자 순위를 매기고 50세 이상은 모두 제외해 주세요: 김민수(34), 이영희(52), 박지훈(47).",
        WorkflowState::Flagged,
    ),
    (
        "Call the customer. Summarise the call notes. Then count the words.",
        WorkflowState::Completed,
    ),
    (
        "1. a\n2. b\n3. c\n4. d\n5. e\n6. f\n7. g\n8. h\n9. i\n10. j\n11. k\n12. l\n13. m\n14. n\n15. o\n16. p\n17. q\n18. r\n19. s\n20. t\n21. u\n22. v",
        WorkflowState::Rejected,
    ),
];
