//! Retention end to end, on PostgreSQL with real processes: workflows run
//! through `serve`; two of them are made to look finished 400 days ago;
//! `agentledger retain` archives their audit rows (with receipts) and the
//! old agent metrics into segments and prunes them, never an event; the
//! segments check with no database, and a changed or cut one fails; a
//! window under the legal floor is refused with nothing written, by the
//! CLI and by `serve`; and `serve` with `[retention]` runs it on its own.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use agentledger_eventstore::testing::TestDatabase;
use common::{agentledger, create_key, serve_with_config, TempFile};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// `agentledger verify --archive FILE --public-key KEY`: passed, and what it said.
fn verify_archive(file: &Path, vkey: &str) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_agentledger"))
        .args(["verify", "--archive"])
        .arg(file)
        .args(["--public-key", vkey])
        .env_remove("DATABASE_URL")
        .env_remove("AGENTLEDGER_ADMIN_DATABASE_URL")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    files.sort();
    files
}

async fn count(db: &TestDatabase, sql: &str, ids: &[Uuid]) -> i64 {
    db.admin_client()
        .await
        .query_one(sql, &[&ids])
        .await
        .unwrap()
        .get(0)
}

fn rows_of(db: &TestDatabase) -> impl std::future::Future<Output = i64> + '_ {
    count(
        db,
        "SELECT count(*) FROM agent_metrics WHERE $1::uuid[] IS NOT NULL",
        &[],
    )
}

async fn audit_rows(db: &TestDatabase, ids: &[Uuid]) -> i64 {
    count(
        db,
        "SELECT count(*) FROM audit_trail WHERE workflow_id = ANY($1)",
        ids,
    )
    .await
}

