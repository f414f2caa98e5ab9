//! The web console in a real browser: `console/tests/browser.mjs`
//! (Playwright driving Debian's Chromium) against a real `agentledger
//! serve` on real PostgreSQL, with three people's API keys. It signs in,
//! submits requests from the page and watches them complete live, decides
//! an escalation from the inbox (four eyes refused first), steps a replay
//! back, exports it, tampers with one stored event and sees the replay
//! flag it, and checks every page with axe-core and at a phone's width.
//! Screenshots go to `target/console-artifacts/`.
//!
//! Sign-in at an OpenID Connect issuer is driven too, against a small
//! issuer in this test that insists on PKCE (S256): it hands out a code
//! only for a challenge and a token only for the verifier that matches it.
//!
//! Skipped, saying why, only where Node.js or Chromium is not installed
//! (`ops/test.sh` installs Chromium when it is missing).

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use agentledger_eventstore::testing::TestDatabase;
use axum::extract::{Form, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use common::{create_key, serve_with_config, TempFile};
use serde_json::json;
use sha2::Digest;

const CLIENT: &str = "agentledger-console";
const AUDIENCE: &str = "agentledger";
const SECRET: &str = "console-test-secret-of-enough-length";

/// A small OpenID Connect issuer: discovery, an authorization endpoint that
/// signs the person in at once, and a token endpoint that checks PKCE.
#[derive(Clone, Default)]
struct Issuer {
    url: String,
    /// code → (challenge, redirect URI)
    codes: Arc<Mutex<HashMap<String, (String, String)>>>,
    /// Token requests refused, and why (the test fails on any).
    refused: Arc<Mutex<Vec<String>>>,
}

fn cors(response: impl IntoResponse) -> Response {
    let mut response = response.into_response();
    let headers = response.headers_mut();
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, "*".parse().unwrap());
    headers.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, "*".parse().unwrap());
    response
}

async fn discovery(State(issuer): State<Issuer>) -> Response {
    cors(Json(json!({
        "issuer": issuer.url,
        "authorization_endpoint": format!("{}/authorize", issuer.url),
        "token_endpoint": format!("{}/token", issuer.url),
        "response_types_supported": ["code"],
        "code_challenge_methods_supported": ["S256"],
        "authorization_response_iss_parameter_supported": true,
    })))
}

async fn authorize(
    State(issuer): State<Issuer>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let field = |k: &str| q.get(k).cloned().unwrap_or_default();
    if field("client_id") != CLIENT
        || field("response_type") != "code"
        || field("code_challenge_method") != "S256"
        || field("code_challenge").len() != 43
    {
        return (StatusCode::BAD_REQUEST, format!("refused: {q:?}")).into_response();
    }
    let code = uuid::Uuid::new_v4().to_string();
    issuer.codes.lock().unwrap().insert(
        code.clone(),
        (field("code_challenge"), field("redirect_uri")),
    );
    let mut back = reqwest::Url::parse(&field("redirect_uri")).unwrap();
    back.query_pairs_mut()
        .append_pair("code", &code)
        .append_pair("state", &field("state"))
        .append_pair("iss", &issuer.url);
    Redirect::to(back.as_str()).into_response()
}

async fn token(
    State(issuer): State<Issuer>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let field = |k: &str| form.get(k).cloned().unwrap_or_default();
    let Some((challenge, redirect)) = issuer.codes.lock().unwrap().remove(&field("code")) else {
        issuer
            .refused
            .lock()
            .unwrap()
            .push(format!("unknown code: {form:?}"));
        return cors((
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "invalid_grant"})),
        ));
    };
    let computed = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(sha2::Sha256::digest(field("code_verifier").as_bytes()));
    if computed != challenge || field("redirect_uri") != redirect || field("client_id") != CLIENT {
        issuer
            .refused
            .lock()
            .unwrap()
            .push(format!("PKCE or redirect mismatch: {form:?}"));
        return cors((
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "invalid_grant"})),
        ));
    }
    let now = chrono::Utc::now().timestamp();
    let claims = json!({
        "iss": issuer.url, "aud": AUDIENCE, "sub": "u-hana", "name": "hana (SSO)",
        "exp": now + 600, "iat": now, "roles": ["operator", "viewer"], "tenant": "default",
    });
    let access_token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    cors(Json(json!({
        "access_token": access_token, "token_type": "Bearer", "expires_in": 600,
    })))
}

/// Starts the issuer on a loopback port.
async fn start_issuer() -> Issuer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let issuer = Issuer {
        url: format!("http://{}", listener.local_addr().unwrap()),
        ..Issuer::default()
    };
    let app = Router::new()
        .route("/.well-known/openid-configuration", get(discovery))
        .route("/authorize", get(authorize))
        .route(
            "/token",
            post(token).options(|| async { cors(StatusCode::NO_CONTENT) }),
        )
        .with_state(issuer.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    issuer
}

