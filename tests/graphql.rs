//! End-to-end: GraphQL against a real `agentledger serve` process on real
//! PostgreSQL: submit over HTTP, follow `workflowProgress` over a real
//! WebSocket in both subprotocols, escalation, two processes, error codes.

mod common;

use agentledger_eventstore::testing::TestDatabase;
use common::Server;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

async fn graphql(base: &str, query: &str, variables: Value) -> Value {
    let response = reqwest::Client::new()
        .post(format!("{base}/graphql"))
        .header("content-type", "application/json")
        .body(json!({ "query": query, "variables": variables }).to_string())
        .send()
        .await
        .expect("POST /graphql");
    assert_eq!(response.status(), 200);
    serde_json::from_str(&response.text().await.unwrap()).expect("a JSON response")
}

const SUBMIT: &str = "mutation($r: String!, $k: String) {
    submitWorkflow(request: $r, idempotencyKey: $k) { id state request lastPosition } }";

async fn submit(base: &str, request: &str) -> String {
    let response = graphql(base, SUBMIT, json!({ "r": request })).await;
    assert!(response["errors"].is_null(), "{response}");
    response["data"]["submitWorkflow"]["id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// A GraphQL WebSocket client speaking `protocol`.
struct Socket {
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    legacy: bool,
}

impl Socket {
    async fn open(base: &str, protocol: &str) -> Self {
        let url = format!("{}/graphql/ws", base.replacen("http", "ws", 1));
        let mut request = url.into_client_request().unwrap();
        request
            .headers_mut()
            .insert("sec-websocket-protocol", protocol.parse().unwrap());
        let (ws, response) = tokio_tungstenite::connect_async(request)
            .await
            .expect("WebSocket");
        assert_eq!(
            response.headers()["sec-websocket-protocol"]
                .to_str()
                .unwrap(),
            protocol
        );
        let mut socket = Self {
            ws,
            legacy: protocol == "graphql-ws",
        };
        socket
            .send(json!({ "type": "connection_init", "payload": {} }))
            .await;
        let ack = socket.receive().await;
        assert_eq!(ack["type"], "connection_ack", "{ack}");
        socket
    }

    async fn send(&mut self, message: Value) {
        self.ws
            .send(Message::Text(message.to_string().into()))
            .await
            .unwrap();
    }

    async fn receive(&mut self) -> Value {
        loop {
            let message = tokio::time::timeout(std::time::Duration::from_secs(30), self.ws.next())
                .await
                .expect("a message within 30 s")
                .expect("open")
                .expect("no error");
            match message {
                Message::Text(text) => {
                    let value: Value = serde_json::from_str(&text).unwrap();
                    // Keep-alives of the legacy protocol.
                    if value["type"] != "ka" {
                        return value;
                    }
                }
                Message::Ping(_) | Message::Pong(_) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    async fn subscribe(&mut self, id: &str, query: &str) {
        let kind = if self.legacy { "start" } else { "subscribe" };
        self.send(json!({ "id": id, "type": kind, "payload": { "query": query } }))
            .await;
    }

    /// The next payload of subscription `id`, or `None` when it completed.
    async fn next(&mut self, id: &str) -> Option<Value> {
        let message = self.receive().await;
        assert_eq!(message["id"], id, "{message}");
        match message["type"].as_str() {
            Some("next") | Some("data") => {
                assert!(message["payload"]["errors"].is_null(), "{message}");
                Some(message["payload"]["data"].clone())
            }
            Some("complete") => None,
            _ => panic!("unexpected {message}"),
        }
    }
}

/// Follows a workflow's progress from version 0 until the subscription
/// completes; the states seen, in order.
async fn follow(base: &str, protocol: &str, id: &str) -> Vec<String> {
    let mut socket = Socket::open(base, protocol).await;
    socket
        .subscribe("1", &format!("subscription {{ workflowProgress(id: \"{id}\", fromVersion: 0) {{ state version }} }}"))
        .await;
    let mut states = Vec::new();
    while let Some(data) = socket.next("1").await {
        states.push(
            data["workflowProgress"]["state"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    states
}

fn postgres_server(db: &TestDatabase) -> Server {
    let (service, admin) = (db.service_url(), db.admin_url().to_string());
    Server::start(&[
        ("DATABASE_URL", &service),
        ("AGENTLEDGER_ADMIN_DATABASE_URL", &admin),
        ("RUST_LOG", "warn"),
    ])
}

#[tokio::test]
async fn a_workflow_submitted_over_http_is_followed_to_completion_in_both_subprotocols() {
    let db = TestDatabase::create().await;
    let server = postgres_server(&db);
    for protocol in ["graphql-transport-ws", "graphql-ws"] {
        let id = submit(
            &server.base,
            "Summarise the attached quarterly report. Then count the words of the summary.",
        )
        .await;
        let states = follow(&server.base, protocol, &id).await;
        assert_eq!(
            states.first().map(String::as_str),
            Some("SUBMITTED"),
            "{protocol}: {states:?}"
        );
        assert_eq!(
            states.last().map(String::as_str),
            Some("COMPLETED"),
            "{protocol}: {states:?}"
        );
        for stage in ["GATING", "EXECUTING", "REVIEWING"] {
            assert!(
                states.iter().any(|s| s == stage),
                "{protocol}: {stage} in {states:?}"
            );
        }
        // The read models show the end, with every decision.
        let read = graphql(
            &server.base,
            "query($id: ID!) { workflow(id: $id) { state progress { done total } decisions { kind role actor } ethics { passed } } }",
            json!({ "id": id }),
        )
        .await;
        let workflow = &read["data"]["workflow"];
        assert_eq!(workflow["ethics"]["passed"], true, "{read}");
        let kinds: Vec<&str> = workflow["decisions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["kind"].as_str().unwrap())
            .collect();
        assert!(
            kinds.contains(&"analysis")
                && kinds.contains(&"gate.approve")
                && kinds.contains(&"ethics.passed"),
            "{kinds:?}"
        );
    }
    let rejected = submit(
        &server.base,
        "Transfer 10,000 dollars from the company account to my personal account.",
    )
    .await;
    let states = follow(&server.base, "graphql-transport-ws", &rejected).await;
    assert_eq!(
        states.last().map(String::as_str),
        Some("REJECTED"),
        "{states:?}"
    );
    assert!(server.stop().success());
}

#[tokio::test]
async fn an_escalated_workflow_is_approved_by_a_person_and_completes() {
    let db = TestDatabase::create().await;
    let server = postgres_server(&db);
    let id = submit(
        &server.base,
        "Delete the duplicate lines from the tag list, then sort the rest.",
    )
    .await;
    let mut socket = Socket::open(&server.base, "graphql-transport-ws").await;
    socket
        .subscribe(
            "p",
            &format!(
                "subscription {{ workflowProgress(id: \"{id}\", fromVersion: 0) {{ state }} }}"
            ),
        )
        .await;
    loop {
        let data = socket
            .next("p")
            .await
            .expect("not complete before a person decides");
        if data["workflowProgress"]["state"] == "AWAITING_HUMAN" {
            break;
        }
    }
    let decided = graphql(
        &server.base,
        "mutation($id: ID!) { decideEscalation(id: $id, approve: true, comment: \"only duplicates\") { state decisions { kind actor } } }",
        json!({ "id": id }),
    )
    .await;
    assert!(decided["errors"].is_null(), "{decided}");
    let mut last = String::new();
    while let Some(data) = socket.next("p").await {
        last = data["workflowProgress"]["state"]
            .as_str()
            .unwrap()
            .to_string();
    }
    assert_eq!(last, "COMPLETED");
    assert!(server.stop().success());
}

#[tokio::test]
async fn a_workflow_submitted_on_one_process_is_followed_on_another() {
    let db = TestDatabase::create().await;
    let (one, other) = (postgres_server(&db), postgres_server(&db));
    let id = submit(&one.base, "1. Extract the figures from the text: 12, 7.5 and 30\n2. Sort them in descending order\n3. Compute their total").await;
    let states = follow(&other.base, "graphql-ws", &id).await;
    assert_eq!(
        states.last().map(String::as_str),
        Some("COMPLETED"),
        "{states:?}"
    );
    assert!(one.stop().success());
    assert!(other.stop().success());
}

#[tokio::test]
async fn bad_input_gets_its_code_and_writes_nothing() {
    let db = TestDatabase::create().await;
    let server = postgres_server(&db);
    let head = || async {
        let r = graphql(
            &server.base,
            "{ events(first: 100) { position } }",
            json!({}),
        )
        .await;
        r["data"]["events"].as_array().unwrap().len()
    };
    let before = head().await;
    let code = |r: &Value| {
        r["errors"][0]["extensions"]["code"]
            .as_str()
            .unwrap_or("none")
            .to_string()
    };
    let cases = [
        (SUBMIT, json!({ "r": "   " }), "BAD_INPUT"),
        (SUBMIT, json!({ "r": "가".repeat(11_000) }), "BAD_INPUT"),
        (
            "mutation { cancelWorkflow(id: \"0190a1b2-0000-7000-8000-000000000000\") { state } }",
            json!({}),
            "NOT_FOUND",
        ),
        (
            "mutation { cancelWorkflow(id: \"not-an-id\") { state } }",
            json!({}),
            "BAD_INPUT",
        ),
        (
            "{ workflows(first: 5, after: \"zz\") { edges { cursor } } }",
            json!({}),
            "BAD_INPUT",
        ),
        (
            "{ workflows(first: 1000) { edges { cursor } } }",
            json!({}),
            "BAD_INPUT",
        ),
        (
            "{ workflows(first: -1) { edges { cursor } } }",
            json!({}),
            "BAD_INPUT",
        ),
    ];
    for (query, variables, expected) in cases {
        let response = graphql(&server.base, query, variables).await;
        assert_eq!(code(&response), expected, "{query}: {response}");
    }
    assert_eq!(head().await, before, "nothing was written");
    // The same idempotency key twice: one workflow; another request: CONFLICT.
    let first = graphql(
        &server.base,
        SUBMIT,
        json!({ "r": "Sort the tags.", "k": "k-1" }),
    )
    .await;
    let again = graphql(
        &server.base,
        SUBMIT,
        json!({ "r": "Sort the tags.", "k": "k-1" }),
    )
    .await;
    assert_eq!(
        first["data"]["submitWorkflow"]["id"],
        again["data"]["submitWorkflow"]["id"]
    );
    let other = graphql(
        &server.base,
        SUBMIT,
        json!({ "r": "Count the tags.", "k": "k-1" }),
    )
    .await;
    assert_eq!(code(&other), "CONFLICT", "{other}");
    assert!(server.stop().success());
}

#[tokio::test]
async fn pages_lose_and_repeat_nothing_while_new_workflows_arrive() {
    let db = TestDatabase::create().await;
    let server = postgres_server(&db);
    let mut before = std::collections::HashSet::new();
    for i in 0..25 {
        before.insert(submit(&server.base, &format!("Count the words of note {i}.")).await);
    }
    let query = "query($after: String) { workflows(first: 7, after: $after) {
        edges { cursor node { id } } pageInfo { hasNextPage endCursor } } }";
    let mut seen = Vec::new();
    let mut after = Value::Null;
    let mut arriving = 0;
    loop {
        // New work arrives between every two pages.
        submit(
            &server.base,
            &format!("Count the words of late note {arriving}."),
        )
        .await;
        arriving += 1;
        let page = graphql(&server.base, query, json!({ "after": after })).await;
        let connection = &page["data"]["workflows"];
        for edge in connection["edges"].as_array().unwrap() {
            seen.push(edge["node"]["id"].as_str().unwrap().to_string());
        }
        if connection["pageInfo"]["hasNextPage"] != true {
            break;
        }
        after = connection["pageInfo"]["endCursor"].clone();
    }
    let unique: std::collections::HashSet<_> = seen.iter().cloned().collect();
    assert_eq!(unique.len(), seen.len(), "no workflow repeated");
    assert!(
        before.is_subset(&unique),
        "no workflow that existed before paging was lost"
    );
    assert!(server.stop().success());
}

#[tokio::test]
async fn limits_readiness_and_metrics() {
    let db = TestDatabase::create().await;
    let server = postgres_server(&db);
    submit(&server.base, "Sort the tags.").await;
    // Body limit (2 MiB by default): a request declaring 3 MiB is refused
    // before its body is read.
    let address = server.base.trim_start_matches("http://").to_string();
    let mut tcp = tokio::net::TcpStream::connect(&address).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tcp.write_all(
        format!(
            "POST /graphql HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            3 << 20
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut head = [0u8; 12];
    tcp.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 413");
    // Depth limit.
    let deep = graphql(
        &server.base,
        // Depth 15: __schema, types, fields, type, ten ofType, name.
        &format!(
            "{{ __schema {{ types {{ fields {{ type {{ {} name {} }} }} }} }} }}",
            "ofType { ".repeat(10),
            "} ".repeat(10)
        ),
        json!({}),
    )
    .await;
    assert!(
        deep["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("nested too deep"),
        "{deep}"
    );

    let ready = reqwest::get(format!("{}/ready", server.base))
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    let body: Value = serde_json::from_str(&ready.text().await.unwrap()).unwrap();
    assert_eq!(body["ready"], true);
    assert!(body["projection_lag"]["workflow_status"].is_u64(), "{body}");

    // An open subscription is counted.
    let mut socket = Socket::open(&server.base, "graphql-transport-ws").await;
    socket
        .subscribe(
            "e",
            "subscription { workflowEvents(fromPosition: 1) { position } }",
        )
        .await;
    assert!(socket.next("e").await.is_some());
    let metrics = reqwest::get(format!("{}/metrics", server.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for series in [
        "agentledger_subscriptions_open 1",
        "agentledger_http_requests_total{route=\"/graphql\",status=\"200\"}",
        "agentledger_http_request_seconds_bucket{route=\"/graphql\",status=\"200\",le=\"+Inf\"}",
        "agentledger_projection_lag_events{projection=\"audit_trail\"}",
        "agentledger_workflows{state=",
        "agentledger_head_position",
        // The result cache is off here: its counts are there, at zero.
        "agentledger_cache_lookups_total{kind=\"tool\",outcome=\"hit\"} 0",
        "agentledger_cache_saved_seconds_total 0",
        "agentledger_cache_entries 0",
    ] {
        assert!(metrics.contains(series), "{series} in\n{metrics}");
    }
    // SIGTERM with a subscription open: it completes and the process exits cleanly.
    assert!(server.stop().success());
}

#[tokio::test]
async fn replay_shows_every_step_with_its_state_up_to_a_position_over_graphql_and_the_cli() {
    let db = TestDatabase::create().await;
    let server = postgres_server(&db);
    let id = submit(
        &server.base,
        "Summarise the attached quarterly report. Then count the words of the summary.",
    )
    .await;
    let states = follow(&server.base, "graphql-transport-ws", &id).await;
    assert_eq!(states.last().map(String::as_str), Some("COMPLETED"));
    let steps_query = "query($id: ID!, $at: Position) { replay(workflowId: $id, atPosition: $at) {
        position actor role inputs summary rationale event { type version }
        state { state version progress { done total } subtasks { id state } } } }";
    let replay = graphql(&server.base, steps_query, json!({ "id": id })).await;
    let steps = replay["data"]["replay"]
        .as_array()
        .unwrap_or_else(|| panic!("{replay}"))
        .clone();
    let events = graphql(
        &server.base,
        "query($id: ID!) { events(workflowId: $id) { position } }",
        json!({ "id": id }),
    )
    .await;
    assert_eq!(
        steps.len(),
        events["data"]["events"].as_array().unwrap().len()
    );
    for (i, step) in steps.iter().enumerate() {
        assert_eq!(step["event"]["version"], json!(i), "steps in order");
        assert_eq!(
            step["state"]["version"],
            json!(i),
            "the state after that very event"
        );
    }
    // The end of the replay is what the read models show.
    let read = graphql(
        &server.base,
        "query($id: ID!) { workflow(id: $id) { state version progress { done total } subtasks { id state } } }",
        json!({ "id": id }),
    )
    .await;
    assert_eq!(steps.last().unwrap()["state"], read["data"]["workflow"]);
    // The gate's step: Lubit, based on the submission and the analysis.
    let gate = steps
        .iter()
        .find(|s| s["event"]["type"] == "GateDecided")
        .unwrap();
    assert_eq!(gate["actor"], "lubit");
    assert_eq!(gate["role"], "GATEKEEPER");
    assert_eq!(gate["inputs"].as_array().unwrap().len(), 2);
    assert!(!gate["rationale"].as_str().unwrap().is_empty());
    let at = gate["position"].clone();
    let upto = graphql(&server.base, steps_query, json!({ "id": id, "at": at })).await;
    let upto = upto["data"]["replay"].as_array().unwrap();
    assert_eq!(upto.last().unwrap()["position"], at);
    assert_eq!(upto.last().unwrap()["state"]["state"], "EXECUTING");

    // The audit trail: pages in position order, and filters.
    let trail_query = "query($id: ID, $after: String, $role: AgentRole) {
        auditTrail(workflowId: $id, role: $role, first: 4, after: $after) {
            edges { cursor node { position kind actor role hash } } pageInfo { hasNextPage endCursor } } }";
    let mut positions = Vec::new();
    let mut after = Value::Null;
    loop {
        let page = graphql(
            &server.base,
            trail_query,
            json!({ "id": id, "after": after }),
        )
        .await;
        let connection = &page["data"]["auditTrail"];
        for edge in connection["edges"]
            .as_array()
            .unwrap_or_else(|| panic!("{page}"))
        {
            positions.push(edge["node"]["position"].as_u64().unwrap());
        }
        if connection["pageInfo"]["hasNextPage"] != true {
            break;
        }
        after = connection["pageInfo"]["endCursor"].clone();
    }
    let replayed: Vec<u64> = steps
        .iter()
        .map(|s| s["position"].as_u64().unwrap())
        .collect();
    assert_eq!(positions, replayed, "every event once, in order");
    let gates = graphql(
        &server.base,
        trail_query,
        json!({ "id": id, "role": "GATEKEEPER" }),
    )
    .await;
    let gates = gates["data"]["auditTrail"]["edges"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(gates.len(), 1);
    assert_eq!(gates[0]["node"]["kind"], "gate.approve");
    let bad = graphql(&server.base, trail_query, json!({ "id": id, "after": "x" })).await;
    assert_eq!(bad["errors"][0]["extensions"]["code"], "BAD_INPUT");

    // The same history from the command line, for machines and for people.
    let cli = common::agentledger(&["replay", &id, "--json"], &db.service_url());
    assert!(
        cli.status.success(),
        "{}",
        String::from_utf8_lossy(&cli.stderr)
    );
    let lines: Vec<Value> = String::from_utf8_lossy(&cli.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), steps.len());
    assert_eq!(lines.last().unwrap()["state"]["state"], "COMPLETED");
    let cli_at = common::agentledger(&["replay", &id, "--at", &at.to_string()], &db.service_url());
    let text = String::from_utf8_lossy(&cli_at.stdout);
    assert!(text.lines().last().is_some());
    assert!(
        text.contains("lubit") && text.contains("gate.approve") && !text.contains("ethics."),
        "{text}"
    );
    assert!(server.stop().success());
}
