//! End-to-end: external workers serve the analyst, gatekeeper and ethics
//! roles and one external tool of a real `agentledger serve` on real
//! PostgreSQL, over HTTP and WebSocket with `agent` API keys, several
//! workers per role, one of them dying with a task in hand. Every workflow
//! reaches its final state, each decision is recorded once, with the
//! worker that made it as the actor, and each tool output is the worker's.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentledger_eventstore::testing::TestDatabase;
use agentledger_eventstore::EventStore;
use common::{code, create_key, follow_to_end, post, serve_with_config};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const COMPLETES: &str = "Count the words of this note, then list its keywords.";
/// The gatekeeper worker's own policy rejects money transfers.
const REJECTED: &str = "Transfer 500 dollars to this account: 1234-5678.";
const KOREAN: &str = "이 메모의 단어 수를 세고 핵심어를 뽑아 주세요.";

const CLAIM: &str = "mutation($role: AgentRole!, $worker: String!) {
    claimAgentTask(role: $role, workerId: $worker, leaseSeconds: 2) { id workflowId role attempt context }
}";
const SUBMIT: &str = "mutation($task: ID!, $decision: JSON!, $worker: String!, $policy: AgentPolicyInput) {
    submitAgentDecision(taskId: $task, decision: $decision, workerId: $worker, workerVersion: \"0.3.0\", policy: $policy) { id state }
}";
const CLAIM_CALL: &str = "mutation($worker: String!) {
    claimToolCall(tools: [\"crm_lookup\"], workerId: $worker, leaseSeconds: 5) { id workflowId subtaskId tool input attempt deadline }
}";
const COMPLETE_CALL: &str = "mutation($call: ID!, $output: String, $worker: String) {
    completeToolCall(callId: $call, output: $output, workerId: $worker)
}";

/// What the tool worker answers for a call with `input`.
fn crm_record(input: &str) -> String {
    format!("CRM: {} chars looked up", input.chars().count())
}

/// The workers' policies: the analyst plans three steps (one on the
/// external tool), the gatekeeper approves all but money transfers, the
/// reviewer passes everything.
fn decide(role: &str, context: &Value) -> Value {
    match role {
        "ANALYST" => json!({
            "subtasks": [
                { "id": "count", "title": "Count the words", "tool": "text_stats" },
                { "id": "keys", "title": "List the keywords", "tool": "keywords", "dependsOn": ["count"] },
                { "id": "crm", "title": "Look the sender up", "tool": "crm_lookup" }
            ],
            "confidence": 0.8,
            "rationale": "count, then keywords; look the sender up meanwhile"
        }),
        "GATEKEEPER" => {
            let request = context["request"].as_str().unwrap_or_default();
            if request.to_lowercase().contains("transfer") {
                json!({ "verdict": "REJECT", "priority": "NORMAL", "risk": 0.9,
                        "reasons": ["moves money"], "rationale": "this gate never moves money" })
            } else {
                json!({ "verdict": "APPROVE", "priority": "HIGH", "risk": 0.1,
                        "reasons": [], "rationale": "harmless text work" })
            }
        }
        _ => json!({
            "transparency": 0.9, "collaboration": 0.8, "autonomy": 1.0, "fairness": 1.0,
            "passed": true, "findings": [], "rationale": "nothing to flag"
        }),
    }
}

