//! End-to-end: a witness (`agentledger witness`) cosigns a real ledger's
//! checkpoints as `serve` pushes them, then is shown another history of the
//! same ledger (an older backup restored, with different events recorded
//! after it, signed with the same key) and refuses it; the service that
//! pushed it says so in `/ready` and `/metrics`, and the witness keeps what
//! it cosigned.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use agentledger_eventstore::checkpoint::{
    cosigner_verifier_key, note_body, verify_checkpoint, verify_cosignature,
};
use agentledger_eventstore::testing::{with_database, TestDatabase, SERVICE_ROLE};
use common::{create_key, post, Server};
use serde_json::{json, Value};

const ORIGIN: &str = "ledger.example.com/agentledger";

struct Witness {
    child: std::process::Child,
    base: String,
}

impl Drop for Witness {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_witness(vkey: &str, state: &std::path::Path, key: &std::path::Path) -> Witness {
    let mut child = Command::new(env!("CARGO_BIN_EXE_agentledger"))
        .args([
            "witness",
            "--listen",
            "127.0.0.1:0",
            "--name",
            "witness.test",
        ])
        .args(["--log", &format!("{ORIGIN}={vkey}")])
        .arg("--state")
        .arg(state)
        .arg("--key")
        .arg(key)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let base = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .to_string();
    Witness { child, base }
}

fn serve(service_url: &str, admin_url: &str, config: &std::path::Path) -> Server {
    Server::start(&[
        ("DATABASE_URL", service_url),
        ("AGENTLEDGER_ADMIN_DATABASE_URL", admin_url),
        ("AGENTLEDGER_PROFILE", "test"),
        ("AGENTLEDGER_AUTH_MODE", "required"),
        ("AGENTLEDGER_CONFIG", &config.to_string_lossy()),
        ("RUST_LOG", "warn"),
    ])
}

async fn ready(base: &str) -> (u16, Value) {
    let response = reqwest::get(format!("{base}/ready")).await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

/// Waits until `until` holds for /ready's answer (at most 30 s).
async fn ready_until(base: &str, until: impl Fn(u16, &Value) -> bool) -> Value {
    let started = Instant::now();
    loop {
        let (status, body) = ready(base).await;
        if until(status, &body) {
            return body;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "/ready: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn head(admin_url: &str) -> u64 {
    agentledger_eventstore::testing::connect(admin_url)
        .await
        .query_one("SELECT count(*) FROM events", &[])
        .await
        .unwrap()
        .get::<_, i64>(0) as u64
}

#[tokio::test(flavor = "multi_thread")]
async fn a_witness_cosigns_the_ledger_and_refuses_a_rewritten_history() {
    let db = TestDatabase::create().await;
    let key = create_key(
        &db,
        "reviewer",
        &["auditor", "submitter", "viewer"],
        "default",
    );
    let dir = std::env::temp_dir().join(format!("al-witness-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let _cleanup = TempDir(dir.clone());
    let config = dir.join("serve.toml");
    std::fs::write(
        &config,
        format!("[server]\ncheckpoint_origin = \"{ORIGIN}\"\n"),
    )
    .unwrap();

    // The ledger's verifier key, as its operators hand it to a witness.
    let server = serve(&db.service_url(), db.admin_url(), &config);
    let (_, keys) = post(
        &server.base,
        Some(&key),
        "{ ledgerKeys { verifierKey } }",
        &json!({}),
    )
    .await;
    let vkey = keys["data"]["ledgerKeys"][0]["verifierKey"]
        .as_str()
        .unwrap()
        .to_string();
    let none = reqwest::get(format!("{}/checkpoint/cosigned", server.base))
        .await
        .unwrap();
    assert_eq!(none.status(), 404, "nothing is cosigned without witnesses");
    server.stop();
    let witness = start_witness(&vkey, &dir.join("state.json"), &dir.join("witness.key"));
    // The witness's verifier key, from the key it made at start.
    let seed: [u8; 32] = std::fs::read(dir.join("witness.key"))
        .unwrap()
        .try_into()
        .unwrap();
    let witness_vkey = cosigner_verifier_key(
        "witness.test",
        &agentledger_eventstore::signing::SigningKey::from_bytes(&seed).verifying_key(),
    );
    std::fs::write(
        &config,
        format!(
            "[server]\ncheckpoint_origin = \"{ORIGIN}\"\n[witness]\nurls = [\"{}\"]\nkeys = [\"{witness_vkey}\"]\ninterval_seconds = 1\nevery_events = 1\n",
            witness.base
        ),
    )
    .unwrap();

    // The witness cosigns as the ledger grows.
    let server = serve(&db.service_url(), db.admin_url(), &config);
    common::submit_completed(
        &server.base,
        &key,
        "Summarise the attached quarterly report. Then count the words of the summary.",
    )
    .await;
    let first = head(db.admin_url()).await;
    let url = witness.base.clone();
    ready_until(&server.base, |s, b| {
        s == 200 && b["witnesses"][&url]["cosigned_size"].as_u64() >= Some(first)
    })
    .await;
    // The cosigned checkpoint: the ledger's signature and the witness's
    // cosignature, each checked under the key its signer published.
    let cosigned = reqwest::get(format!("{}/checkpoint/cosigned", server.base))
        .await
        .unwrap();
    assert_eq!(cosigned.status(), 200);
    let note = cosigned.text().await.unwrap();
    let checked = verify_checkpoint(&note, &vkey).unwrap_or_else(|e| panic!("{e}\n{note}"));
    assert!(checked.size >= first, "{note}");
    let body = note_body(&note).unwrap();
    let line = note
        .lines()
        .find(|l| l.starts_with("\u{2014} witness.test "))
        .unwrap_or_else(|| panic!("no cosignature in\n{note}"));
    verify_cosignature(body, line, &witness_vkey).unwrap();
    assert!(
        verify_cosignature(body, line, &vkey).is_err(),
        "the ledger's key is not the witness's"
    );
    println!("cosigned checkpoint of {} leaves:\n{note}", checked.size);
    server.stop();

    // A backup of the ledger as it is now.
    let backup = format!("{}_backup", db.name());
    let maintenance =
        agentledger_eventstore::testing::connect(&with_database(db.admin_url(), "postgres", None))
            .await;
    maintenance
        .batch_execute(&format!("CREATE DATABASE {backup} TEMPLATE {}", db.name()))
        .await
        .unwrap();

    let server = serve(&db.service_url(), db.admin_url(), &config);
    common::submit_completed(
        &server.base,
        &key,
        "첨부된 분기 보고서를 요약해 주세요. 그다음 요약문의 단어 수를 세어 주세요.",
    )
    .await;
    let second = head(db.admin_url()).await;
    ready_until(&server.base, |s, b| {
        s == 200 && b["witnesses"][&url]["cosigned_size"].as_u64() >= Some(second)
    })
    .await;
    server.stop();

    // The backup restored and served, with other events after it: the
    // same key signs another history. The witness refuses it, and the node
    // says so.
    let restored_admin = with_database(db.admin_url(), &backup, None);
    let restored_service = with_database(db.admin_url(), &backup, Some(SERVICE_ROLE));
    let server = serve(&restored_service, &restored_admin, &config);
    common::submit_completed(&server.base, &key, "- Count the characters in the product description\n- Extract the keywords from the product description\n- Deduplicate the list of tags").await;
    common::submit_completed(
        &server.base,
        &key,
        "(17 * 23) + 4를 계산하고, 그리고 나서 결과를 한 문장으로 설명해 주세요.",
    )
    .await;
    let body = ready_until(&server.base, |s, _| s == 503).await;
    let problems = body["problems"].to_string();
    assert!(
        problems.contains("witness") && problems.contains("refused"),
        "{body}"
    );
    println!("the restored ledger is refused: {problems}");
    let metrics = reqwest::get(format!("{}/metrics", server.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(&format!(
            "agentledger_witness_refused{{witness=\"{url}\"}} 1"
        )),
        "{metrics}"
    );
    server.stop();
    let state: Value =
        serde_json::from_slice(&std::fs::read(dir.join("state.json")).unwrap()).unwrap();
    assert_eq!(state[ORIGIN]["size"].as_u64(), Some(second), "{state}");
    maintenance
        .batch_execute(&format!("DROP DATABASE {backup} WITH (FORCE)"))
        .await
        .unwrap();
    drop(witness);
}

/// A directory removed on drop.
struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
