//! Crypto-shredding end to end on a real server and PostgreSQL: personal
//! text of a workflow submitted for a data subject is stored sealed; while
//! the subject's key exists the API shows it; after `forgetSubject` it is
//! unreadable everywhere (events, read models, replay, exports) and the
//! ledger still verifies.

mod common;

use std::time::Duration;

use agentledger_eventstore::testing::TestDatabase;
use agentledger_eventstore::EventStore;
use agentledger_projections::postgres::runner::Checkpoints;
use agentledger_projections::{PostgresReadModels, ReadModels};
use common::{agentledger, Server};
use serde_json::{json, Value};

async fn graphql(base: &str, query: &str, variables: Value) -> Value {
    let body = reqwest::Client::new()
        .post(format!("{base}/graphql"))
        .header("content-type", "application/json")
        .body(json!({ "query": query, "variables": variables }).to_string())
        .send()
        .await
        .expect("POST /graphql")
        .text()
        .await
        .unwrap();
    let value: Value = serde_json::from_str(&body).expect("JSON");
    assert!(value.get("errors").is_none(), "{value}");
    value["data"].clone()
}

/// Rows of every table that could hold text, as text, matching `needle`.
async fn rows_containing(db: &TestDatabase, needle: &str) -> Vec<String> {
    let admin = db.admin_client().await;
    let mut found = Vec::new();
    for table in [
        "events",
        "workflow_status",
        "workflow_subtasks",
        "audit_trail",
        "agent_metrics",
        "agent_tasks",
        "subject_keys",
        "projection_checkpoints",
    ] {
        let rows = admin
            .query(
                &format!("SELECT t::text FROM {table} t WHERE strpos(t::text, $1) > 0"),
                &[&needle],
            )
            .await
            .unwrap();
        found.extend(
            rows.iter()
                .map(|r| format!("{table}: {}", r.get::<_, String>(0))),
        );
    }
    found
}

