//! Malformed input against a real `agentledger serve` with authentication
//! required: mutated GraphQL documents, variables of the wrong shape, JSON
//! bodies that are not JSON, and random WebSocket frames. Every answer is
//! an error with a status the API documents, nothing is written, and the
//! server is alive afterwards.
//!
//! The cases come from a seeded generator, so a failure replays:
//! `AGENTLEDGER_FUZZ_SEED=<seed printed> AGENTLEDGER_FUZZ_CASES=5000 ops/test.sh -E 'binary(fuzz)'`.

mod common;

use std::time::Duration;

use agentledger_eventstore::testing::TestDatabase;
use common::{count_events, create_key, Server};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// A small, replayable generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

const DOCUMENTS: &[&str] = &[
    "{ me { name roles } }",
    "{ workflows(first: 5) { edges { cursor node { id state subtasks { id } decisions { kind } } } } }",
    "query($id: ID!) { workflow(id: $id) { id request progress { done total } } }",
    "{ events(first: 3, fromPosition: 1) { position type payload metadata } }",
    "{ auditTrail(first: 2) { edges { node { actor kind } } pageInfo { hasNextPage } } }",
    "query($w: ID!, $at: Position) { replay(workflowId: $w, atPosition: $at) { position state { state } } }",
    "{ verifyLedger { ok checkedEvents } ledgerKeys { keyId } }",
    "mutation($r: String!) { submitWorkflow(request: $r, priority: CRITICAL) { id } }",
    "mutation { forgetSubject(subjectId: \"x\") { destroyed } }",
    "mutation($id: ID!) { decideEscalation(id: $id, approve: true, comment: \"ok\") { state } }",
    "subscription { workflowEvents(fromPosition: 1) { position } }",
    "query { ...F } fragment F on Query { me { ...G } } fragment G on Me { name }",
];

const TOKENS: &[&str] = &[
    "{",
    "}",
    "(",
    ")",
    "[",
    "]",
    "...",
    "$",
    ":",
    "!",
    "@skip(if: true)",
    "__schema { types { name } }",
    "__typename",
    "mutation",
    "subscription",
    "fragment",
    "on",
    "\"",
    "\\u0000",
    "\u{0}",
    "#",
    "\n",
    "null",
    "99999999999999999999999",
    "-1",
    "1e400",
    "\"김민수\"",
    "𝒳",
    "\u{feff}",
    "alias: me { name }",
];

fn mutate(rng: &mut Rng, document: &str) -> String {
    let mut text: Vec<char> = document.chars().collect();
    for _ in 0..1 + rng.below(4) {
        match rng.below(6) {
            0 if !text.is_empty() => {
                let at = rng.below(text.len());
                text.remove(at);
            }
            1 => {
                let at = rng.below(text.len() + 1);
                for (i, c) in rng.pick(TOKENS).chars().enumerate() {
                    text.insert(at + i, c);
                }
            }
            2 if !text.is_empty() => {
                let cut = rng.below(text.len());
                text.truncate(cut);
            }
            3 => {
                // Deep nesting.
                let depth = 1 + rng.below(300);
                let open: String = std::iter::repeat_n("{ me ", depth).collect();
                text = format!("{open}{}", "}".repeat(depth)).chars().collect();
            }
            4 => {
                let n = 1 + rng.below(60);
                let fields: String = (0..n).map(|i| format!("a{i}: me {{ name }} ")).collect();
                text = format!("{{ {fields} }}").chars().collect();
            }
            _ => {
                if let (false, Some(c)) = (text.is_empty(), rng.pick(TOKENS).chars().next()) {
                    let at = rng.below(text.len());
                    text[at] = c;
                }
            }
        }
    }
    text.into_iter().collect()
}

fn variables(rng: &mut Rng) -> Value {
    let values = [
        json!(null),
        json!(1),
        json!("not-a-uuid"),
        json!("00000000-0000-0000-0000-000000000000"),
        json!({"nested": [1, 2, {"deep": true}]}),
        json!("x".repeat(40_000)),
        json!(-5),
        json!(1.5e300),
        json!([]),
        json!("정렬해 주세요."),
    ];
    let mut v = serde_json::Map::new();
    for name in ["id", "w", "at", "r", "first"] {
        if rng.below(2) == 0 {
            v.insert(name.into(), rng.pick(&values).clone());
        }
    }
    match rng.below(6) {
        0 => json!("variables as a string"),
        1 => json!([1, 2]),
        _ => Value::Object(v),
    }
}

/// A body: mostly a GraphQL request, sometimes not JSON or not a request.
fn body(rng: &mut Rng) -> Vec<u8> {
    let picked = rng_pick(rng);
    let document = mutate(rng, picked);
    match rng.below(10) {
        0 => b"{\"query\": ".to_vec(),
        1 => vec![0xff, 0xfe, b'{', 0x80],
        2 => json!([{ "query": document }, { "query": "{ me { name } }" }]).to_string().into_bytes(),
        3 => json!({ "query": 42, "variables": "x" }).to_string().into_bytes(),
        4 => json!({ "query": document, "operationName": "Nope", "extensions": {"persistedQuery": {"sha256Hash": "ab"}} }).to_string().into_bytes(),
        _ => json!({ "query": document, "variables": variables(rng) }).to_string().into_bytes(),
    }
}

