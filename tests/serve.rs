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

#[test]
fn staging_and_prod_refuse_to_run_without_a_database() {
    for profile in ["staging", "prod"] {
        let output = Command::new(env!("CARGO_BIN_EXE_agentledger"))
            .args(["serve", "--listen", "127.0.0.1:0", "--profile", profile])
            .env_remove("DATABASE_URL")
            .env_remove("AGENTLEDGER_ADMIN_DATABASE_URL")
            .output()
            .unwrap();
        assert!(!output.status.success(), "{profile}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("set DATABASE_URL"), "{profile}: {stderr}");
    }
}

#[test]
fn a_configuration_file_with_an_unknown_key_is_refused_by_name() {
    let dir = std::env::temp_dir().join(format!("agentledger-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.toml");
    std::fs::write(&path, "[graphql]\nmax_pages = 5\n").unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_agentledger"))
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&path)
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("max_pages") && stderr.contains("bad.toml"),
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn limits_come_from_the_configuration_file() {
    let dir = std::env::temp_dir().join(format!("agentledger-config-ok-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("small.toml");
    std::fs::write(&path, "[graphql]\nmax_page = 5\n").unwrap();
    let server = Server::start(&[("AGENTLEDGER_CONFIG", path.to_str().unwrap())]);
    let query = |first: u32| {
        let base = server.base.clone();
        async move {
            reqwest::Client::new()
                .post(format!("{base}/graphql"))
                .header("content-type", "application/json")
                .body(format!(
                    "{{\"query\": \"{{ workflows(first: {first}) {{ edges {{ cursor }} }} }}\"}}"
                ))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        }
    };
    assert!(!query(5).await.contains("errors"));
    assert!(query(6).await.contains("BAD_INPUT"));
    assert!(server.stop().success());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// GraphiQL loads nothing from another origin: every script and stylesheet
/// the page names is a path on this service, served from the binary with the
/// bytes `ops/vendor-graphiql.sh` fetched (SHA256SUMS), under a policy that
/// forbids other origins. Where introspection is off, none of it is served.
#[tokio::test]
async fn graphiql_is_served_from_the_binary_and_only_where_introspection_is_on() {
    use sha2::Digest;
    let server = Server::start(&[]);
    let client = reqwest::Client::new();
    let page = client
        .get(format!("{}/graphql", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let policy = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(policy.contains("script-src 'self'"), "{policy}");
    assert!(policy.contains("connect-src 'self'"), "{policy}");
    let html = page.text().await.unwrap();
    let references: Vec<&str> = html
        .split(['"', '\''])
        .filter(|s| s.ends_with(".js") || s.ends_with(".css"))
        .collect();
    assert!(references.len() >= 5, "the page names its assets: {html}");
    assert!(
        !html.contains("//unpkg") && !html.contains("https://"),
        "{html}"
    );

    let sums = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/api/assets/graphiql/SHA256SUMS"
    ))
    .unwrap();
    let mut vendored = 0;
    for path in &references {
        assert!(path.starts_with("/graphql/assets/"), "same origin: {path}");
        let response = client
            .get(format!("{}{path}", server.base))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{path}");
        let kind = response.headers()["content-type"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(
            kind.starts_with(if path.ends_with(".js") {
                "text/javascript"
            } else {
                "text/css"
            }),
            "{path}: {kind}"
        );
        let body = response.bytes().await.unwrap();
        let name = path.rsplit('/').next().unwrap();
        if let Some(line) = sums.lines().find(|l| l.ends_with(&format!("  {name}"))) {
            assert_eq!(
                hex::encode(sha2::Sha256::digest(&body)),
                line.split_whitespace().next().unwrap(),
                "{name} is the file fetched from the registry"
            );
            vendored += 1;
        }
    }
    assert_eq!(vendored, 4, "graphiql, its stylesheet, react and react-dom");
    let missing = client
        .get(format!("{}/graphql/assets/..%2FCargo.toml", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    assert!(server.stop().success());

    let server = Server::start(&[("AGENTLEDGER_CONFIG", &closed_config())]);
    for path in ["/graphql", "/graphql/assets/graphiql.min.js"] {
        let response = client
            .get(format!("{}{path}", server.base))
            .send()
            .await
            .unwrap();
        assert!(
            response.status() == 404 || response.status() == 405,
            "{path} is not served without introspection: {}",
            response.status()
        );
    }
    assert!(server.stop().success());
}

fn closed_config() -> String {
    let dir = std::env::temp_dir().join(format!("agentledger-closed-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("closed.toml");
    std::fs::write(&path, "[graphql]\nintrospection = false\n").unwrap();
    path.to_str().unwrap().to_owned()
}