/// Subscribes to `agentTasks(role)` (`"TOOLS"`: `agentTasks(tools:
/// ["crm_lookup"])`) with `key`; yields once per signal.
async fn signals(
    base: &str,
    key: &str,
    role: &str,
) -> impl futures::Stream<Item = ()> + Send + Unpin + 'static {
    let url = format!("{}/graphql/ws", base.replacen("http", "ws", 1));
    let mut request = url.into_client_request().unwrap();
    request.headers_mut().insert(
        "sec-websocket-protocol",
        "graphql-transport-ws".parse().unwrap(),
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let send = |v: Value| Message::Text(v.to_string().into());
    ws.send(send(json!({ "type": "connection_init",
        "payload": { "Authorization": format!("Bearer {key}") } })))
        .await
        .unwrap();
    let payload = if role == "TOOLS" {
        json!({ "query": "subscription { agentTasks(tools: [\"crm_lookup\"]) { role tool } }" })
    } else {
        json!({ "query": "subscription($role: AgentRole) { agentTasks(role: $role) { role tool } }",
                "variables": { "role": role } })
    };
    ws.send(send(
        json!({ "id": "1", "type": "subscribe", "payload": payload }),
    ))
    .await
    .unwrap();
    Box::pin(ws.filter_map(|message| async move {
        match message {
            Ok(Message::Text(text)) => {
                let v: Value = serde_json::from_str(&text).unwrap();
                assert!(v["type"] != "error", "agentTasks: {v}");
                (v["type"] == "next").then_some(())
            }
            _ => None,
        }
    }))
}

/// What the workers saw: claim→submit round trips and decisions by worker.
#[derive(Default)]
struct Seen {
    round_trips: Vec<Duration>,
    decided: BTreeMap<String, usize>,
}

/// A worker serving `role` until `stop`; with `dies_after`, it claims one
/// more task after that many decisions and dies holding it (returning the
/// task's id).
async fn worker(
    base: String,
    key: String,
    role: &'static str,
    id: String,
    dies_after: Option<usize>,
    seen: Arc<Mutex<Seen>>,
    stop: tokio_util::sync::CancellationToken,
) -> Option<String> {
    let mut signals = signals(&base, &key, role).await;
    let mut decided = 0;
    loop {
        loop {
            let started = Instant::now();
            let (status, body) = post(
                &base,
                Some(&key),
                CLAIM,
                &json!({ "role": role, "worker": id }),
            )
            .await;
            assert_eq!(status, 200, "{body}");
            assert!(body["errors"].is_null(), "claim: {body}");
            let task = &body["data"]["claimAgentTask"];
            if task.is_null() {
                break;
            }
            if dies_after == Some(decided) {
                return Some(task["id"].as_str().unwrap().to_string());
            }
            let decision = decide(role, &task["context"]);
            let (_, body) = post(
                &base,
                Some(&key),
                SUBMIT,
                &json!({ "task": task["id"], "decision": decision, "worker": id,
                         "policy": { "name": format!("{}-py", role.to_lowercase()), "version": "3" } }),
            )
            .await;
            match code(&body) {
                None => {
                    decided += 1;
                    let mut seen = seen.lock().unwrap();
                    seen.round_trips.push(started.elapsed());
                    *seen.decided.entry(id.clone()).or_default() += 1;
                }
                // Its lease (2 s) ran out under load and another decided.
                Some("CONFLICT") => {}
                Some(other) => panic!("{id}: {other}: {body}"),
            }
        }
        tokio::select! {
            next = signals.next() => { next.expect("the subscription stays open"); }
            () = stop.cancelled() => return None,
        }
    }
}

