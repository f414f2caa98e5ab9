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

#[tokio::test]
async fn an_export_verifies_offline_and_a_changed_byte_in_it_is_found() {
    let db = TestDatabase::create().await;
    let store = db.store().await;
    let id = common::complete_workflows(&store, &["요약해 주세요. 그다음 단어 수를 세어 주세요."])
        .await[0];

    let dir = std::env::temp_dir().join(format!(
        "agentledger-export-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let jsonl = dir.join("trail.jsonl");
    let csv = dir.join("trail.csv");
    let id = id.to_string();
    let exported = agentledger(
        &[
            "export",
            "--workflow",
            &id,
            "--output",
            jsonl.to_str().unwrap(),
        ],
        &db.service_url(),
    );
    assert!(
        exported.status.success(),
        "{}",
        String::from_utf8_lossy(&exported.stderr)
    );
    let count = store.head_position().await.unwrap();
    let text = std::fs::read_to_string(&jsonl).unwrap();
    assert_eq!(text.lines().count() as u64, count);
    assert!(text.contains("\"actor\":\"lubit\"") && text.contains("\"hash\":"));
    let csv_out = agentledger(
        &[
            "export",
            "--workflow",
            &id,
            "--format",
            "csv",
            "--output",
            csv.to_str().unwrap(),
        ],
        &db.service_url(),
    );
    assert!(csv_out.status.success());
    let rows = std::fs::read_to_string(&csv).unwrap();
    assert!(rows.starts_with("position,workflow_id,version,"));
    assert_eq!(rows.lines().count() as u64, count + 1);

    // Offline: no database at all.
    let offline = agentledger(
        &["verify", "--export", jsonl.to_str().unwrap()],
        "postgres://nobody@127.0.0.1:1/none",
    );
    assert!(
        offline.status.success(),
        "{}",
        String::from_utf8_lossy(&offline.stderr)
    );
    assert!(
        String::from_utf8_lossy(&offline.stdout).contains(&format!("ok, {count} events checked"))
    );

    // One changed character: in the stored request (hashed), then in the
    // reviewer's reading beside it (derived from the event, checked again).
    let first_line = text.lines().next().unwrap();
    let event_at = first_line.find("\"event\":").unwrap();
    let in_event = format!(
        "{}{}",
        &first_line[..event_at],
        first_line[event_at..].replacen("요약해", "요약헤", 1)
    );
    let in_reading = format!(
        "{}{}",
        first_line[..event_at].replacen("요약해", "요약헤", 1),
        &first_line[event_at..]
    );
    for (line, reason) in [
        (in_event, "content does not match its hash"),
        (
            in_reading,
            "the reading beside the event does not follow from it",
        ),
    ] {
        assert_ne!(line, first_line);
        std::fs::write(&jsonl, text.replacen(first_line, &line, 1)).unwrap();
        let broken = agentledger(
            &["verify", "--export", jsonl.to_str().unwrap()],
            "postgres://nobody@127.0.0.1:1/none",
        );
        assert!(!broken.status.success());
        let stderr = String::from_utf8_lossy(&broken.stderr);
        assert!(
            stderr.contains(&format!("BROKEN at position 1 ({reason})")),
            "{stderr}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
