//! The helpdesk MCP server of `examples/mcp-server` (the protocol's
//! reference Python SDK, started by `serve` as a child process over stdio)
//! serves two `[[tools.mcp]]` tools of a real `agentledger serve` on real
//! PostgreSQL: each call's intent is in the ledger with the idempotency key
//! the server received, and each outcome is the server's answer.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use agentledger_domain::workflow::{ToolIntent, WorkflowEvent};
use agentledger_eventstore::testing::TestDatabase;
use agentledger_eventstore::EventStore;
use common::{create_key, follow_to_end, post, serve_with_config};
use serde_json::{json, Value};

const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/mcp-server");

const TICKET: &str = "Open a ticket: 로그인이 안 됩니다.";
const TICKET_EN: &str = "Open a ticket for the failed payment.";
const GLOSSARY: &str = "Look up the glossary terms of 환불 and 배송.";

#[tokio::test(flavor = "multi_thread")]
async fn an_mcp_server_over_stdio_serves_tools_with_intents_on_the_ledger() {
    let Some(python) = common::python_venv(Path::new(EXAMPLE), "mcp-server-venv") else {
        return;
    };
    let db = TestDatabase::create().await;
    let submitter = create_key(&db, "app", &["submitter"], "default");
    let tickets = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("tickets-{}.jsonl", uuid::Uuid::new_v4()));
    let command = json!([
        python.to_string_lossy(),
        format!("{EXAMPLE}/server.py"),
        "--tickets",
        tickets.to_string_lossy()
    ]);
    let (server, _config) = serve_with_config(
        &db,
        &format!(
            "[[tools.mcp]]\nname = \"open_ticket\"\ncommand = {command}\n\
             keywords = [\"ticket\", \"티켓\"]\n\n\
             [[tools.mcp]]\nname = \"glossary\"\ncommand = {command}\n\
             keywords = [\"glossary\", \"용어\"]\nidempotent = true\ndeterministic = true\n"
        ),
    );
    let store = db.store().await;
    let mut events = store.subscribe_all(1);
    let mut submitted = HashMap::new();
    for request in [TICKET, TICKET_EN, GLOSSARY] {
        let (_, body) = post(
            &server.base,
            Some(&submitter),
            "mutation($r: String!) { submitWorkflow(request: $r) { id } }",
            &json!({ "r": request }),
        )
        .await;
        let id = body["data"]["submitWorkflow"]["id"]
            .as_str()
            .unwrap_or_else(|| panic!("{body}"))
            .to_string();
        submitted.insert(id, request);
    }
    let streams = follow_to_end(
        &mut events,
        submitted.keys().cloned(),
        Duration::from_secs(120),
    )
    .await
    .unwrap_or_else(|open| panic!("workflows not final: {open:?}"));
    assert!(server.stop().success());

    let opened: Vec<Value> = std::fs::read_to_string(&tickets)
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let _ = std::fs::remove_file(&tickets);
    assert_eq!(opened.len(), 2, "one ticket per request: {opened:?}");
    let label = format!(
        "stdio:{}",
        command
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect::<Vec<_>>()
            .join(" ")
    );
    for (id, request) in &submitted {
        let events = &streams[id];
        assert_eq!(
            events.last().unwrap().event_type,
            "WorkflowCompleted",
            "{id}: {request}"
        );
        let decoded: Vec<WorkflowEvent> = events
            .iter()
            .map(|e| WorkflowEvent::decode(&e.event_type, e.schema_version, &e.payload).unwrap())
            .collect();
        let (start, intent): (_, &ToolIntent) = events
            .iter()
            .zip(&decoded)
            .find_map(|(event, decoded)| match decoded {
                WorkflowEvent::SubtaskStarted {
                    intent: Some(intent),
                    ..
                } => Some((event, intent)),
                _ => None,
            })
            .unwrap_or_else(|| panic!("{id}: no intent recorded"));
        assert_eq!(intent.server, label);
        assert_eq!(intent.idempotency_key, start.event_id);
        let output = decoded
            .iter()
            .find_map(|e| match e {
                WorkflowEvent::SubtaskSucceeded { output, .. } => Some(output.as_str().to_string()),
                _ => None,
            })
            .unwrap();
        if *request == GLOSSARY {
            assert_eq!(intent.tool, "glossary");
            assert!(intent.idempotent);
            assert!(output.contains("환불 = refund"), "{output}");
            assert!(output.contains("배송 = delivery"), "{output}");
            continue;
        }
        assert_eq!(intent.tool, "open_ticket");
        assert!(!intent.idempotent);
        let ticket = opened
            .iter()
            .find(|t| t["text"] == *request)
            .unwrap_or_else(|| panic!("no ticket for {request:?}: {opened:?}"));
        assert_eq!(
            ticket["key"].as_str(),
            Some(start.event_id.to_string().as_str()),
            "the server received the intent's key"
        );
        assert_eq!(output, format!("ticket #{}", ticket["number"]));
    }
}