/// A worker running `crm_lookup` until `stop`; returns its answers.
async fn tool_worker(
    base: String,
    key: String,
    id: String,
    stop: tokio_util::sync::CancellationToken,
) -> usize {
    let mut signals = signals(&base, &key, "TOOLS").await;
    let mut answered = 0;
    loop {
        loop {
            let (_, body) = post(&base, Some(&key), CLAIM_CALL, &json!({ "worker": id })).await;
            assert!(body["errors"].is_null(), "claimToolCall: {body}");
            let call = &body["data"]["claimToolCall"];
            if call.is_null() {
                break;
            }
            assert_eq!(call["tool"], "crm_lookup");
            let output = crm_record(call["input"].as_str().unwrap());
            let (_, body) = post(
                &base,
                Some(&key),
                COMPLETE_CALL,
                &json!({ "call": call["id"], "output": output, "worker": id }),
            )
            .await;
            match code(&body) {
                None => answered += 1,
                Some("CONFLICT") => {}
                Some(other) => panic!("{id}: {other}: {body}"),
            }
        }
        tokio::select! {
            next = signals.next() => { next.expect("the subscription stays open"); }
            () = stop.cancelled() => return answered,
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn external_workers_serve_three_roles_and_every_decision_is_theirs_once() {
    let db = TestDatabase::create().await;
    let submitter = create_key(&db, "app", &["submitter"], "default");
    let workers_key = create_key(&db, "workers", &["agent"], "default");
    let other_tenant = create_key(&db, "elsewhere", &["agent"], "other");
    let (server, _config) = serve_with_config(
        &db,
        "[agents]\nanalyst = \"external\"\ngatekeeper = \"external\"\nethics = \"external\"\n\
         [[tools.external]]\nname = \"crm_lookup\"\ndescription = \"Looks a sender up\"\n\
         keywords = [\"sender\", \"발신자\"]\n",
    );
    let base = server.base.clone();

    // The published schema is the one decisions are checked against.
    let (_, body) = post(
        &base,
        Some(&workers_key),
        "{ agentDecisionSchema(role: ANALYST) }",
        &json!({}),
    )
    .await;
    let tools = &body["data"]["agentDecisionSchema"]["properties"]["subtasks"]["items"]
        ["properties"]["tool"]["enum"];
    for tool in ["keywords", "crm_lookup"] {
        assert!(tools.as_array().unwrap().contains(&json!(tool)), "{body}");
    }

    let seen = Arc::new(Mutex::new(Seen::default()));
    let stop = tokio_util::sync::CancellationToken::new();
    let mut workers = tokio::task::JoinSet::new();
    for role in ["ANALYST", "GATEKEEPER", "ETHICS"] {
        for i in 1..=2 {
            workers.spawn(worker(
                base.clone(),
                workers_key.clone(),
                role,
                format!("{}-{i}", role.to_lowercase()),
                None,
                seen.clone(),
                stop.clone(),
            ));
        }
    }
    let mut tool_workers = tokio::task::JoinSet::new();
    for i in 1..=2 {
        tool_workers.spawn(tool_worker(
            base.clone(),
            workers_key.clone(),
            format!("crm-{i}"),
            stop.clone(),
        ));
    }
    // This gatekeeper decides three workflows, then dies holding a fourth.
    let dying = tokio::spawn(worker(
        base.clone(),
        workers_key.clone(),
        "GATEKEEPER",
        "gatekeeper-doomed".into(),
        Some(3),
        seen.clone(),
        stop.clone(),
    ));

    let store = db.store().await;
    let mut events = store.subscribe_all(1);
    let started = Instant::now();
    let mut submitted = HashMap::new();
    for i in 0..60 {
        let request = [COMPLETES, REJECTED, KOREAN][i % 3];
        let (_, body) = post(
            &base,
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
    // Another tenant's worker never sees these tasks.
    let (_, body) = post(
        &base,
        Some(&other_tenant),
        CLAIM,
        &json!({ "role": "ANALYST", "worker": "spy" }),
    )
    .await;
    assert!(body["data"]["claimAgentTask"].is_null(), "{body}");

    // Follow the ledger until every workflow is final.
    let streams = follow_to_end(
        &mut events,
        submitted.keys().cloned(),
        Duration::from_secs(120),
    )
    .await
    .unwrap_or_else(|open| panic!("workflows not final: {open:?}"));
    let elapsed = started.elapsed();
    stop.cancel();
    workers.join_all().await;
    let answered: usize = tool_workers.join_all().await.into_iter().sum();
    let abandoned = dying
        .await
        .unwrap()
        .expect("the doomed worker died with a task");

    for (id, request) in &submitted {
        let events = &streams[id];
        let ids: HashSet<_> = events.iter().map(|e| e.event_id).collect();
        assert_eq!(ids.len(), events.len(), "{id}: an event twice");
        for (i, e) in events.iter().enumerate() {
            assert_eq!(e.stream_version, i as u64, "{id}: versions dense");
        }
        let expected = if *request == REJECTED {
            "WorkflowRejected"
        } else {
            "WorkflowCompleted"
        };
        assert_eq!(events.last().unwrap().event_type, expected, "{id}");
        // The external tool's output is the tool worker's answer.
        let lookups: Vec<_> = events
            .iter()
            .filter(|e| e.event_type == "SubtaskSucceeded")
            .filter_map(|e| {
                match agentledger_domain::workflow::WorkflowEvent::decode(
                    &e.event_type,
                    e.schema_version,
                    &e.payload,
                ) {
                    Ok(agentledger_domain::workflow::WorkflowEvent::SubtaskSucceeded {
                        subtask,
                        output,
                        ..
                    }) if subtask == "crm" => Some(output.as_str().to_string()),
                    _ => None,
                }
            })
            .collect();
        if *request == REJECTED {
            assert!(lookups.is_empty(), "{id}: nothing runs after a rejection");
        } else {
            assert_eq!(lookups, vec![crm_record(request)], "{id}");
        }
        for (event_type, role) in [
            ("AnalysisProduced", "ANALYST"),
            ("GateDecided", "GATEKEEPER"),
            ("EthicsReviewed", "ETHICS"),
        ] {
            let decisions: Vec<_> = events
                .iter()
                .filter(|e| e.event_type == event_type)
                .collect();
            if event_type == "EthicsReviewed" && *request == REJECTED {
                assert!(decisions.is_empty());
                continue;
            }
            assert_eq!(decisions.len(), 1, "{id}: one {event_type}");
            let metadata = decisions[0].metadata().unwrap();
            assert!(
                metadata.actor.name.starts_with(&role.to_lowercase()),
                "{id}: {event_type} by {:?}",
                metadata.actor
            );
            assert_eq!(metadata.actor.role, role);
            assert_eq!(metadata.actor.version, "0.3.0");
            assert!(metadata.actor.subject.starts_with("apikey:"));
            assert_eq!(
                metadata.policy.unwrap().name,
                format!("{}-py", role.to_lowercase())
            );
        }
    }
    // The doomed worker's last task went to another worker.
    let (workflow, _) = abandoned.split_once(':').unwrap();
    let gate = streams[workflow]
        .iter()
        .find(|e| e.event_type == "GateDecided")
        .unwrap();
    assert_ne!(gate.metadata().unwrap().actor.name, "gatekeeper-doomed");
    // Its late decision is refused, nothing written.
    let (_, body) = post(
        &base,
        Some(&workers_key),
        SUBMIT,
        &json!({ "task": abandoned, "decision": decide("GATEKEEPER", &json!({})),
                 "worker": "gatekeeper-doomed" }),
    )
    .await;
    assert_eq!(code(&body), Some("CONFLICT"), "{body}");
    // A decision of the wrong shape names the path that failed.
    let (_, body) = post(
        &base,
        Some(&workers_key),
        SUBMIT,
        &json!({ "task": abandoned, "decision": { "verdict": "MAYBE" }, "worker": "x" }),
    )
    .await;
    assert_eq!(code(&body), Some("BAD_INPUT"), "{body}");
    assert!(
        body["errors"][0]["extensions"]["schemaPath"].is_string(),
        "{body}"
    );

    let seen = seen.lock().unwrap();
    let mut trips = seen.round_trips.clone();
    trips.sort();
    let at = |q: f64| trips[((trips.len() - 1) as f64 * q) as usize];
    println!(
        "external workers: {} workflows in {:.2} s ({:.1}/s), {} decisions, claim→submit p50 {:.1} ms p99 {:.1} ms; by worker {:?}",
        submitted.len(),
        elapsed.as_secs_f64(),
        submitted.len() as f64 / elapsed.as_secs_f64(),
        trips.len(),
        at(0.5).as_secs_f64() * 1e3,
        at(0.99).as_secs_f64() * 1e3,
        seen.decided
    );
    // 60 analyses, 60 verdicts, 40 reviews; 40 lookups.
    assert_eq!(trips.len(), 160);
    assert!(answered >= 40, "{answered} lookups answered");
    assert!(server.stop().success());
}
