//! End-to-end: a real `serve` on PostgreSQL publishes checkpoints of the
//! ledger's tree at `GET /checkpoint` and proofs over GraphQL, and tools
//! that were not written here check them: `signed_note` verifies the
//! checkpoint under the verifier key `ledgerKeys` and
//! `/.well-known/agentledger-key` publish, `tlog_tiles` parses it and
//! checks an inclusion proof of every event of a workflow and a
//! consistency proof between two checkpoints.

mod common;

use std::time::{Duration, Instant};

use agentledger_eventstore::testing::TestDatabase;
use common::{create_key, post, serve_with_config};
use serde_json::{json, Value};
use signed_note::{Note, StandardVerifier, VerifierList};

const ORIGIN: &str = "ledger.example.com/agentledger";

async fn gql(base: &str, key: &str, query: &str, variables: Value) -> Value {
    let (status, body) = post(base, Some(key), query, &variables).await;
    assert_eq!(status, 200, "{body}");
    assert!(body["errors"].is_null(), "{body}");
    body["data"].clone()
}

fn number(v: &Value) -> u64 {
    v.as_u64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
        .unwrap_or_else(|| panic!("not a number: {v}"))
}

/// `agentledger verify --receipt FILE --public-key VKEY`, with no database:
/// whether it passed, and what it said.
fn verify_receipt(file: &std::path::Path, vkey: &str) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_agentledger"))
        .args(["verify", "--receipt"])
        .arg(file)
        .args(["--public-key", vkey])
        .env_remove("DATABASE_URL")
        .env_remove("AGENTLEDGER_ADMIN_DATABASE_URL")
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn hash(hex_text: &str) -> tlog_tiles::Hash {
    tlog_tiles::Hash(hex::decode(hex_text).unwrap().try_into().unwrap())
}

