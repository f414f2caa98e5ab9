//! End-to-end: `agentledger rebuild` on a real database fills the read
//! models from the ledger and swaps them in; bad names are refused.

mod common;

use common::{agentledger, complete_workflows};

use agentledger_eventstore::testing::TestDatabase;
use agentledger_eventstore::EventStore;

#[tokio::test]
async fn rebuild_fills_every_read_model_from_the_ledger() {
    let db = TestDatabase::create().await;
    let store = db.store().await;
    // A few workflows, recorded while no projection runs.
    complete_workflows(
        &store,
        &[
            "Compute (17 * 23) + 4, then explain the result.",
            "요약해 주세요. 그다음 단어 수를 세어 주세요.",
        ],
    )
    .await;
    let head = store.head_position().await.unwrap();

    let output = agentledger(&["rebuild", "--all"], db.admin_url());
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for name in ["workflow_status", "audit_trail", "agent_metrics"] {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with(&format!("{name}: {head} events up to position {head}"))),
            "{stdout}"
        );
    }
    let admin = db.admin_client().await;
    let count = |sql: &'static str| {
        let admin = &admin;
        async move { admin.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) }
    };
    assert_eq!(
        count("SELECT count(*) FROM workflow_status WHERE state = 'COMPLETED'").await,
        2
    );
    assert_eq!(count("SELECT count(*) FROM audit_trail").await, head as i64);
    assert!(count("SELECT count(*) FROM agent_metrics").await >= 4);
    assert_eq!(
        count("SELECT min(position) FROM projection_checkpoints").await,
        head as i64
    );

    let refused = agentledger(&["rebuild", "workflow_stats"], db.admin_url());
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("no projection named \"workflow_stats\"")
    );
    let nothing = agentledger(&["rebuild"], db.admin_url());
    assert!(!nothing.status.success());
}
