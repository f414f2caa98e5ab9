//! End-to-end: the hard limits of a real `agentledger serve` with
//! authentication required: request rates per credential and per address
//! (429, `Retry-After`, `RATE_LIMITED`, and recovery), a flood of
//! subscriptions on one socket, sockets per credential, the
//! `connection_init` timeout, oversized messages, browser origins and
//! non-JSON posts. Work goes on meanwhile.

mod common;

use std::time::{Duration, Instant};

use agentledger_eventstore::testing::TestDatabase;
use common::{code, create_key, post, Server, TempFile};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

struct Limited {
    _db: TestDatabase,
    server: Server,
    key: String,
    _config: TempFile,
}

async fn start(config: &str) -> Limited {
    let db = TestDatabase::create().await;
    let key = create_key(&db, "app", &["submitter", "viewer"], "default");
    let path = std::env::temp_dir().join(format!("agentledger-{}.toml", uuid::Uuid::new_v4()));
    std::fs::write(&path, config).unwrap();
    let (service, admin) = (db.service_url(), db.admin_url().to_string());
    let path_text = path.to_string_lossy().to_string();
    let server = Server::start(&[
        ("DATABASE_URL", &service),
        ("AGENTLEDGER_ADMIN_DATABASE_URL", &admin),
        ("AGENTLEDGER_PROFILE", "test"),
        ("AGENTLEDGER_AUTH_MODE", "required"),
        ("AGENTLEDGER_CONFIG", &path_text),
        ("RUST_LOG", "warn"),
    ]);
    Limited {
        _db: db,
        server,
        key,
        _config: TempFile(path),
    }
}