fn rng_pick(rng: &mut Rng) -> &'static str {
    DOCUMENTS[rng.below(DOCUMENTS.len())]
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_requests_and_frames_get_errors_write_nothing_and_crash_nothing() {
    let seed: u64 = std::env::var("AGENTLEDGER_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| uuid::Uuid::new_v4().as_u64_pair().0 | 1);
    let cases: usize = std::env::var("AGENTLEDGER_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(400);
    println!("fuzz seed {seed}, {cases} cases");
    let mut rng = Rng(seed);
    let db = TestDatabase::create().await;
    // A viewer may write nothing, so no case can write whatever it mutates into.
    let viewer = create_key(&db, "fuzz-viewer", &["viewer", "auditor"], "default");
    let (service, admin) = (db.service_url(), db.admin_url().to_string());
    let server = Server::start(&[
        ("DATABASE_URL", &service),
        ("AGENTLEDGER_ADMIN_DATABASE_URL", &admin),
        ("AGENTLEDGER_PROFILE", "test"),
        ("AGENTLEDGER_AUTH_MODE", "required"),
        ("RUST_LOG", "error"),
    ]);
    let base = server.base.clone();
    let before = count_events(&db).await;
    // A fresh connection per case: the server may close one after an
    // error it answered before reading the body, and a reused one would
    // fail on the client's side.
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    for case in 0..cases {
        let body = body(&mut rng);
        let mut request = http
            .post(format!("{base}/graphql"))
            .header(
                "content-type",
                if rng.below(12) == 0 {
                    "text/plain"
                } else {
                    "application/json"
                },
            )
            .timeout(Duration::from_secs(20));
        request = match rng.below(8) {
            0 => request,
            1 => request.header(
                "authorization",
                "Bearer alk_000000000000_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            ),
            2 => {
                // Only what a header can carry: visible ASCII.
                let token: String = mutate(&mut rng, "eyJhbGciOiJIUzI1NiJ9.e30.sig")
                    .chars()
                    .filter(|c| c.is_ascii_graphic() || *c == ' ')
                    .collect();
                request.header("authorization", format!("Bearer {token}"))
            }
            _ => request.header("x-api-key", &viewer),
        };
        let response = request.body(body.clone()).send().await.unwrap_or_else(|e| {
            panic!(
                "case {case} (seed {seed}): no answer: {e}; body {:?}",
                String::from_utf8_lossy(&body)
            )
        });
        let status = response.status().as_u16();
        *statuses.entry(status).or_default() += 1;
        assert!(
            [200, 400, 401, 403, 413, 415, 422, 429].contains(&status),
            "case {case} (seed {seed}): status {status} for {:?}",
            String::from_utf8_lossy(&body)
        );
        let text = response.text().await.unwrap();
        if status == 200 {
            let value: Value = serde_json::from_str(&text)
                .unwrap_or_else(|_| panic!("case {case} (seed {seed}): not JSON: {text}"));
            assert!(
                value.get("data").is_some() || value.get("errors").is_some(),
                "{text}"
            );
        }
    }
    // Random frames on sockets: before and after connection_init.
    let url = format!("{}/graphql/ws", base.replacen("http", "ws", 1));
    for case in 0..cases / 10 {
        let mut request = url.as_str().into_client_request().unwrap();
        request.headers_mut().insert(
            "sec-websocket-protocol",
            "graphql-transport-ws".parse().unwrap(),
        );
        let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
        if rng.below(2) == 0 {
            let init = json!({"type": "connection_init", "payload": {"X-API-Key": viewer}});
            let _ = ws.send(Message::Text(init.to_string().into())).await;
        }
        for _ in 0..1 + rng.below(5) {
            let picked = rng_pick(&mut rng);
            let document = mutate(&mut rng, picked);
            let frame = match rng.below(5) {
                0 => Message::Binary(vec![0xff, 0x00, 0x13].into()),
                1 => Message::Text("{not json".into()),
                2 => Message::Text(json!({"type": "subscribe", "id": case, "payload": {"query": document}}).to_string().into()),
                3 => Message::Text(json!({"type": rng.pick(TOKENS).to_string()}).to_string().into()),
                _ => Message::Text(json!({"type": "subscribe", "id": "1", "payload": {"query": document, "variables": variables(&mut rng)}}).to_string().into()),
            };
            if ws.send(frame).await.is_err() {
                break;
            }
        }
        // Whatever came back, the connection ends cleanly when we close it.
        let _ = ws.close(None).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while ws.next().await.is_some() {}
        })
        .await;
    }
    println!("statuses: {statuses:?}");
    // Alive, and nothing written.
    let health = http.get(format!("{base}/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    assert_eq!(
        count_events(&db).await,
        before,
        "a malformed request wrote events (seed {seed})"
    );
    assert!(server.stop().success());
}
