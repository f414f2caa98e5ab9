//! Helpers for the read model tests: run workflows through the real agent
//! runtime and wait for them by following the store.

#![allow(dead_code)] // each test file uses a different part

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use agentledger_agents::{
    InMemoryWorkQueue, PostgresWorkQueue, Runtime, RuntimeConfig, Submission, SystemClock,
    ToolRegistry, WorkQueue,
};
use agentledger_eventstore::{EventStore, PostgresEventStore};
use tokio::sync::oneshot;
use uuid::Uuid;

/// Requests that end without a person: completed, rejected, revised then
/// completed, flagged, in English and Korean.
pub const REQUESTS: &[&str] = &[
    "Summarise the attached quarterly report. Then count the words of the summary.",
    "1. Extract the figures from the text: 12, 7.5 and 30\n2. Sort them in descending order\n3. Compute their total",
    "Compute (17 * 23) + 4, then explain the result in one sentence.",
    "첨부된 분기 보고서를 요약해 주세요. 그다음 요약문의 단어 수를 세어 주세요.",
    "Transfer 10,000 dollars from the company account to my personal account.",
    "Call the customer. Summarise the call notes. Then count the words.",
    "지원자 순위를 매기고 50세 이상은 모두 제외해 주세요: 김민수(34), 이영희(52), 박지훈(47).",
];

/// Sends logs to the test output when `RUST_LOG` is set.
pub fn logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// An agent runtime running in the background.
pub struct Agents {
    pub runtime: Runtime,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Agents {
    pub fn start(store: Arc<dyn EventStore>, queue: Arc<dyn WorkQueue>) -> Self {
        logs();
        let runtime = Runtime::new(
            store,
            queue,
            ToolRegistry::default(),
            Arc::new(SystemClock),
            RuntimeConfig::default(),
        );
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
            stop,
            task,
        }
    }

    pub fn in_memory(store: Arc<dyn EventStore>) -> Self {
        Self::start(store, Arc::new(InMemoryWorkQueue::default()))
    }

    pub fn postgres(store: &PostgresEventStore) -> Self {
        Self::start(
            Arc::new(store.clone()),
            Arc::new(PostgresWorkQueue::new(store.pool().clone())),
        )
    }

    /// Submits `count` requests (cycling through [`REQUESTS`]) and waits until
    /// every one has ended.
    pub async fn run_workflows(&self, count: usize) -> Vec<Uuid> {
        let store = self.runtime.store().clone();
        let from = store.head_position().await.unwrap() + 1;
        let mut events = store.subscribe_all(from);
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..count {
            let runtime = self.runtime.clone();
            tasks.spawn(async move {
                runtime
                    .submit(Submission {
                        request: REQUESTS[i % REQUESTS.len()].into(),
                        ..Default::default()
                    })
                    .await
                    .expect("submitted")
            });
        }
        let ids: Vec<Uuid> = tasks.join_all().await;
        let mut open: HashSet<String> = ids.iter().map(|id| format!("workflow-{id}")).collect();
        let wait = async {
            while !open.is_empty() {
                let event = events.next().await.expect("open").expect("no error");
                let outcome = matches!(
                    event.event_type.as_str(),
                    "WorkflowCompleted" | "WorkflowRejected" | "WorkflowFailed" | "WorkflowFlagged"
                );
                if outcome {
                    open.remove(event.stream_id.as_str());
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(90), wait)
            .await
            .expect("every workflow ends");
        ids
    }

    pub async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.expect("the runtime does not panic");
    }
}
