//! End-to-end: the real `agentledger` binary, on a random port, in memory and
//! on a real PostgreSQL database.

use std::process::Command;

use agentledger_eventstore::testing::TestDatabase;

mod common;

use common::Server;

async fn health(base: &str) -> serde_json::Value {
    let response = reqwest::get(format!("{base}/health"))
        .await
        .expect("GET /health");
    assert_eq!(response.status(), 200);
    serde_json::from_str(&response.text().await.unwrap()).expect("JSON body")
}

#[tokio::test]
async fn serve_without_a_database_runs_in_memory_and_stops_cleanly_on_sigterm() {
    let server = Server::start(&[]);
    let body = health(&server.base).await;
    assert_eq!(body["status"], "ok");
    assert_eq!(body["store"], "in-memory");
    assert_eq!(body["profile"], "dev");
    assert!(server.stop().success(), "graceful shutdown exits 0");
}

#[tokio::test]
async fn serve_with_a_database_migrates_it_and_uses_postgres() {
    let db = TestDatabase::create().await;
    let (service, admin) = (db.service_url(), db.admin_url().to_string());
    let server = Server::start(&[
        ("DATABASE_URL", &service),
        ("AGENTLEDGER_ADMIN_DATABASE_URL", &admin),
    ]);
    let body = health(&server.base).await;
    assert_eq!(body["store"], "postgres");
    assert!(server.stop().success());
}

#[tokio::test]
async fn migrate_applies_nothing_twice() {
    let db = TestDatabase::create().await; // already migrated once
    let output = Command::new(env!("CARGO_BIN_EXE_agentledger"))
        .args(["migrate"])
        .env("DATABASE_URL", db.admin_url())
        .env_remove("AGENTLEDGER_ADMIN_DATABASE_URL")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        "0 migration(s) applied"
    );
}

#[test]
fn dev_profile_refuses_a_public_address_unless_told() {
    let output = Command::new(env!("CARGO_BIN_EXE_agentledger"))
        .args(["serve", "--listen", "0.0.0.0:0"])
        .env_remove("DATABASE_URL")
        .env_remove("AGENTLEDGER_PROFILE")
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--allow-non-loopback-dev"));
}

#[test]
fn a_database_that_cannot_be_reached_is_a_clear_error() {
    let output = Command::new(env!("CARGO_BIN_EXE_agentledger"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
        .env_remove("AGENTLEDGER_ADMIN_DATABASE_URL")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("applying migrations"), "{stderr}");
}
