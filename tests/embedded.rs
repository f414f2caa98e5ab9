//! End-to-end: `serve --data-dir` keeps its ledger in an embedded SQLite
//! file. Killed (SIGKILL) with workflows half-way, it starts again from the
//! file: the workflows finish, nothing is recorded twice, every chain
//! verifies, the signing key is the same, and the read models are rebuilt.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::{post, Server};
use serde_json::{json, Value};

const REQUESTS: [&str; 2] = [
    "Summarise the attached quarterly report. Then count the words of the summary.",
    "첨부된 분기 보고서를 요약해 주세요. 그다음 요약문의 단어 수를 세어 주세요.",
];

/// A directory removed on drop.
struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn query(base: &str, query: &str, variables: Value) -> Value {
    let (status, body) = post(base, None, query, &variables).await;
    assert_eq!(status, 200, "{body}");
    assert!(body["errors"].is_null(), "{body}");
    body["data"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_kept_ledger_survives_a_kill_mid_workflow_and_its_workflows_finish_after_restart() {
    let dir = TempDir(std::env::temp_dir().join(format!("al-data-{}", uuid::Uuid::new_v4())));
    let data_dir = dir.0.to_string_lossy().to_string();
    // One workflow driven at a time: a backlog that the kill cuts through.
    let env = [
        ("AGENTLEDGER_DATA_DIR", data_dir.as_str()),
        ("AGENTLEDGER_MAX_WORKFLOWS", "1"),
        ("RUST_LOG", "warn"),
    ];
    let server = Server::start(&env);
    let health: Value = reqwest::get(format!("{}/health", server.base))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["store"], "embedded");
    let keys = query(
        &server.base,
        "{ ledgerKeys { keyId publicKey } }",
        json!({}),
    )
    .await;

    let submissions = (0..120).map(|i| {
        let base = server.base.clone();
        async move {
            let data = query(
                &base,
                "mutation($r: String!) { submitWorkflow(request: $r) { id } }",
                json!({ "r": REQUESTS[i % 2] }),
            )
            .await;
            data["submitWorkflow"]["id"].as_str().unwrap().to_string()
        }
    });
    let ids: Vec<String> = futures::future::join_all(submissions).await;
    server.kill();

    // What the file held when the process died.
    let file = dir.0.join("ledger.sqlite3");
    let (events_at_kill, open_at_kill): (i64, i64) = {
        let conn = rusqlite::Connection::open_with_flags(
            &file,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap();
        let events = conn
            .query_row("SELECT count(*) FROM events", [], |r| r.get(0))
            .unwrap();
        let open = conn
            .query_row(
                "SELECT count(DISTINCT stream_id) FROM events WHERE stream_id NOT IN
                   (SELECT stream_id FROM events WHERE event_type IN
                     ('WorkflowCompleted', 'WorkflowRejected', 'WorkflowFailed', 'WorkflowFlagged'))",
                [],
                |r| r.get(0),
            )
            .unwrap();
        (events, open)
    };
    println!(
        "killed with {events_at_kill} events in the file, {open_at_kill} of {} workflows unfinished",
        ids.len()
    );
    assert!(
        open_at_kill > 0,
        "every workflow had finished before the kill: the test proves nothing"
    );

    let server = Server::start(&env);
    let started = Instant::now();
    let mut open: HashSet<&String> = ids.iter().collect();
    while !open.is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{} workflows still unfinished 60 s after the restart",
            open.len()
        );
        let mut finished = Vec::new();
        for id in &open {
            let data = query(
                &server.base,
                "query($id: ID!) { workflow(id: $id) { state } }",
                json!({ "id": id }),
            )
            .await;
            if data["workflow"]["state"] == "COMPLETED" {
                finished.push(*id);
            }
        }
        for id in finished {
            open.remove(id);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "all {} workflows completed {:?} after the restart",
        ids.len(),
        started.elapsed()
    );

    let verified = query(
        &server.base,
        "{ verifyLedger { ok checkedEvents firstBrokenPosition } }",
        json!({}),
    )
    .await;
    assert_eq!(verified["verifyLedger"]["ok"], true, "{verified}");
    let checked = verified["verifyLedger"]["checkedEvents"].as_i64().unwrap();
    assert!(checked > events_at_kill, "{checked} events checked");
    assert_eq!(
        query(
            &server.base,
            "{ ledgerKeys { keyId publicKey } }",
            json!({})
        )
        .await,
        keys,
        "the signing key is kept"
    );
    // Nothing recorded twice across the kill, and the Korean text intact.
    for id in &ids {
        let data = query(
            &server.base,
            "query($id: ID!) { events(workflowId: $id) { version type }
                               workflow(id: $id) { request } }",
            json!({ "id": id }),
        )
        .await;
        let events = data["events"].as_array().unwrap();
        let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
        for once in [
            "WorkflowSubmitted",
            "AnalysisProduced",
            "GateDecided",
            "EthicsReviewed",
            "WorkflowCompleted",
        ] {
            assert_eq!(
                types.iter().filter(|t| **t == once).count(),
                1,
                "{id}: {once} in {types:?}"
            );
        }
        assert!(REQUESTS.contains(&data["workflow"]["request"].as_str().unwrap()));
    }
    assert!(server.stop().success(), "a clean stop");

    // A third start reads it all back: the read models are rebuilt.
    let server = Server::start(&env);
    let started = Instant::now();
    loop {
        let counts = query(
            &server.base,
            "{ workflowCounts { state count } }",
            json!({}),
        )
        .await;
        let completed = counts["workflowCounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["state"] == "COMPLETED")
            .map(|c| c["count"].as_i64().unwrap());
        if completed == Some(ids.len() as i64) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "read models after the third start: {counts}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(server.stop().success());
}

#[tokio::test]
async fn two_processes_cannot_share_a_data_directory_and_both_stores_cannot_be_chosen() {
    let dir = TempDir(std::env::temp_dir().join(format!("al-data-{}", uuid::Uuid::new_v4())));
    let data_dir = dir.0.to_string_lossy().to_string();
    let first = Server::start(&[
        ("AGENTLEDGER_DATA_DIR", data_dir.as_str()),
        ("RUST_LOG", "warn"),
    ]);
    let second = std::process::Command::new(env!("CARGO_BIN_EXE_agentledger"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir", &data_dir])
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(!second.status.success());
    let said = String::from_utf8_lossy(&second.stderr);
    assert!(
        said.contains("in use by another agentledger process"),
        "{said}"
    );
    assert!(first.stop().success());

    let both = std::process::Command::new(env!("CARGO_BIN_EXE_agentledger"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir", &data_dir])
        .env(
            "DATABASE_URL",
            "postgres://postgres@127.0.0.1:5432/postgres",
        )
        .output()
        .unwrap();
    assert!(!both.status.success());
    let said = String::from_utf8_lossy(&both.stderr);
    assert!(said.contains("both DATABASE_URL and --data-dir"), "{said}");
}