/// The checkpoint once its tree covers at least `size` leaves (the tree
/// follows the ledger a moment after each commit), verified.
async fn checkpoint(base: &str, verifiers: &VerifierList, size: u64) -> tlog_tiles::Checkpoint {
    let started = Instant::now();
    loop {
        let response = reqwest::get(format!("{base}/checkpoint")).await.unwrap();
        assert_eq!(response.status(), 200);
        assert!(response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain"));
        let text = response.text().await.unwrap();
        let note = Note::from_bytes(text.as_bytes()).unwrap();
        note.verify(verifiers)
            .unwrap_or_else(|e| panic!("the checkpoint does not verify: {e:?}\n{text}"));
        let parsed = tlog_tiles::Checkpoint::from_bytes(note.text()).unwrap();
        assert_eq!(parsed.origin(), ORIGIN);
        if parsed.size() >= size {
            return parsed;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the checkpoint stays at {} leaves",
            parsed.size()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn completed_workflow(base: &str, key: &str, request: &str) -> (String, Vec<Value>) {
    let id = gql(
        base,
        key,
        "mutation($r: String!) { submitWorkflow(request: $r) { id } }",
        json!({ "r": request }),
    )
    .await["submitWorkflow"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let started = Instant::now();
    loop {
        let data = gql(
            base,
            key,
            "query($id: ID!) { workflow(id: $id) { state } events(workflowId: $id) { position type } }",
            json!({ "id": id }),
        )
        .await;
        if data["workflow"]["state"] == "COMPLETED" {
            return (id, data["events"].as_array().unwrap().clone());
        }
        assert!(started.elapsed() < Duration::from_secs(30), "{data}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn checkpoints_and_proofs_pass_independent_verifiers() {
    let db = TestDatabase::create().await;
    let key = create_key(
        &db,
        "reviewer",
        &["auditor", "submitter", "viewer"],
        "default",
    );
    let (server, _config) = serve_with_config(
        &db,
        &format!("[server]\ncheckpoint_origin = \"{ORIGIN}\"\n"),
    );
    let base = &server.base;

    // The verifier key, from the API and from the well-known document.
    let keys = gql(
        base,
        &key,
        "{ ledgerKeys { keyId verifierKey retiredAt } }",
        json!({}),
    )
    .await;
    let vkey = keys["ledgerKeys"][0]["verifierKey"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(vkey.starts_with(&format!("{ORIGIN}+")), "{vkey}");
    let known: Value = reqwest::get(format!("{base}/.well-known/agentledger-key"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(known["verifier_key"], vkey.as_str());
    assert_eq!(known["checkpoint_origin"], ORIGIN);
    let verifiers = VerifierList::new(vec![Box::new(StandardVerifier::new(&vkey).unwrap())]);

    let (first_id, first_events) = completed_workflow(
        base,
        &key,
        "Summarise the attached quarterly report. Then count the words of the summary.",
    )
    .await;
    let last = first_events
        .iter()
        .map(|e| number(&e["position"]))
        .max()
        .unwrap();
    let old = checkpoint(base, &verifiers, last).await;

    // Every event of the workflow is in the checkpoint's tree.
    for event in &first_events {
        let position = number(&event["position"]);
        let proof = gql(
            base,
            &key,
            "query($p: Position!, $n: Position!) {
               inclusionProof(position: $p, treeSize: $n) { leafIndex treeSize leafHash hashes } }",
            json!({ "p": position, "n": old.size() }),
        )
        .await["inclusionProof"]
            .clone();
        let path: Vec<tlog_tiles::Hash> = proof["hashes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| hash(h.as_str().unwrap()))
            .collect();
        tlog_tiles::check_record(
            &path,
            old.size(),
            *old.hash(),
            number(&proof["leafIndex"]),
            hash(proof["leafHash"].as_str().unwrap()),
        )
        .unwrap_or_else(|e| panic!("{} at {position}: {e}", event["type"]));
    }

    // A second workflow later, the new checkpoint extends the old one.
    let (_, second_events) = completed_workflow(
        base,
        &key,
        "첨부된 분기 보고서를 요약해 주세요. 그다음 요약문의 단어 수를 세어 주세요.",
    )
    .await;
    let last = second_events
        .iter()
        .map(|e| number(&e["position"]))
        .max()
        .unwrap();
    let new = checkpoint(base, &verifiers, last).await;
    assert!(new.size() > old.size());
    let proof = gql(
        base,
        &key,
        "query($a: Position!, $b: Position!) { consistencyProof(fromSize: $a, toSize: $b) { hashes } }",
        json!({ "a": old.size(), "b": new.size() }),
    )
    .await;
    let path: Vec<tlog_tiles::Hash> = proof["consistencyProof"]["hashes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| hash(h.as_str().unwrap()))
        .collect();
    tlog_tiles::check_tree(&path, new.size(), *new.hash(), old.size(), *old.hash())
        .unwrap_or_else(|e| panic!("{} → {}: {e}", old.size(), new.size()));

    // A receipt from the API checks alone, with no database, under the
    // key kept apart; changed, it fails.
    let receipt = gql(
        base,
        &key,
        "query($id: ID!) { workflowReceipt(id: $id) }",
        json!({ "id": first_id }),
    )
    .await["workflowReceipt"]
        .clone();
    let file = common::TempFile(
        std::env::temp_dir().join(format!("receipt-{}.json", uuid::Uuid::new_v4())),
    );
    std::fs::write(&file.0, receipt.to_string()).unwrap();
    let checked = verify_receipt(&file.0, &vkey);
    assert!(checked.0, "{}", checked.1);
    assert!(
        checked.1.contains(&format!(
            "ok, versions 0 to {} of workflow-{first_id} ({} events)",
            first_events.len() - 1,
            first_events.len()
        )),
        "{}",
        checked.1
    );
    let mut changed = receipt.clone();
    changed["events"][1]["event"]["payload"]["changed"] = json!("바뀜");
    std::fs::write(&file.0, changed.to_string()).unwrap();
    let checked = verify_receipt(&file.0, &vkey);
    assert!(!checked.0 && checked.1.contains("FAILED"), "{}", checked.1);

    // Sizes beyond the tree, and positions no event holds, are refused.
    for query in [
        format!(
            "{{ inclusionProof(position: 1, treeSize: {}) {{ leafIndex }} }}",
            new.size() + 1_000
        ),
        "{ inclusionProof(position: 999999, treeSize: 1) { leafIndex } }".to_string(),
        format!(
            "{{ consistencyProof(fromSize: {}, toSize: {}) {{ hashes }} }}",
            new.size(),
            old.size()
        ),
    ] {
        let (_, body) = post(base, Some(&key), &query, &json!({})).await;
        assert_eq!(common::code(&body), Some("BAD_INPUT"), "{query}: {body}");
    }
    server.stop();

    // The command line: a digest taken now, then a proof for it, checked
    // against the digest's root before it is printed.
    let digest = common::TempFile(
        std::env::temp_dir().join(format!("digest-{}.json", uuid::Uuid::new_v4())),
    );
    let signed = common::agentledger(
        &["digest", "--output", &digest.0.to_string_lossy()],
        db.admin_url(),
    );
    assert!(
        signed.status.success(),
        "{}",
        String::from_utf8_lossy(&signed.stderr)
    );
    let digest_json: Value = serde_json::from_slice(&std::fs::read(&digest.0).unwrap()).unwrap();
    let position = number(&second_events[2]["position"]);
    let proved = common::agentledger(
        &[
            "prove",
            "--position",
            &position.to_string(),
            "--digest",
            &digest.0.to_string_lossy(),
        ],
        &db.service_url(),
    );
    assert!(
        proved.status.success(),
        "{}",
        String::from_utf8_lossy(&proved.stderr)
    );
    let proof: Value = serde_json::from_slice(&proved.stdout).unwrap();
    assert_eq!(proof["root"], digest_json["root"]);
    assert_eq!(number(&proof["tree_size"]), number(&digest_json["events"]));
    let path: Vec<tlog_tiles::Hash> = proof["hashes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| hash(h.as_str().unwrap()))
        .collect();
    tlog_tiles::check_record(
        &path,
        number(&proof["tree_size"]),
        hash(proof["root"].as_str().unwrap()),
        number(&proof["leaf_index"]),
        hash(proof["leaf_hash"].as_str().unwrap()),
    )
    .unwrap();
    let written = common::TempFile(
        std::env::temp_dir().join(format!("receipt-{}.json", uuid::Uuid::new_v4())),
    );
    let made = common::agentledger(
        &[
            "receipt",
            "--workflow",
            &first_id,
            "--output",
            &written.0.to_string_lossy(),
            "--checkpoint-origin",
            ORIGIN,
        ],
        db.admin_url(),
    );
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let checked = verify_receipt(&written.0, &vkey);
    assert!(checked.0, "{}", checked.1);
    let consistent = common::agentledger(
        &[
            "prove",
            "--from-size",
            &old.size().to_string(),
            "--to-size",
            &new.size().to_string(),
        ],
        &db.service_url(),
    );
    assert!(
        consistent.status.success(),
        "{}",
        String::from_utf8_lossy(&consistent.stderr)
    );

    // `verify` checks the stored tree against the events, and notices a
    // changed tile.
    let verified = common::agentledger(&["verify"], &db.service_url());
    let said = String::from_utf8_lossy(&verified.stdout);
    assert!(
        verified.status.success() && said.contains("the ledger's tree: ok"),
        "{said}"
    );
    db.admin_client()
        .await
        .batch_execute("UPDATE ledger_tiles SET hashes = set_byte(hashes, 0, get_byte(hashes, 0) # 255) WHERE level = 0 AND idx = 0")
        .await
        .unwrap();
    let verified = common::agentledger(&["verify"], &db.service_url());
    let said = String::from_utf8_lossy(&verified.stderr);
    assert!(
        !verified.status.success() && said.contains("the ledger's tree: BROKEN"),
        "{said}"
    );
}
