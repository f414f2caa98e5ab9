//! End-to-end: `agentledger verify` on a real database: an intact ledger
//! passes, a changed byte is named by position, with a non-zero exit.

mod common;

use agentledger_eventstore::testing::TestDatabase;
use agentledger_eventstore::EventStore;
use common::agentledger;

/// Runs `sql` as the owner with the immutability triggers off, as an
/// attacker with the database's keys could.
async fn tamper(db: &TestDatabase, sql: &str) {
    db.admin_client()
        .await
        .batch_execute(&format!(
            "ALTER TABLE events DISABLE TRIGGER USER; {sql}; ALTER TABLE events ENABLE TRIGGER USER;"
        ))
        .await
        .unwrap();
}

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
    // No `serve` ran: the ledger's tree was never built, and it says so.
    assert_eq!(
        String::from_utf8_lossy(&ok.stdout).trim(),
        "the ledger: ok, 10 events checked\n\
         the ledger's tree: not built yet (a running `serve` builds it from the events)"
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

    tamper(
        &db,
        "UPDATE events SET payload = jsonb_set(payload, '{text}', '\"검투\"') WHERE global_position = 4",
    )
    .await;
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

/// The signing key exists from the first start and is published; a digest
/// from GraphQL, kept as a file, verifies with `agentledger verify --digest`
/// while the ledger grows, and fails once an event it covers is changed.
#[tokio::test]
async fn a_signed_digest_from_the_api_is_proven_by_the_cli_until_the_ledger_changes() {
    use common::Server;
    let db = TestDatabase::create().await;
    let store = db.store().await;
    common::complete_workflows(&store, &["Summarise the report.", "단어 수를 세어 주세요."]).await;
    let server = Server::start(&[
        ("DATABASE_URL", &db.service_url()),
        ("AGENTLEDGER_ADMIN_DATABASE_URL", db.admin_url()),
        ("RUST_LOG", "warn"),
    ]);
    let published: serde_json::Value = serde_json::from_str(
        &reqwest::get(format!("{}/.well-known/agentledger-key", server.base))
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    )
    .unwrap();
    let active = published["active"]
        .as_str()
        .expect("a key from the first start")
        .to_string();
    assert_eq!(published["keys"][0]["key_id"], active.as_str());
    let response: serde_json::Value = serde_json::from_str(
        &reqwest::Client::new()
            .post(format!("{}/graphql", server.base))
            .header("content-type", "application/json")
            .body(r#"{"query": "{ ledgerDigest { keyId position events json } }"}"#)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    )
    .unwrap();
    let digest = &response["data"]["ledgerDigest"];
    assert_eq!(digest["keyId"], active.as_str(), "{response}");
    let head = store.head_position().await.unwrap();
    assert_eq!(digest["position"], head);
    let dir = std::env::temp_dir().join(format!("agentledger-digest-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("digest.json");
    std::fs::write(&file, digest["json"].as_str().unwrap()).unwrap();
    let file = file.to_str().unwrap();
    drop(server);

    // The ledger grows: the digest still holds for what it covers.
    common::complete_workflows(&store, &["Sort the tags."]).await;
    let ok = agentledger(&["verify", "--digest", file], &db.service_url());
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("ok"));
    // The CLI signs too, with the same key (and the owner role: the
    // service role may not read the secret half).
    let cli = dir.join("cli.json");
    let signed = agentledger(
        &["digest", "--output", cli.to_str().unwrap()],
        db.admin_url(),
    );
    assert!(
        signed.status.success(),
        "{}",
        String::from_utf8_lossy(&signed.stderr)
    );
    let cli_digest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cli).unwrap()).unwrap();
    assert_eq!(cli_digest["key_id"], active.as_str());
    assert!(cli_digest["position"].as_u64().unwrap() > head);
    // A public key kept apart that is not the signer's: refused.
    let wrong = agentledger(
        &["verify", "--digest", file, "--public-key", &"ab".repeat(32)],
        &db.service_url(),
    );
    assert!(!wrong.status.success());
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("is not the trusted public key"));

    // One byte of one covered event changed: the digest fails and says where.
    tamper(
        &db,
        "UPDATE events SET payload = jsonb_set(payload, '{priority}', '\"HIGH\"') WHERE global_position = 1",
    )
    .await;
    let broken = agentledger(&["verify", "--digest", file], &db.service_url());
    assert!(!broken.status.success());
    let stderr = String::from_utf8_lossy(&broken.stderr);
    assert!(
        stderr.contains("FAILED") && stderr.contains("position 1"),
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
