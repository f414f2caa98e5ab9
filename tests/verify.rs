//! End-to-end: `agentledger verify` on a real database: an intact ledger
//! passes, a changed byte is named by position, with a non-zero exit.

mod common;

use agentledger_eventstore::testing::TestDatabase;
use agentledger_eventstore::EventStore;
use common::agentledger;

#[tokio::test]
async fn verify_reports_an_intact_ledger_and_names_a_changed_event() {
    let db = TestDatabase::create().await;
    let store = db.store().await;
    let stream =
        agentledger_eventstore::StreamId::new("workflow-0190a1b2-0000-7000-8000-000000000001")
            .unwrap();
    let event = |i: u32| {
        agentledger_eventstore::NewEvent::new(
            "Noted",
            serde_json::json!({"i": i, "text": "검토"}),
            agentledger_eventstore::Metadata::new(agentledger_eventstore::Actor::system()),
        )
    };
    store
        .append(
            &stream,
            agentledger_eventstore::ExpectedVersion::NoStream,
            (0..10).map(event).collect(),
        )
        .await
        .unwrap();
    let ok = agentledger(&["verify"], &db.service_url());
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&ok.stdout).trim(),
        "the ledger: ok, 10 events checked"
    );
    let one = agentledger(
        &[
            "verify",
            "--workflow",
            "0190a1b2-0000-7000-8000-000000000001",
        ],
        &db.service_url(),
    );
    assert_eq!(
        String::from_utf8_lossy(&one.stdout).trim(),
        "workflow 0190a1b2-0000-7000-8000-000000000001: ok, 10 events checked"
    );

    let admin = db.admin_client().await;
    admin
        .batch_execute(
            "ALTER TABLE events DISABLE TRIGGER USER;
             UPDATE events SET payload = jsonb_set(payload, '{text}', '\"검투\"') WHERE global_position = 4;
             ALTER TABLE events ENABLE TRIGGER USER;",
        )
        .await
        .unwrap();
    let broken = agentledger(&["verify"], &db.service_url());
    assert!(!broken.status.success());
    let stderr = String::from_utf8_lossy(&broken.stderr);
    assert!(
        stderr.contains("BROKEN at position 4 (content does not match its hash)"),
        "{stderr}"
    );
}