fn chromium() -> Option<PathBuf> {
    let path = std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    path.exists().then_some(path)
}

/// `console/node_modules`, installed from the lock file when missing.
fn node_modules(console: &Path) -> bool {
    if Command::new("node").arg("--version").output().is_err() {
        println!("skipped: Node.js is not installed");
        return false;
    }
    if !console.join("node_modules/playwright-core").exists() {
        let status = Command::new("npm")
            .args(["ci", "--no-fund", "--no-audit"])
            .current_dir(console)
            .status()
            .expect("npm runs");
        assert!(status.success(), "npm ci in console/ failed");
    }
    true
}

#[tokio::test(flavor = "multi_thread")]
async fn people_use_the_console_in_a_browser() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let console = root.join("console");
    let Some(browser) = chromium() else {
        println!("skipped: Chromium is not installed (apt-get install chromium)");
        return;
    };
    if !node_modules(&console) {
        return;
    }
    let db = TestDatabase::create().await;
    let ada = create_key(&db, "ada", &["submitter", "operator"], "default");
    let grace = create_key(&db, "grace", &["operator"], "default");
    let alan = create_key(&db, "alan", &["auditor"], "default");
    let issuer = start_issuer().await;
    let secret =
        TempFile(std::env::temp_dir().join(format!("console-{}.secret", uuid::Uuid::new_v4())));
    std::fs::write(&secret.0, SECRET).unwrap();
    let (server, _config) = serve_with_config(
        &db,
        &format!(
            "[auth]\njwt_issuer = \"{}\"\njwt_audience = \"{AUDIENCE}\"\n\
             jwt_hs256_secret_file = \"{}\"\nconsole_client_id = \"{CLIENT}\"\n",
            issuer.url,
            secret.0.display()
        ),
    );
    let artifacts = root.join("target/console-artifacts");

    // The page's policy: scripts, styles and connections to itself (and
    // the issuer), nothing inline, no framing.
    let page = reqwest::get(format!("{}/", server.base)).await.unwrap();
    let policy = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    for directive in [
        "default-src 'none'",
        "script-src 'self';",
        "style-src 'self';",
        "frame-ancestors 'none'",
    ] {
        assert!(policy.contains(directive), "{policy}");
    }
    assert!(
        policy.contains(&format!("connect-src 'self' {}", issuer.url)),
        "{policy}"
    );
    assert!(!policy.contains("unsafe"), "{policy}");

    let started = std::time::Instant::now();
    let status = tokio::task::spawn_blocking({
        let base = server.base.clone();
        let admin = db.admin_url().to_string();
        move || {
            Command::new("node")
                .arg("tests/browser.mjs")
                .current_dir(&console)
                .env("AGENTLEDGER_URL", base)
                .env("KEY_SUBMITTER", ada)
                .env("KEY_OPERATOR", grace)
                .env("KEY_AUDITOR", alan)
                .env("OIDC_ISSUER_HOST", "127.0.0.1")
                .env("ADMIN_DATABASE_URL", admin)
                .env("CHROMIUM", browser)
                .env("ARTIFACTS", &artifacts)
                .status()
                .expect("node runs")
        }
    })
    .await
    .unwrap();
    println!(
        "browser test: {:.1} s; screenshots in target/console-artifacts/",
        started.elapsed().as_secs_f64()
    );
    assert!(status.success(), "the browser test failed: {status}");
    // The receipt the console downloaded checks with no database, under the
    // verifier key the server publishes.
    let known: serde_json::Value =
        reqwest::get(format!("{}/.well-known/agentledger-key", server.base))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    let checked = Command::new(env!("CARGO_BIN_EXE_agentledger"))
        .args(["verify", "--receipt"])
        .arg(root.join("target/console-artifacts/receipt.json"))
        .args(["--public-key", known["verifier_key"].as_str().unwrap()])
        .env_remove("DATABASE_URL")
        .env_remove("AGENTLEDGER_ADMIN_DATABASE_URL")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&checked.stdout).to_string()
        + &String::from_utf8_lossy(&checked.stderr);
    assert!(
        checked.status.success() && said.contains(": ok, versions 0 to"),
        "{said}"
    );
    println!("{}", said.trim());
    assert_eq!(*issuer.refused.lock().unwrap(), Vec::<String>::new());
    assert!(
        issuer.codes.lock().unwrap().is_empty(),
        "every code was redeemed"
    );
    server.stop();
}