const PERSONAL_NAME: &str = "김민수";
const PERSONAL_MAIL: &str = "minsu.kim@example.com";
const SUBJECT: &str = "customer-4711";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forgotten_subject_is_unreadable_everywhere_and_the_ledger_still_verifies() {
    let db = TestDatabase::create().await;
    let store = db.store().await;
    let server = Server::start(&[
        ("DATABASE_URL", &db.service_url()),
        ("AGENTLEDGER_ADMIN_DATABASE_URL", db.admin_url()),
        ("RUST_LOG", "warn"),
    ]);
    let base = server.base.clone();
    let mut events = store.subscribe_all(1);
    let submit = "mutation($r: String!, $i: String, $s: String) {
        submitWorkflow(request: $r, input: $i, subjectId: $s) { id request } }";
    let personal = graphql(
        &base,
        submit,
        json!({
            "r": format!("{PERSONAL_NAME}({PERSONAL_MAIL})의 보고서를 요약해 주세요. 그다음 단어 수를 세어 주세요."),
            "i": format!("{PERSONAL_NAME} 님은 2024년에 가입했습니다. 연락처 {PERSONAL_MAIL}."),
            "s": SUBJECT,
        }),
    )
    .await;
    let id = personal["submitWorkflow"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        personal["submitWorkflow"]["request"]
            .as_str()
            .unwrap()
            .starts_with(PERSONAL_NAME),
        "the submitter sees the request: {personal}"
    );
    let public = graphql(
        &base,
        submit,
        json!({ "r": "Public request: count the words of the notes.", "i": null, "s": null }),
    )
    .await;
    let public_id = public["submitWorkflow"]["id"].as_str().unwrap().to_string();
    // No tool fits: Lubit's reasons quote the plan, which quotes the request.
    graphql(
        &base,
        submit,
        json!({
            "r": format!("Phone {PERSONAL_NAME} at {PERSONAL_MAIL} about the unpaid invoice."),
            "i": null,
            "s": SUBJECT,
        }),
    )
    .await;

    // All three end; then the read models have caught up.
    let mut ended = 0;
    while ended < 3 {
        let event = tokio::time::timeout(Duration::from_secs(30), events.next())
            .await
            .expect("workflows complete")
            .unwrap()
            .unwrap();
        if [
            "WorkflowCompleted",
            "WorkflowRejected",
            "WorkflowFailed",
            "WorkflowFlagged",
        ]
        .contains(&event.event_type.as_str())
        {
            ended += 1;
        }
    }
    let checkpoints = Checkpoints::default();
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(checkpoints.clone().follow(db.service_url(), stop.clone()));
    let models = PostgresReadModels::new(store.pool().clone(), &checkpoints);
    models
        .wait_for(
            store.head_position().await.unwrap(),
            Duration::from_secs(30),
        )
        .await
        .unwrap();

    // Sealed at rest, readable through the API while the key exists.
    assert_eq!(
        rows_containing(&db, PERSONAL_MAIL).await,
        Vec::<String>::new()
    );
    assert_eq!(
        rows_containing(&db, PERSONAL_NAME).await,
        Vec::<String>::new()
    );
    assert!(
        !rows_containing(&db, "Public request").await.is_empty(),
        "the search finds plain text where there is some"
    );
    let query = "query($id: ID!) { workflow(id: $id) { state request
        subtasks { title output } decisions { kind rationale } } }";
    let before = graphql(&base, query, json!({ "id": id })).await;
    assert_eq!(before["workflow"]["state"], "COMPLETED", "{before}");
    assert!(before.to_string().contains(PERSONAL_MAIL), "{before}");

    // Forget the subject.
    let forgotten = graphql(
        &base,
        "mutation($s: String!) { forgetSubject(subjectId: $s) { destroyed keyId vacuumed } }",
        json!({ "s": SUBJECT }),
    )
    .await;
    assert_eq!(forgotten["forgetSubject"]["destroyed"], true, "{forgotten}");
    assert_eq!(forgotten["forgetSubject"]["vacuumed"], true, "{forgotten}");
    let key_id = forgotten["forgetSubject"]["keyId"]
        .as_str()
        .unwrap()
        .to_string();

    // The ledger still verifies, and the destruction is on record by key id.
    let verified = graphql(&base, "{ verifyLedger { ok checkedEvents } }", json!({})).await;
    assert_eq!(verified["verifyLedger"]["ok"], true, "{verified}");
    let recorded = graphql(
        &base,
        "{ events(fromPosition: 1, first: 100) { streamId type payload } }",
        json!({}),
    )
    .await;
    let destroyed: Vec<&Value> = recorded["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["streamId"] == "privacy-keys")
        .collect();
    assert_eq!(destroyed.len(), 1, "{recorded}");
    assert_eq!(destroyed[0]["type"], "SubjectKeyDestroyed");
    assert_eq!(destroyed[0]["payload"]["key_id"], key_id.as_str());
    let recorded = recorded.to_string();
    assert!(
        !recorded.contains(SUBJECT),
        "the subject id is not recorded: {recorded}"
    );

    // Nothing readable anywhere: the API...
    let after = graphql(&base, query, json!({ "id": id })).await;
    assert_eq!(after["workflow"]["request"], "[erased]", "{after}");
    let after_text = after.to_string();
    assert!(
        !after_text.contains(PERSONAL_MAIL) && !after_text.contains(PERSONAL_NAME),
        "{after}"
    );
    assert!(after["workflow"]["subtasks"]
        .as_array()
        .unwrap()
        .iter()
        .all(|s| s["title"] == "[erased]"));
    let replay = graphql(
        &base,
        "query($id: ID!) { replay(workflowId: $id) { rationale summary event { payload } state { request subtasks { title output } } } }",
        json!({ "id": id }),
    )
    .await
    .to_string();
    assert!(
        !replay.contains(PERSONAL_MAIL) && !replay.contains(PERSONAL_NAME),
        "{replay}"
    );
    assert!(replay.contains("[erased]"));
    // ...the database (events, read models, keys)...
    assert_eq!(
        rows_containing(&db, PERSONAL_MAIL).await,
        Vec::<String>::new()
    );
    assert_eq!(rows_containing(&db, SUBJECT).await, Vec::<String>::new());
    // ...and exports, which still verify offline.
    let dir = std::env::temp_dir().join(format!("agentledger-privacy-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("export.jsonl");
    let exported = agentledger(
        &[
            "export",
            "--workflow",
            &id,
            "--output",
            file.to_str().unwrap(),
        ],
        &db.service_url(),
    );
    assert!(
        exported.status.success(),
        "{}",
        String::from_utf8_lossy(&exported.stderr)
    );
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(!text.contains(PERSONAL_MAIL) && !text.contains(PERSONAL_NAME));
    let offline = agentledger(
        &["verify", "--export", file.to_str().unwrap()],
        "postgres://nowhere.invalid/x",
    );
    assert!(
        offline.status.success(),
        "{}",
        String::from_utf8_lossy(&offline.stderr)
    );
    let cli_replay = agentledger(&["replay", &id, "--json"], &db.service_url());
    assert!(cli_replay.status.success());
    let cli_text = String::from_utf8_lossy(&cli_replay.stdout);
    assert!(
        !cli_text.contains(PERSONAL_MAIL) && cli_text.contains("[erased]"),
        "{cli_text}"
    );
    std::fs::remove_dir_all(&dir).unwrap();

    // The workflow without a subject is untouched.
    let other = graphql(
        &base,
        "query($id: ID!) { workflow(id: $id) { request } }",
        json!({ "id": public_id }),
    )
    .await;
    assert_eq!(
        other["workflow"]["request"],
        "Public request: count the words of the notes."
    );
    stop.cancel();
}
