//! Self-recovery of a real `agentledger serve` on real PostgreSQL, with no
//! operator: `/ready` goes false while the database cannot be reached and
//! while the projections cannot apply events, and true again by itself
//! when the cause goes; the projection runner's restarts are counted in
//! `/metrics`; what was submitted meanwhile is projected in the end.

mod common;

use std::time::{Duration, Instant};

use agentledger_eventstore::testing::{connect, with_database, TestDatabase, SERVICE_ROLE};
use common::{create_key, post, serve_with_config};
use serde_json::{json, Value};

const REQUEST: &str =
    "Summarise the attached quarterly report. Then count the words of the summary.";

async fn ready(base: &str) -> (u16, Value) {
    let response = reqwest::get(format!("{base}/ready")).await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Polls `/ready` until it answers `status` (every 100 ms, at most 60 s);
/// the body it answered then, and how long it took.
async fn ready_becomes(base: &str, status: u16) -> (Value, Duration) {
    ready_becomes_with(base, status, |_| true).await
}

/// Polls `/ready` until it answers `status` with a body `wanted` accepts.
async fn ready_becomes_with(
    base: &str,
    status: u16,
    wanted: impl Fn(&Value) -> bool,
) -> (Value, Duration) {
    let started = Instant::now();
    loop {
        let (now, body) = ready(base).await;
        if now == status && wanted(&body) {
            return (body, started.elapsed());
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "/ready still answers {now} after 60 s, not {status}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn restarts(base: &str, task: &str) -> u64 {
    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let series = format!("agentledger_task_restarts_total{{task=\"{task}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .unwrap_or_else(|| panic!("no {series} in /metrics:\n{text}"))
        .parse()
        .unwrap()
}

async fn submit(base: &str, key: &str) -> String {
    let (status, body) = post(
        base,
        Some(key),
        "mutation($r: String!) { submitWorkflow(request: $r) { id } }",
        &json!({ "r": REQUEST }),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body["data"]["submitWorkflow"]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("{body}"))
        .to_string()
}

async fn state_in_read_model(base: &str, key: &str, id: &str) -> Option<String> {
    let (_, body) = post(
        base,
        Some(key),
        "query($id: ID!) { workflow(id: $id) { state } }",
        &json!({ "id": id }),
    )
    .await;
    body["data"]["workflow"]["state"]
        .as_str()
        .map(str::to_string)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_projection_that_cannot_write_makes_the_node_unready_until_it_can() {
    let db = TestDatabase::create().await;
    let key = create_key(&db, "ops", &["submitter", "viewer"], "default");
    let (server, _config) = serve_with_config(&db, "");
    let base = &server.base;
    ready_becomes(base, 200).await;
    assert_eq!(restarts(base, "projections").await, 0);
    assert_eq!(restarts(base, "agents").await, 0);

    // The service role loses the right to write one read model: every
    // batch the runner applies fails.
    let owner = db.admin_client().await;
    owner
        .batch_execute(&format!("REVOKE INSERT ON audit_trail FROM {SERVICE_ROLE}"))
        .await
        .unwrap();
    let id = submit(base, &key).await;
    let (body, took) = ready_becomes(base, 503).await;
    let problems = body["problems"].to_string();
    assert!(problems.contains("projections: restarting after"), "{body}");
    assert!(problems.contains("permission denied"), "{body}");
    println!("unready {took:?} after the projections began to fail: {problems}");
    assert!(restarts(base, "projections").await >= 1);

    // The right comes back: ready again by itself, and what was recorded
    // meanwhile is projected.
    owner
        .batch_execute(&format!("GRANT INSERT ON audit_trail TO {SERVICE_ROLE}"))
        .await
        .unwrap();
    let (_, took) = ready_becomes(base, 200).await;
    println!("ready again {took:?} after the grant");
    let started = Instant::now();
    while state_in_read_model(base, &key, &id).await.as_deref() != Some("COMPLETED") {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "never projected"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let counted = restarts(base, "projections").await;
    println!("projection runner restarts counted: {counted}");
    assert!(counted >= 1);
    server.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_node_is_unready_while_its_database_is_unreachable_and_recovers_alone() {
    let db = TestDatabase::create().await;
    let key = create_key(&db, "ops", &["submitter", "viewer"], "default");
    let (server, _config) = serve_with_config(&db, "");
    let base = &server.base;
    ready_becomes(base, 200).await;
    let before = submit(base, &key).await;

    // The database refuses new connections and drops every open one: as
    // far as the service can tell, it is gone.
    let maintenance = connect(&with_database(db.admin_url(), "postgres", None)).await;
    let name = db.name();
    maintenance
        .batch_execute(&format!(
            "ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS false;
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity
              WHERE datname = '{name}' AND pid <> pg_backend_pid();"
        ))
        .await
        .unwrap();
    // Unready at once, maybe first for a projection run that lost its
    // connection; the database's own probe names it within the bound.
    let (body, took) = ready_becomes_with(base, 503, |body| {
        body["problems"].as_array().is_some_and(|p| {
            p.iter()
                .any(|p| p.as_str().is_some_and(|p| p.starts_with("database:")))
        })
    })
    .await;
    let problems = body["problems"].to_string();
    // What the server said, with its SQLSTATE, not a bare "db error".
    assert!(!problems.contains("db error\""), "{body}");
    assert!(
        problems.contains("(57P01)") || problems.contains("(55000)"),
        "{body}"
    );
    println!("unready {took:?} after the database went away: {body}");

    maintenance
        .batch_execute(&format!("ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS true"))
        .await
        .unwrap();
    let (_, took) = ready_becomes(base, 200).await;
    println!("ready again {took:?} after the database came back");

    // It works again, with no restart of the process: the workflow from
    // before is projected, a new one completes.
    let after = submit(base, &key).await;
    let started = Instant::now();
    for id in [&before, &after] {
        while state_in_read_model(base, &key, id).await.as_deref() != Some("COMPLETED") {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "{id} never completed after the database came back"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    server.stop();
}
