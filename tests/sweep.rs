//! End-to-end: a workflow that waits for an agent but has lost its queue
//! row (an enqueue that failed after its append committed, a row deleted by
//! hand) is found by `serve`'s sweep and finished; an escalated workflow,
//! which rightly has no row, is left to its person.

mod common;

use std::sync::Arc;
use std::time::Duration;

use agentledger_agents::{
    FaultPlan, FaultPoint, PostgresWorkQueue, Runtime, RuntimeConfig, Submission, SystemClock,
    ToolRegistry,
};
use agentledger_eventstore::testing::TestDatabase;
use agentledger_eventstore::EventStore;
use common::{Server, TempFile};

async fn row_of(db: &TestDatabase, id: uuid::Uuid) -> i64 {
    db.admin_client()
        .await
        .query_one(
            "SELECT count(*) FROM agent_tasks WHERE workflow_id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0)
}

async fn last_type(store: &dyn EventStore, id: uuid::Uuid) -> (String, usize) {
    let events = store
        .read_stream(&agentledger_agents::stream_of(id), 0, 1_000)
        .await
        .unwrap();
    (events.last().unwrap().event_type.clone(), events.len())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_workflow_without_a_queue_row_is_found_and_finished() {
    let db = TestDatabase::create().await;
    let store = Arc::new(db.store().await);
    let queue = Arc::new(PostgresWorkQueue::new(store.pool().clone()));
    // A runtime that dies right after Sena's analysis: the workflow waits
    // for Lubit, its row leased to a dead owner.
    let doomed = Runtime::with_faults(
        store.clone(),
        queue.clone(),
        ToolRegistry::default(),
        Arc::new(SystemClock),
        RuntimeConfig::default(),
        Some(FaultPlan::at(FaultPoint::AfterAnalysis, 1)),
    );
    let (_never, running) = common::run_in_background(&doomed);
    let lost = doomed
        .submit(Submission {
            request: "Count the words of this sentence.".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    running.await.unwrap();
    assert!(doomed.is_dead());
    assert_eq!(last_type(&*store, lost).await.0, "AnalysisProduced");

    // An escalated workflow: no row, and none wanted.
    let escalated = {
        let runtime = Runtime::new(
            store.clone(),
            queue.clone(),
            ToolRegistry::default(),
            Arc::new(SystemClock),
            RuntimeConfig::default(),
        );
        let mut events = store.subscribe_all(store.head_position().await.unwrap() + 1);
        let (stop, task) = common::run_in_background(&runtime);
        let id = runtime
            .submit(Submission {
                request: "Delete the old notes.".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        loop {
            let event = events.next().await.unwrap().unwrap();
            if event.event_type == "GateDecided" {
                break;
            }
        }
        // The runtime settles the claim (deletes the row) after the
        // verdict is recorded; subscribers may hear of the verdict first.
        // Stopping before that would hand the row back instead. No event
        // marks it: watch the table, bounded.
        for _ in 0..1_000 {
            if row_of(&db, id).await == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = stop.send(());
        task.await.unwrap();
        id
    };
    let before = last_type(&*store, escalated).await;
    assert_eq!(before.0, "GateDecided");
    assert_eq!(row_of(&db, escalated).await, 0, "an escalation has no row");

    // The row is lost.
    db.admin_client()
        .await
        .execute("DELETE FROM agent_tasks WHERE workflow_id = $1", &[&lost])
        .await
        .unwrap();

    // `serve` projects the ledger, and its sweep finds the workflow the
    // status shows waiting with no row: it is queued and finished.
    let config =
        std::env::temp_dir().join(format!("agentledger-sweep-{}.toml", uuid::Uuid::new_v4()));
    std::fs::write(&config, "[agents]\norphan_grace_ms = 300\n").unwrap();
    let _config = TempFile(config.clone());
    let mut progress = store.subscribe_stream(
        agentledger_agents::stream_of(lost),
        last_type(&*store, lost).await.1 as u64,
    );
    let (service, admin) = (db.service_url(), db.admin_url().to_string());
    let server = Server::start(&[
        ("DATABASE_URL", &service),
        ("AGENTLEDGER_ADMIN_DATABASE_URL", &admin),
        ("AGENTLEDGER_CONFIG", config.to_str().unwrap()),
    ]);
    let finished = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(event) = progress.next().await {
            let event = event.unwrap();
            if event.event_type == "WorkflowCompleted" {
                return true;
            }
        }
        false
    })
    .await
    .expect("the lost workflow is finished within a minute");
    assert!(finished);
    assert_eq!(
        row_of(&db, lost).await,
        0,
        "its row is gone once it is done"
    );

    // The escalation still waits for its person, untouched.
    assert_eq!(last_type(&*store, escalated).await, before);
    assert_eq!(row_of(&db, escalated).await, 0);
    assert!(server.stop().success());
}