async fn open(base: &str, origin: Option<&str>) -> Result<Ws, u16> {
    let url = format!("{}/graphql/ws", base.replacen("http", "ws", 1));
    let mut request = url.into_client_request().unwrap();
    let headers = request.headers_mut();
    headers.insert(
        "sec-websocket-protocol",
        "graphql-transport-ws".parse().unwrap(),
    );
    if let Some(origin) = origin {
        headers.insert("origin", origin.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => Err(r.status().as_u16()),
        Err(e) => panic!("{e}"),
    }
}

fn text(v: Value) -> Message {
    Message::Text(v.to_string().into())
}

/// The next text message as JSON, or the close code.
async fn next(ws: &mut Ws) -> Result<Value, u16> {
    loop {
        match tokio::time::timeout(Duration::from_secs(20), ws.next())
            .await
            .expect("a message")
        {
            Some(Ok(Message::Text(t))) => return Ok(serde_json::from_str(&t).unwrap()),
            Some(Ok(Message::Close(frame))) => return Err(frame.map_or(0, |f| f.code.into())),
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return Err(0),
        }
    }
}

async fn init(ws: &mut Ws, key: &str) -> Result<(), u16> {
    ws.send(text(
        json!({"type": "connection_init", "payload": {"X-API-Key": key}}),
    ))
    .await
    .unwrap();
    let ack = next(ws).await?;
    assert_eq!(ack["type"], "connection_ack", "{ack}");
    Ok(())
}

async fn completes(base: &str, key: &str) -> Duration {
    let started = Instant::now();
    let (_, body) = post(
        base,
        Some(key),
        "mutation { submitWorkflow(request: \"Count the words of this note.\") { id } }",
        &json!({}),
    )
    .await;
    let id = body["data"]["submitWorkflow"]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("{body}"))
        .to_string();
    let mut ws = open(base, None).await.unwrap();
    init(&mut ws, key).await.unwrap();
    ws.send(text(
        json!({"id": "p", "type": "subscribe", "payload": {"query":
        format!("subscription {{ workflowProgress(id: \"{id}\") {{ state }} }}")}}),
    ))
    .await
    .unwrap();
    loop {
        let m = next(&mut ws).await.expect("progress");
        if m["type"] == "complete" {
            return started.elapsed();
        }
        assert_eq!(m["type"], "next", "{m}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_credential_over_its_rate_gets_429_then_recovers() {
    let l = start("[limits]\ncredential_per_second = 2\ncredential_burst = 4\n").await;
    let me = "{ me { name } }";
    let mut refused = None;
    for _ in 0..20 {
        let response = reqwest::Client::new()
            .post(format!("{}/graphql", l.server.base))
            .header("content-type", "application/json")
            .header("x-api-key", &l.key)
            .body(json!({"query": me}).to_string())
            .send()
            .await
            .unwrap();
        if response.status() == 429 {
            let wait: u64 = response.headers()["retry-after"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            let body: Value = serde_json::from_str(&response.text().await.unwrap()).unwrap();
            assert_eq!(code(&body), Some("RATE_LIMITED"));
            refused = Some(wait);
            break;
        }
    }
    let wait = refused.expect("the limit engaged within 20 requests");
    assert!((1..=2).contains(&wait), "Retry-After: {wait}");
    // Waiting as told is enough.
    tokio::time::sleep(Duration::from_secs(wait)).await;
    let (status, body) = post(&l.server.base, Some(&l.key), me, &json!({})).await;
    assert_eq!(status, 200, "{body}");
    assert!(l.server.stop().success());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_address_over_its_rate_is_stopped_before_authentication() {
    let l = start("[limits]\naddress_per_second = 2\naddress_burst = 4\n").await;
    let mut statuses = Vec::new();
    for _ in 0..10 {
        // No credential at all: the address limit comes first.
        let (status, _) = post(&l.server.base, None, "{ me { name } }", &json!({})).await;
        statuses.push(status);
    }
    assert!(
        statuses.contains(&401) && statuses.contains(&429),
        "{statuses:?}"
    );
    assert!(l.server.stop().success());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_subscriptions_on_one_socket_is_capped_and_work_goes_on() {
    let l = start("[limits]\nsubscriptions_per_connection = 5\n").await;
    let base = l.server.base.clone();
    let mut ws = open(&base, None).await.unwrap();
    init(&mut ws, &l.key).await.unwrap();
    for i in 0..200 {
        ws.send(text(
            json!({"id": format!("s{i}"), "type": "subscribe", "payload": {"query":
            "subscription { workflowEvents { position } }"}}),
        ))
        .await
        .unwrap();
    }
    let mut limited = 0;
    while limited < 195 {
        let m = next(&mut ws).await.expect("an answer to each subscription");
        if m["payload"][0]["extensions"]["code"] == "RATE_LIMITED"
            || m["payload"]["errors"][0]["extensions"]["code"] == "RATE_LIMITED"
        {
            limited += 1;
        }
    }
    // The five live subscriptions see new work, and the work completes.
    let took = completes(&base, &l.key).await;
    println!("a workflow completed in {took:?} beside a socket flooded with 200 subscriptions");
    assert!(took < Duration::from_secs(10));
    let mut live = std::collections::HashSet::new();
    while live.len() < 5 {
        let m = next(&mut ws)
            .await
            .expect("events for the live subscriptions");
        if m["type"] == "next" && m["payload"]["errors"].is_null() {
            live.insert(m["id"].as_str().unwrap().to_string());
        }
    }
    assert!(l.server.stop().success());
}

#[tokio::test(flavor = "multi_thread")]
async fn sockets_are_capped_per_credential_and_must_init_in_time() {
    let l = start("[limits]\nconnections_per_credential = 2\ninit_timeout_ms = 300\n").await;
    let base = l.server.base.clone();
    let mut one = open(&base, None).await.unwrap();
    init(&mut one, &l.key).await.unwrap();
    let mut two = open(&base, None).await.unwrap();
    init(&mut two, &l.key).await.unwrap();
    let mut three = open(&base, None).await.unwrap();
    assert_eq!(init(&mut three, &l.key).await, Err(4429));
    // One closes: a new one fits again.
    one.close(None).await.unwrap();
    while next(&mut one).await.is_ok() {}
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut again = open(&base, None).await.unwrap();
        match init(&mut again, &l.key).await {
            Ok(()) => break,
            Err(4429) if Instant::now() < deadline => {
                // The server counts the closed socket down when its task ends.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(code) => panic!("close {code}"),
        }
    }
    // A socket that never sends connection_init is closed.
    let mut silent = open(&base, None).await.unwrap();
    assert_eq!(next(&mut silent).await, Err(4408));
    // A message larger than the body limit closes the socket (1009).
    let mut big = open(&base, None).await.unwrap();
    let huge = "x".repeat(3 * 1024 * 1024);
    let _ = big
        .send(text(
            json!({"type": "connection_init", "payload": {"pad": huge}}),
        ))
        .await;
    assert!(matches!(next(&mut big).await, Err(1009) | Err(0)));
    drop(two);
    assert!(l.server.stop().success());
}

#[tokio::test(flavor = "multi_thread")]
async fn browsers_on_other_sites_cannot_drive_the_service() {
    let l = start("[server]\nallowed_origins = [\"https://console.example.com\"]\n").await;
    let base = l.server.base.clone();
    assert_eq!(
        open(&base, Some("https://evil.example")).await.err(),
        Some(403)
    );
    let mut ws = open(&base, Some("https://console.example.com"))
        .await
        .unwrap();
    init(&mut ws, &l.key).await.unwrap();
    let client = reqwest::Client::new();
    let preflight = |origin: &'static str| {
        client
            .request(reqwest::Method::OPTIONS, format!("{base}/graphql"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "content-type, authorization",
            )
            .send()
    };
    let allowed = preflight("https://console.example.com").await.unwrap();
    assert_eq!(
        allowed.headers()["access-control-allow-origin"],
        "https://console.example.com"
    );
    let foreign = preflight("https://evil.example").await.unwrap();
    assert!(foreign
        .headers()
        .get("access-control-allow-origin")
        .is_none());
    // A form or text/plain post (which needs no preflight) is refused.
    let response = client
        .post(format!("{base}/graphql"))
        .header("content-type", "text/plain")
        .header("x-api-key", &l.key)
        .body(
            json!({"query": "mutation { submitWorkflow(request: \"Count the words.\") { id } }"})
                .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 415);
    assert!(l.server.stop().success());
}

#[tokio::test(flavor = "multi_thread")]
async fn graphql_over_http_answers_in_the_media_type_asked_for_within_a_byte_budget() {
    let l = start("[server]\nmax_response_bytes = 600\n").await;
    let base = l.server.base.clone();
    let ask = |accept: Option<&'static str>, query: &'static str| {
        let mut request = reqwest::Client::new()
            .post(format!("{base}/graphql"))
            .header("content-type", "application/json")
            .header("x-api-key", &l.key);
        if let Some(accept) = accept {
            request = request.header("accept", accept);
        }
        async move {
            let response = request
                .body(json!({ "query": query }).to_string())
                .send()
                .await
                .unwrap();
            let media = response.headers()["content-type"]
                .to_str()
                .unwrap()
                .to_string();
            let status = response.status().as_u16();
            let body: Value = serde_json::from_str(&response.text().await.unwrap()).unwrap();
            (status, media, body)
        }
    };
    let me = "{ me { name } }";
    let (status, media, _) = ask(Some("application/json"), me).await;
    assert_eq!(
        (status, media.starts_with("application/json")),
        (200, true),
        "{media}"
    );
    let (status, media, _) = ask(None, me).await;
    assert_eq!(
        (status, media.starts_with("application/json")),
        (200, true),
        "{media}"
    );
    let modern = Some("application/graphql-response+json, application/json;q=0.9");
    let (status, media, _) = ask(modern, me).await;
    assert_eq!(
        (
            status,
            media.starts_with("application/graphql-response+json")
        ),
        (200, true)
    );
    // Request errors are 4xx in the newer media type, 200 in the older.
    assert_eq!(ask(modern, "{ me { name ").await.0, 400);
    assert_eq!(ask(modern, "{ me { nope } }").await.0, 400);
    assert_eq!(ask(modern, "{ verifyLedger { ok } }").await.0, 403);
    let (status, _, body) = ask(Some("application/json"), "{ verifyLedger { ok } }").await;
    assert_eq!((status, code(&body)), (200, Some("FORBIDDEN")));
    // A response over the budget is refused whole.
    let (_, _, body) = ask(None, "{ a: me { name subject tenant roles method } b: me { name subject tenant roles method } c: me { name subject tenant roles method } d: me { name subject tenant roles method } e: me { name subject tenant roles method } }").await;
    assert_eq!(code(&body), Some("BAD_INPUT"), "{body}");
    assert!(body["errors"][0]["message"]
        .as_str()
        .unwrap()
        .contains("at most 600"));
    assert!(l.server.stop().success());
}

/// Reads until the server closes the connection; what it sent.
async fn read_to_close(tcp: &mut tokio::net::TcpStream, within: Duration) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    match tokio::time::timeout(within, tcp.read_to_end(&mut out)).await {
        Ok(_) => Some(String::from_utf8_lossy(&out).into_owned()),
        Err(_) => None,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_sends_its_header_slowly_is_cut_off_and_others_go_on() {
    use tokio::io::AsyncWriteExt;
    let limited = start("[server]\nheader_read_timeout_ms = 400\nmax_connections = 40\n").await;
    let base = &limited.server.base;
    let address = base.strip_prefix("http://").unwrap();

    // Half a header, then nothing: the server closes the connection.
    let mut slow = tokio::net::TcpStream::connect(address).await.unwrap();
    slow.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let answer = read_to_close(&mut slow, Duration::from_secs(10))
        .await
        .expect("the server closes a connection whose header never ends");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(300),
        "closed after {waited:?}"
    );
    assert!(!answer.contains("200 OK"), "{answer}");

    // Connections beyond the cap wait; the ones admitted are served.
    let mut held = Vec::new();
    for _ in 0..40 {
        let mut tcp = tokio::net::TcpStream::connect(address).await.unwrap();
        tcp.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        held.push(tcp);
    }
    // A well-behaved client gets its answer once the slow ones are cut off.
    let started = Instant::now();
    let health = reqwest::Client::new()
        .get(format!("{base}/health"))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .expect("served after the slow connections are closed");
    assert_eq!(health.status(), 200);
    assert!(
        started.elapsed() >= Duration::from_millis(200),
        "{:?}",
        started.elapsed()
    );
    // Work goes on.
    assert!(completes(base, &limited.key).await < Duration::from_secs(10));
    for mut tcp in held {
        assert!(read_to_close(&mut tcp, Duration::from_secs(10))
            .await
            .is_some());
    }
}

/// The response budget holds while a response is built: a replay whose
/// every step carries the subtask outputs (hundreds of KB each) is refused
/// by the meter (`would exceed`) before it is assembled, while the same
/// workflow read once, the replay without outputs, and every progress
/// update with outputs (each message within the budget) are answered.
#[tokio::test(flavor = "multi_thread")]
async fn a_replay_of_large_outputs_is_refused_while_it_is_built_and_smaller_reads_pass() {
    let budget = 2 * 1024 * 1024;
    let l = start(&format!("[server]\nmax_response_bytes = {budget}\n")).await;
    let auditor = create_key(&l._db, "reviewer", &["auditor"], "default");
    let base = l.server.base.clone();
    // 20,000 distinct lines, listed backwards: both tools output ~400 KB.
    let input: String = (0..20_000)
        .rev()
        .map(|i| format!("line {i:08} of the ledger\n"))
        .collect();
    let (_, body) = post(
        &base,
        Some(&l.key),
        "mutation($input: String!) { submitWorkflow(request: \"Sort the lines. Then remove duplicate lines.\", input: $input) { id } }",
        &json!({ "input": input }),
    )
    .await;
    let id = body["data"]["submitWorkflow"]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("{body}"))
        .to_string();

    // Every state from the first event, with the outputs: each message is
    // within the budget, so each arrives.
    let mut ws = open(&base, None).await.unwrap();
    init(&mut ws, &l.key).await.unwrap();
    ws.send(text(json!({"id": "p", "type": "subscribe", "payload": {
        "query": "subscription($id: ID!) { workflowProgress(id: $id, fromVersion: 0) { state version subtasks { output } } }",
        "variables": { "id": id },
    }})))
    .await
    .unwrap();
    let mut updates = Vec::new();
    loop {
        let m = next(&mut ws).await.expect("progress");
        if m["type"] == "complete" {
            break;
        }
        assert_eq!(m["type"], "next", "{m}");
        assert!(
            m["payload"]["errors"].is_null(),
            "{}",
            &m.to_string()[..300.min(m.to_string().len())]
        );
        updates.push(m["payload"]["data"]["workflowProgress"].clone());
    }
    let last = updates.last().expect("updates");
    assert_eq!(last["state"], "COMPLETED", "{}", last["state"]);
    let outputs: usize = last["subtasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["output"].as_str().map_or(0, str::len))
        .sum();
    assert!(
        outputs > 600_000,
        "the tools wrote large outputs: {outputs} bytes"
    );
    let carried: usize = updates.iter().map(|u| u.to_string().len()).sum();
    assert!(
        carried > budget,
        "together the updates exceed one budget: {carried}"
    );

    let replay = |fields: &'static str| {
        let (base, auditor, id) = (base.clone(), auditor.clone(), id.clone());
        async move {
            post(
                &base,
                Some(&auditor),
                &format!("query($id: ID!) {{ replay(workflowId: $id) {{ position {fields} }} }}"),
                &json!({ "id": id }),
            )
            .await
            .1
        }
    };
    let whole = replay("state { state subtasks { output } }").await;
    assert_eq!(
        code(&whole),
        Some("BAD_INPUT"),
        "{}",
        &whole.to_string()[..300.min(whole.to_string().len())]
    );
    let message = whole["errors"][0]["message"].as_str().unwrap();
    assert!(
        message.contains("would exceed its budget, at most 2097152 bytes"),
        "refused while being built, not after: {message}"
    );
    assert!(
        whole["data"].is_null(),
        "nothing partial: {}",
        whole["data"]
    );
    assert_eq!(whole["errors"].as_array().unwrap().len(), 1);

    let slim = replay("state { state version }").await;
    let steps = slim["data"]["replay"]
        .as_array()
        .unwrap_or_else(|| panic!("{slim}"));
    assert_eq!(steps.len(), updates.len(), "a step per event");
    assert_eq!(steps.last().unwrap()["state"]["state"], "COMPLETED");

    let (_, read) = post(
        &base,
        Some(&l.key),
        "query($id: ID!) { workflow(id: $id) { subtasks { output } } }",
        &json!({ "id": id }),
    )
    .await;
    assert!(read["errors"].is_null(), "one read of the outputs fits");
    assert_eq!(read["data"]["workflow"]["subtasks"], last["subtasks"]);
    assert!(l.server.stop().success());
}