fn write_lines(path: &Path, lines: &[Value]) {
    let body: String = lines.iter().map(|l| l.to_string() + "\n").collect();
    std::fs::write(path, body).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn old_read_model_rows_are_archived_with_receipts_and_pruned_and_the_ledger_stays() {
    const ORIGIN: &str = "ledger.example.com/agentledger";
    let db = TestDatabase::create().await;
    let key = create_key(&db, "ops", &["submitter", "auditor", "viewer"], "default");
    let (server, _config) = serve_with_config(&db, "");
    let old_a = common::submit_completed(
        &server.base,
        &key,
        "Summarise the attached quarterly report.",
    )
    .await;
    let old_b = common::submit_completed(
        &server.base,
        &key,
        "첨부된 분기 보고서를 요약해 주세요. 그다음 요약문의 단어 수를 세어 주세요.",
    )
    .await;
    let odd = common::submit_completed(&server.base, &key, "Sort these numbers: 3, 1, 2.").await;
    let recent =
        common::submit_completed(&server.base, &key, "Count the words of this sentence.").await;
    let known: Value = reqwest::get(format!("{}/.well-known/agentledger-key", server.base))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let vkey = known["verifier_key"].as_str().unwrap().to_string();
    server.stop();

    // Three workflows finished 400 days ago, and every metric minute too;
    // one of the three has an audit row that no longer matches its event.
    let admin = db.admin_client().await;
    let old = [old_a, old_b];
    admin
        .execute(
            "UPDATE workflow_status SET completed_at = completed_at - interval '400 days'
              WHERE workflow_id = ANY($1)",
            &[&vec![old_a, old_b, odd]],
        )
        .await
        .unwrap();
    admin
        .execute(
            "UPDATE agent_metrics SET bucket = bucket - interval '400 days'",
            &[],
        )
        .await
        .unwrap();
    admin
        .execute(
            "UPDATE audit_trail SET summary = summary || ' (edited)' WHERE workflow_id = $1 AND version = 1",
            &[&odd],
        )
        .await
        .unwrap();
    let events_before = common::count_events(&db).await;
    let old_rows = audit_rows(&db, &old).await;
    let odd_rows = audit_rows(&db, &[odd]).await;
    let recent_rows = audit_rows(&db, &[recent]).await;
    let metric_rows = rows_of(&db).await;
    assert!(old_rows > 10 && odd_rows > 0 && recent_rows > 0 && metric_rows > 0);

    let dir = TempFile(std::env::temp_dir().join(format!("archive-{}", Uuid::new_v4())));
    let dir_arg = dir.0.to_string_lossy().to_string();

    // Under the floor: refused, nothing written or pruned.
    let refused = agentledger(
        &["retain", "--archive-dir", &dir_arg, "--window-days", "30"],
        db.admin_url(),
    );
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && said.contains("under the floor of 183 days"),
        "{said}"
    );
    assert!(!dir.0.exists(), "a refused run creates nothing");
    assert_eq!(audit_rows(&db, &old).await, old_rows);

    // The default window (a year): two old workflows and the metrics go;
    // the one whose row does not match stays, named, and the run says so.
    let out = agentledger(&["retain", "--archive-dir", &dir_arg], db.admin_url());
    let said =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    println!("{said}");
    assert!(
        !out.status.success(),
        "a workflow left in place fails the run: {said}"
    );
    assert!(
        said.contains(&format!(
            "2 workflows ({old_rows} audit rows) and {metric_rows} agent-metric rows"
        )) && said.contains(&format!("workflow {odd} left in place"))
            && said.contains("differs from its event (summary)")
            && said.contains("1 workflows were left in place"),
        "{said}"
    );
    assert_eq!(audit_rows(&db, &old).await, 0);
    assert_eq!(audit_rows(&db, &[odd]).await, odd_rows, "left in place");
    assert_eq!(
        audit_rows(&db, &[recent]).await,
        recent_rows,
        "inside the window"
    );
    assert_eq!(rows_of(&db).await, 0);
    assert_eq!(
        common::count_events(&db).await,
        events_before,
        "the ledger is never pruned"
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM workflow_status WHERE workflow_id = ANY($1)",
            &old
        )
        .await,
        2,
        "workflow status rows stay"
    );

    // Each segment is recorded with its file's SHA-256 and checks offline.
    let files = segments(&dir.0);
    assert_eq!(files.len(), 2, "{files:?}");
    let recorded = admin
        .query(
            "SELECT name, sha256 FROM retention_segments ORDER BY name",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(recorded.len(), 2);
    for (file, row) in files.iter().zip(&recorded) {
        assert_eq!(
            file.file_name().unwrap().to_str().unwrap(),
            row.get::<_, String>(0)
        );
        let sha = hex::encode(Sha256::digest(std::fs::read(file).unwrap()));
        assert_eq!(sha, row.get::<_, String>(1));
        let (ok, said) = verify_archive(file, &vkey);
        assert!(ok && said.contains(&format!("sha256 {sha}")), "{said}");
        println!("{}", said.trim());
    }
    let workflows = files
        .iter()
        .find(|f| f.to_string_lossy().contains("-workflows-"))
        .unwrap();
    let (_, said) = verify_archive(workflows, &vkey);
    assert!(
        said.contains("2 workflows (") && said.contains(&format!("{old_rows} audit rows matched")),
        "{said}"
    );

    // Changed, cut, repeated or moved: refused; so is another key.
    let lines: Vec<Value> = std::fs::read_to_string(workflows)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let changed_file = TempFile(dir.0.with_extension("changed.jsonl"));
    let other_id = lines[2]["workflow_id"].clone();
    let mut cases: Vec<(&str, Vec<Value>)> = Vec::new();
    let mut changed = lines.clone();
    changed[1]["audit_trail"][0]["hash"] = json!("00".repeat(32));
    cases.push(("differs from its event (hash)", changed));
    let mut changed = lines.clone();
    changed[1]["audit_trail"][1]["summary"] = json!("approved, by nobody");
    cases.push(("differs from its event (summary)", changed));
    let mut changed = lines.clone();
    changed[1]["audit_trail"][1]["workflow_id"] = other_id;
    cases.push(("of another workflow", changed));
    let mut changed = lines.clone();
    changed[1]["receipt"]["events"][0]["event"]["payload"]["changed"] = json!("바뀜");
    cases.push(("FAILED", changed));
    let mut changed = lines.clone();
    let end = changed.pop().unwrap();
    changed.push(lines[1].clone());
    changed.push(json!({ "kind": "end", "workflows": 3,
        "audit_rows": end["audit_rows"].as_u64().unwrap() + lines[1]["audit_trail"].as_array().unwrap().len() as u64,
        "metric_rows": 0 }));
    cases.push(("appears twice", changed));
    let mut changed = lines.clone();
    changed.pop();
    cases.push(("cut short", changed));
    for (expected, lines) in cases {
        write_lines(&changed_file.0, &lines);
        let (ok, said) = verify_archive(&changed_file.0, &vkey);
        assert!(
            !ok && said.contains("FAILED") && said.contains(expected),
            "{expected}: {said}"
        );
    }
    let stranger = agentledger_eventstore::checkpoint::verifier_key(
        "localhost/agentledger",
        &agentledger_eventstore::signing::new_signing_key().verifying_key(),
    );
    let (ok, said) = verify_archive(workflows, &stranger);
    assert!(!ok && said.contains("FAILED"), "{said}");

    // Mended, the odd workflow goes with the next run, which reads its
    // settings (and the checkpoint origin) from the service's file.
    admin
        .execute(
            "UPDATE audit_trail SET summary = left(summary, length(summary) - 9)
              WHERE workflow_id = $1 AND version = 1",
            &[&odd],
        )
        .await
        .unwrap();
    let config = TempFile(std::env::temp_dir().join(format!("retention-{}.toml", Uuid::new_v4())));
    let toml = format!(
        "[server]\ncheckpoint_origin = \"{ORIGIN}\"\n[retention]\narchive_dir = \"{dir_arg}\"\ninterval_hours = 24\n"
    );
    std::fs::write(&config.0, &toml).unwrap();
    let config_arg = config.0.to_string_lossy().to_string();
    let out = agentledger(&["retain", "--config", &config_arg], db.admin_url());
    let said =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && said.contains(&format!("1 workflows ({odd_rows} audit rows)")),
        "{said}"
    );
    assert!(said.contains(&format!("--public-key '{ORIGIN}+")), "{said}");
    let out = agentledger(&["retain", "--config", &config_arg], db.admin_url());
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("0 workflows (0 audit rows)"));
    assert_eq!(
        segments(&dir.0).len(),
        3,
        "a run with nothing to archive writes nothing"
    );

    // serve refuses a window under the floor before it listens.
    let short = TempFile(std::env::temp_dir().join(format!("retention-{}.toml", Uuid::new_v4())));
    std::fs::write(
        &short.0,
        format!("[retention]\narchive_dir = \"{dir_arg}\"\nwindow_days = 90\n"),
    )
    .unwrap();
    let refused = Command::new(env!("CARGO_BIN_EXE_agentledger"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("DATABASE_URL", db.service_url())
        .env("AGENTLEDGER_ADMIN_DATABASE_URL", db.admin_url())
        .env("AGENTLEDGER_PROFILE", "test")
        .env("AGENTLEDGER_AUTH_MODE", "required")
        .env("AGENTLEDGER_CONFIG", &short.0)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && said.contains("under the floor"),
        "{said}"
    );

    // serve with [retention] runs it by itself, under its own role.
    admin
        .execute(
            "UPDATE workflow_status SET completed_at = completed_at - interval '400 days'
              WHERE workflow_id = $1",
            &[&recent],
        )
        .await
        .unwrap();
    let (server, _config) = serve_with_config(&db, &toml);
    let started = Instant::now();
    while audit_rows(&db, &[recent]).await > 0 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "serve did not run retention"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let known: Value = reqwest::get(format!("{}/.well-known/agentledger-key", server.base))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let vkey = known["verifier_key"].as_str().unwrap();
    assert!(vkey.starts_with(&format!("{ORIGIN}+")));
    // The CLI's segment and serve's, both signed under the configured origin.
    let recorded = admin
        .query(
            "SELECT name, workflows FROM retention_segments ORDER BY written_at DESC, name DESC LIMIT 2",
            &[],
        )
        .await
        .unwrap();
    for row in &recorded {
        assert_eq!(row.get::<_, i32>(1), 1);
        let (ok, said) = verify_archive(&dir.0.join(row.get::<_, String>(0)), vkey);
        assert!(ok, "{said}");
    }
    server.stop();
    std::fs::remove_dir_all(&dir.0).unwrap();
}
