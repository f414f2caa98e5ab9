//! The REST door (`/api/…`) of a real `agentledger serve` on real
//! PostgreSQL, called the way the replaced system's clients call it: submit
//! in English and Korean, poll the workflow to its end, and get the same
//! refusals as GraphQL gives (as HTTP statuses with a JSON error body),
//! with nothing written for any of them.

mod common;

use std::time::Duration;

use agentledger_eventstore::testing::TestDatabase;
use agentledger_eventstore::EventStore;
use common::{create_key, serve_with_config};
use serde_json::{json, Value};

const ENGLISH: &str =
    "Summarise the attached quarterly report. Then count the words of the summary.";
const KOREAN: &str = "다음 글을 요약해 주세요. 그다음 단어 수를 세어 주세요.";

struct Door {
    base: String,
    http: reqwest::Client,
}

impl Door {
    async fn post(&self, credential: Option<&str>, body: &Value) -> (u16, Value) {
        let mut request = self
            .http
            .post(format!("{}/api/workflow", self.base))
            .header("content-type", "application/json")
            .body(body.to_string());
        if let Some(credential) = credential {
            request = request.bearer_auth(credential);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn get(&self, credential: Option<&str>, path: &str) -> (u16, Value) {
        let mut request = self.http.get(format!("{}{path}", self.base));
        if let Some(credential) = credential {
            request = request.bearer_auth(credential);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Polls the workflow as a REST client does until it is final.
    async fn until_final(&self, credential: &str, id: &str) -> Value {
        let final_states = ["COMPLETED", "REJECTED", "FAILED", "FLAGGED", "CANCELLED"];
        let poll = async {
            loop {
                let (status, body) = self
                    .get(Some(credential), &format!("/api/workflow/{id}"))
                    .await;
                if status == 200 && final_states.contains(&body["state"].as_str().unwrap_or("")) {
                    return body;
                }
                assert!(status == 200 || status == 404, "{status}: {body}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(60), poll)
            .await
            .unwrap_or_else(|_| panic!("workflow {id} did not end within 60 s"))
    }
}

/// Checks `document` with an OpenAPI validator maintained elsewhere
/// (`openapi-spec-validator`, from PyPI); skipped, saying so, without
/// Python.
fn validate_openapi(document: &Value) {
    let requirements = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openapi");
    let Some(python) = common::python_venv(&requirements, "openapi-venv") else {
        return;
    };
    let file = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("openapi-{}.json", uuid::Uuid::new_v4()));
    std::fs::write(&file, document.to_string()).unwrap();
    let checked = std::process::Command::new(python)
        .args(["-m", "openapi_spec_validator"])
        .arg(&file)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&file);
    assert!(
        checked.status.success(),
        "the OpenAPI document is not valid: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
}

fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_rest_door_submits_reads_and_refuses_as_graphql_does() {
    let db = TestDatabase::create().await;
    let submitter = create_key(&db, "client", &["submitter"], "default");
    let viewer = create_key(&db, "dashboard", &["viewer"], "default");
    let stranger = create_key(&db, "acme-client", &["submitter"], "acme");
    let (server, _config) = serve_with_config(&db, "");
    let door = Door {
        base: server.base.clone(),
        http: reqwest::Client::new(),
    };

    // Health and the OpenAPI document need no credential.
    let (status, health) = door.get(None, "/api/health").await;
    assert_eq!((status, health["status"].as_str()), (200, Some("ok")));
    let (status, document) = door.get(None, "/api/openapi.json").await;
    assert_eq!(status, 200);
    assert!(document["openapi"].as_str().unwrap().starts_with("3."));
    for path in ["/api/workflow", "/api/workflow/{id}", "/api/health"] {
        assert!(document["paths"][path].is_object(), "{path} documented");
    }
    let fields = &document["components"]["schemas"]["SubmitRequest"]["properties"];
    for field in ["request", "priority", "input", "idempotency_key"] {
        assert!(fields[field].is_object(), "{field} documented");
    }
    validate_openapi(&document);

    // Submissions in both languages; an idempotent resend.
    let (status, english) = door
        .post(Some(&submitter), &json!({ "request": ENGLISH }))
        .await;
    assert_eq!(status, 201, "{english}");
    // As of its own write, or later: the agents do not wait for the answer.
    let states = [
        "SUBMITTED",
        "ANALYSING",
        "GATING",
        "EXECUTING",
        "REVIEWING",
        "COMPLETED",
    ];
    assert!(
        states.contains(&english["state"].as_str().unwrap_or_default()),
        "{english}"
    );
    let korean_body = json!({
        "request": KOREAN,
        "priority": "high",
        "input": "분기 매출은 전년 대비 12% 증가했습니다. 신규 고객이 늘었습니다.",
        "idempotency_key": "order-2026-0001",
    });
    let (status, korean) = door.post(Some(&submitter), &korean_body).await;
    assert_eq!(status, 201, "{korean}");
    let (status, again) = door.post(Some(&submitter), &korean_body).await;
    assert_eq!((status, &again["id"]), (201, &korean["id"]), "{again}");
    let (status, reused) = door
        .post(
            Some(&submitter),
            &json!({ "request": ENGLISH, "idempotency_key": "order-2026-0001" }),
        )
        .await;
    assert_eq!((status, code(&reused)), (409, "CONFLICT"), "{reused}");

    for (submitted, request) in [(&english, ENGLISH), (&korean, KOREAN)] {
        let id = submitted["id"].as_str().unwrap();
        let done = door.until_final(&submitter, id).await;
        assert_eq!(done["state"], "COMPLETED", "{done}");
        assert_eq!(done["request"], request);
        assert_eq!(done["progress"]["done"], done["progress"]["total"]);
        let subtasks = done["subtasks"].as_array().unwrap();
        assert!(!subtasks.is_empty());
        for subtask in subtasks {
            assert_eq!(subtask["state"], "SUCCEEDED", "{subtask}");
            assert!(subtask["output"].is_string(), "{subtask}");
            assert!(subtask["depends_on"].is_array(), "snake_case: {subtask}");
        }
        assert!(done["completed_at"].is_string(), "{done}");
        assert_eq!(done["ethics"]["passed"], true, "{done}");
    }

    // Refusals, each with its status and code, nothing written.
    let store = db.store().await;
    let head = store.head_position().await.unwrap();
    let refusals: Vec<(Option<&str>, Value, u16, &str)> = vec![
        (None, json!({ "request": ENGLISH }), 401, "UNAUTHENTICATED"),
        (
            Some("alk_not_a_key"),
            json!({ "request": ENGLISH }),
            401,
            "UNAUTHENTICATED",
        ),
        (
            Some(&viewer),
            json!({ "request": ENGLISH }),
            403,
            "FORBIDDEN",
        ),
        (
            Some(&submitter),
            json!({ "request": "  " }),
            400,
            "BAD_INPUT",
        ),
        (
            Some(&submitter),
            json!({ "text": ENGLISH }),
            400,
            "BAD_INPUT",
        ),
        (
            Some(&submitter),
            json!({ "request": ENGLISH, "priority": "urgent" }),
            400,
            "BAD_INPUT",
        ),
        (
            Some(&submitter),
            json!({ "request": ENGLISH, "priority": "critical" }),
            403,
            "FORBIDDEN",
        ),
        (
            Some(&submitter),
            json!({ "request": "가".repeat(20_000) }),
            400,
            "BAD_INPUT",
        ),
    ];
    for (credential, body, status, expected) in refusals {
        let (got, answer) = door.post(credential, &body).await;
        assert_eq!((got, code(&answer)), (status, expected), "{body}: {answer}");
        assert!(answer["error"]["message"].is_string(), "{answer}");
    }
    let not_json = door
        .http
        .post(format!("{}/api/workflow", door.base))
        .bearer_auth(&submitter)
        .header("content-type", "application/json")
        .body("{\"request\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(not_json.status().as_u16(), 400);
    let plain = door
        .http
        .post(format!("{}/api/workflow", door.base))
        .bearer_auth(&submitter)
        .header("content-type", "text/plain")
        .body(ENGLISH)
        .send()
        .await
        .unwrap();
    assert_eq!(plain.status().as_u16(), 415);
    let plain: Value = plain.json().await.unwrap();
    assert_eq!(code(&plain), "BAD_INPUT");
    // A body declaring 3 MiB is refused before it is read (the server may
    // close before a client could finish writing it: read the status only).
    let address = door.base.trim_start_matches("http://").to_string();
    let mut tcp = tokio::net::TcpStream::connect(&address).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tcp.write_all(
        format!(
            "POST /api/workflow HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {submitter}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            3 << 20
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut status_line = [0u8; 12];
    tcp.read_exact(&mut status_line).await.unwrap();
    assert_eq!(&status_line, b"HTTP/1.1 413");
    drop(tcp);
    assert_eq!(
        store.head_position().await.unwrap(),
        head,
        "no refused request wrote anything"
    );

    // Reads: unknown, malformed, another tenant's.
    let id = english["id"].as_str().unwrap();
    let unknown = uuid::Uuid::now_v7();
    let (status, body) = door
        .get(Some(&submitter), &format!("/api/workflow/{unknown}"))
        .await;
    assert_eq!((status, code(&body)), (404, "NOT_FOUND"), "{body}");
    let (status, body) = door.get(Some(&submitter), "/api/workflow/not-an-id").await;
    assert_eq!((status, code(&body)), (400, "BAD_INPUT"), "{body}");
    let (status, body) = door
        .get(Some(&stranger), &format!("/api/workflow/{id}"))
        .await;
    assert_eq!((status, code(&body)), (404, "NOT_FOUND"), "{body}");
    let (status, body) = door.get(None, &format!("/api/workflow/{id}")).await;
    assert_eq!((status, code(&body)), (401, "UNAUTHENTICATED"), "{body}");
    let (status, body) = door
        .get(Some(&viewer), &format!("/api/workflow/{id}"))
        .await;
    assert_eq!(
        (status, body["id"].as_str()),
        (200, Some(id)),
        "a viewer reads"
    );
    assert!(server.stop().success());
}
