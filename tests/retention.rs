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
use common::{agentledger, create_key, post, serve_with_config, TempFile};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use uuid::Uuid;

async fn completed(base: &str, key: &str, request: &str) -> Uuid {
    let (status, body) = post(
        base,
        Some(key),
        "mutation($r: String!) { submitWorkflow(request: $r) { id } }",
        &json!({ "r": request }),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let id = body["data"]["submitWorkflow"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let started = Instant::now();
    loop {
        let (_, body) = post(
            base,
            Some(key),
            "query($id: ID!) { workflow(id: $id) { state } }",
            &json!({ "id": id }),
        )
        .await;
        if body["data"]["workflow"]["state"] == "COMPLETED" {
            return id.parse().unwrap();
        }
        assert!(started.elapsed() < Duration::from_secs(30), "{body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

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

#[tokio::test(flavor = "multi_thread")]
async fn old_read_model_rows_are_archived_with_receipts_and_pruned_and_the_ledger_stays() {
    let db = TestDatabase::create().await;
    let key = create_key(&db, "ops", &["submitter", "auditor", "viewer"], "default");
    let (server, _config) = serve_with_config(&db, "");
    let old_a = completed(
        &server.base,
        &key,
        "Summarise the attached quarterly report.",
    )
    .await;
    let old_b = completed(
        &server.base,
        &key,
        "첨부된 분기 보고서를 요약해 주세요. 그다음 요약문의 단어 수를 세어 주세요.",
    )
    .await;
    let recent = completed(&server.base, &key, "Count the words of this sentence.").await;
    let known: Value = reqwest::get(format!("{}/.well-known/agentledger-key", server.base))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let vkey = known["verifier_key"].as_str().unwrap().to_string();
    server.stop();

    // Two workflows finished 400 days ago, and every metric minute too.
    let admin = db.admin_client().await;
    let old = [old_a, old_b];
    admin
        .execute(
            "UPDATE workflow_status SET completed_at = completed_at - interval '400 days'
              WHERE workflow_id = ANY($1)",
            &[&old.to_vec()],
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
    let events_before = common::count_events(&db).await;
    let old_rows = count(
        &db,
        "SELECT count(*) FROM audit_trail WHERE workflow_id = ANY($1)",
        &old,
    )
    .await;
    let recent_rows = count(
        &db,
        "SELECT count(*) FROM audit_trail WHERE workflow_id = ANY($1)",
        &[recent],
    )
    .await;
    let metric_rows = count(
        &db,
        "SELECT count(*) FROM agent_metrics WHERE $1::uuid[] IS NOT NULL",
        &[],
    )
    .await;
    assert!(old_rows > 10 && recent_rows > 0 && metric_rows > 0);

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
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM audit_trail WHERE workflow_id = ANY($1)",
            &old
        )
        .await,
        old_rows
    );

    // The default window (a year): the two old workflows and the metrics go.
    let out = agentledger(&["retain", "--archive-dir", &dir_arg], db.admin_url());
    let said =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    println!("{said}");
    assert!(
        said.contains(&format!(
            "2 workflows ({old_rows} audit rows) and {metric_rows} agent-metric rows"
        )),
        "{said}"
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM audit_trail WHERE workflow_id = ANY($1)",
            &old
        )
        .await,
        0
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM audit_trail WHERE workflow_id = ANY($1)",
            &[recent]
        )
        .await,
        recent_rows,
        "a workflow inside the window keeps its rows"
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM agent_metrics WHERE $1::uuid[] IS NOT NULL",
            &[]
        )
        .await,
        0
    );
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
        .query("SELECT name, sha256, workflows, audit_rows, metric_rows FROM retention_segments ORDER BY name", &[])
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

    // A changed row, a cut file, or another key: refused.
    let text = std::fs::read_to_string(workflows).unwrap();
    let mut lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let changed_file = TempFile(dir.0.with_extension("changed.jsonl"));
    let mut changed = lines.clone();
    changed[1]["audit_trail"][0]["hash"] = json!("00".repeat(32));
    let write = |path: &Path, lines: &[Value]| {
        let body: String = lines.iter().map(|l| l.to_string() + "\n").collect();
        std::fs::write(path, body).unwrap();
    };
    write(&changed_file.0, &changed);
    let (ok, said) = verify_archive(&changed_file.0, &vkey);
    assert!(
        !ok && said.contains("FAILED") && said.contains("another hash"),
        "{said}"
    );
    changed = lines.clone();
    changed[1]["receipt"]["events"][0]["event"]["payload"]["changed"] = json!("바뀜");
    write(&changed_file.0, &changed);
    let (ok, said) = verify_archive(&changed_file.0, &vkey);
    assert!(!ok && said.contains("FAILED"), "{said}");
    lines.pop();
    write(&changed_file.0, &lines);
    let (ok, said) = verify_archive(&changed_file.0, &vkey);
    assert!(!ok && said.contains("cut short"), "{said}");
    let other = vkey.replacen('+', "x+", 1);
    let (ok, said) = verify_archive(workflows, &other);
    assert!(!ok && said.contains("FAILED"), "{said}");

    // Run again: nothing left to archive, no segment written.
    let out = agentledger(&["retain", "--archive-dir", &dir_arg], db.admin_url());
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("0 workflows (0 audit rows)"));
    assert_eq!(segments(&dir.0).len(), 2);

    // serve refuses a window under the floor before it listens.
    let config = TempFile(std::env::temp_dir().join(format!("retention-{}.toml", Uuid::new_v4())));
    std::fs::write(
        &config.0,
        format!("[retention]\narchive_dir = \"{dir_arg}\"\nwindow_days = 90\n"),
    )
    .unwrap();
    let refused = Command::new(env!("CARGO_BIN_EXE_agentledger"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("DATABASE_URL", db.service_url())
        .env("AGENTLEDGER_ADMIN_DATABASE_URL", db.admin_url())
        .env("AGENTLEDGER_PROFILE", "test")
        .env("AGENTLEDGER_AUTH_MODE", "required")
        .env("AGENTLEDGER_CONFIG", &config.0)
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
    let (server, _config) = serve_with_config(
        &db,
        &format!("[retention]\narchive_dir = \"{dir_arg}\"\ninterval_hours = 24\n"),
    );
    let started = Instant::now();
    while count(
        &db,
        "SELECT count(*) FROM audit_trail WHERE workflow_id = ANY($1)",
        &[recent],
    )
    .await
        > 0
    {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "serve did not run retention"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The row in retention_segments commits with the DELETE.
    let third = admin
        .query_one("SELECT name, workflows FROM retention_segments ORDER BY written_at DESC, name DESC LIMIT 1", &[])
        .await
        .unwrap();
    assert_eq!(third.get::<_, i32>(1), 1);
    let (ok, said) = verify_archive(&dir.0.join(third.get::<_, String>(0)), &vkey);
    assert!(ok, "{said}");
    server.stop();
    std::fs::remove_dir_all(&dir.0).unwrap();
}
