//! `bench api --closed-loop --external-agents`: the worker protocol's
//! overhead. The server leaves the analyst, the gatekeeper and the ethics
//! reviewer to workers, and this bench runs them in-process, as a worker
//! program would: each waits on `agentTasks(role)` over WebSocket, claims
//! with `claimAgentTask` and submits with `submitAgentDecision` over HTTP.
//! The analyst plans exactly as the built-in Sena would (its policy, called
//! here), the gatekeeper approves and the reviewer passes, so that a run
//! against the built-ins has the same workflows: only the protocol differs.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentledger_domain::policy::sena;
use agentledger_domain::tools::{ToolSpec, BUILTIN_TOOLS};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use super::closed_loop;

/// The server's configuration: the three deciding roles left to workers.
pub(super) const CONFIG: &str =
    "[agents]\nanalyst = \"external\"\ngatekeeper = \"external\"\nethics = \"external\"\n";

/// Workers per role.
const PER_ROLE: usize = 2;

const CLAIM: &str = "mutation($role: AgentRole!, $worker: String!) {
    claimAgentTask(role: $role, workerId: $worker, leaseSeconds: 30) { id context }
}";
const SUBMIT: &str = "mutation($task: ID!, $decision: JSON!, $worker: String!) {
    submitAgentDecision(taskId: $task, decision: $decision, workerId: $worker,
                        workerVersion: \"bench\", policy: {name: \"bench\", version: \"1\"}) { id }
}";

/// Claim→submit round trips, as the workers saw them.
#[derive(Default)]
pub(super) struct Trips(Mutex<Vec<Duration>>);

impl Trips {
    /// Decisions, and the round trip's p50 and p99 in milliseconds.
    pub fn summary(&self) -> Value {
        let mut trips = self.0.lock().expect("trips lock").clone();
        trips.sort();
        let at = |q: f64| {
            trips
                .get(((trips.len().saturating_sub(1)) as f64 * q) as usize)
                .map_or(0.0, |d| d.as_secs_f64() * 1e3)
        };
        json!({
            "decisions": trips.len(),
            "claim_submit_ms": { "p50": at(0.5), "p99": at(0.99) },
        })
    }
}

/// Starts the workers; they stop with `stop`.
pub(super) fn spawn(
    base: &str,
    key: &str,
    trips: Arc<Trips>,
    stop: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinSet<anyhow::Result<()>> {
    let mut workers = tokio::task::JoinSet::new();
    for role in ["ANALYST", "GATEKEEPER", "ETHICS"] {
        for i in 1..=PER_ROLE {
            let (base, key) = (base.to_string(), key.to_string());
            let (trips, stop) = (trips.clone(), stop.clone());
            let id = format!("{}-{i}", role.to_lowercase());
            workers.spawn(async move {
                tokio::select! {
                    served = serve(&base, &key, role, &id, &trips) => served,
                    () = stop.cancelled() => Ok(()),
                }
            });
        }
    }
    workers
}

async fn serve(base: &str, key: &str, role: &str, id: &str, trips: &Trips) -> anyhow::Result<()> {
    let ws_url = format!("{}/graphql/ws", base.replacen("http", "ws", 1));
    let mut ws = closed_loop::open(&ws_url, Some(key)).await?;
    ws.send(Message::Text(
        json!({"id": "1", "type": "subscribe", "payload": {
            "query": "subscription($role: AgentRole) { agentTasks(role: $role) { role } }",
            "variables": { "role": role } }})
        .to_string()
        .into(),
    ))
    .await?;
    let http = reqwest::Client::new();
    let specs: Vec<ToolSpec> = BUILTIN_TOOLS.iter().map(|t| t.spec).collect();
    loop {
        loop {
            let started = Instant::now();
            let claimed = post(
                &http,
                base,
                key,
                CLAIM,
                json!({ "role": role, "worker": id }),
            )
            .await?;
            let task = &claimed["data"]["claimAgentTask"];
            if task.is_null() {
                break;
            }
            let decision = decide(role, &task["context"], &specs);
            let submitted = post(
                &http,
                base,
                key,
                SUBMIT,
                json!({ "task": task["id"], "decision": decision, "worker": id }),
            )
            .await?;
            match submitted["errors"][0]["extensions"]["code"].as_str() {
                None => trips.0.lock().expect("trips lock").push(started.elapsed()),
                // Its lease ran out and another worker decided.
                Some("CONFLICT") => {}
                Some(_) => anyhow::bail!("{id}: {submitted}"),
            }
        }
        match ws.next().await {
            Some(Ok(Message::Text(_))) => {}
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.into()),
            None => anyhow::bail!("{id}: the server closed agentTasks"),
        }
    }
}

/// The workers' policies: Sena's plan, approval, a passing review.
fn decide(role: &str, context: &Value, specs: &[ToolSpec]) -> Value {
    match role {
        "ANALYST" => {
            let request = context["request"].as_str().unwrap_or_default();
            let round = context["round"].as_u64().unwrap_or(0) as u8;
            let analysis = sena::analyse(&sena::SenaConfig::default(), request, round, specs);
            json!({
                "subtasks": analysis.subtasks.iter().map(|s| json!({
                    "id": s.id, "title": s.title.as_str(), "tool": s.tool, "dependsOn": s.depends_on,
                })).collect::<Vec<_>>(),
                "confidence": analysis.confidence,
                "rationale": analysis.rationale.as_str(),
            })
        }
        "GATEKEEPER" => json!({
            "verdict": "APPROVE", "priority": "NORMAL", "risk": 0.1,
            "reasons": [], "rationale": "the plan runs on registered tools"
        }),
        _ => json!({
            "transparency": 0.9, "collaboration": 0.9, "autonomy": 1.0, "fairness": 1.0,
            "passed": true, "findings": [], "rationale": "nothing to flag"
        }),
    }
}

async fn post(
    http: &reqwest::Client,
    base: &str,
    key: &str,
    query: &str,
    variables: Value,
) -> anyhow::Result<Value> {
    let response = http
        .post(format!("{base}/graphql"))
        .header("content-type", "application/json")
        .bearer_auth(key)
        .body(json!({ "query": query, "variables": variables }).to_string())
        .send()
        .await?;
    Ok(serde_json::from_str(&response.text().await?)?)
}
