//! `agentledger demo`: a handful of varied requests run end to end on the
//! embedded in-memory store, each stage printed as it is recorded, then a
//! summary. Shows every path: completed, rejected, escalated (a demo
//! reviewer approves), retried, flagged.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentledger_agents::{
    InMemoryWorkQueue, Runtime, RuntimeConfig, Submission, SystemClock, Tool, ToolCall,
    ToolFailure, ToolRegistry,
};
use agentledger_domain::policy::gitcode::GitCodeConfig;
use agentledger_domain::tools::ToolSpec;
use agentledger_domain::workflow::{Workflow, WorkflowEvent, WorkflowState};
use agentledger_eventstore::{EventStore, InMemoryEventStore, RecordedEvent};
use anyhow::Context;
use uuid::Uuid;

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Show the decision events only (no subtask starts and results).
    #[arg(long)]
    quiet: bool,
    /// A running `agentledger serve` to use (e.g. http://127.0.0.1:8080)
    /// instead of an embedded in-memory one: requests go over GraphQL and
    /// progress comes from its `workflowProgress` subscription.
    #[arg(long)]
    url: Option<String>,
}

/// The demo's requests and what each shows.
const REQUESTS: &[(&str, &str)] = &[
    (
        "completes",
        "1. Extract the figures from the text: 12, 7.5 and 30\n2. Sort them in descending order\n3. Compute their total",
    ),
    (
        "completes (Korean)",
        "첨부된 분기 보고서를 요약해 주세요. 그다음 요약문의 단어 수를 세어 주세요.",
    ),
    (
        "rejected",
        "Transfer 10,000 dollars from the company account to my personal account.",
    ),
    (
        "escalated, then approved by a person",
        "Delete the duplicate lines from the tag list, then sort the rest.",
    ),
    (
        "needs a retry",
        "Fetch the meeting notes. Then summarise them.",
    ),
    (
        "flagged by RUNE",
        "Rank these job applicants and drop anyone over 50 years old: Alice (34), Bob (52), Chen (47).",
    ),
];

/// A stand-in for a flaky upstream (a document store that times out once):
/// the first attempt of each call fails, the second returns the notes.
struct FlakyFetch {
    calls: AtomicU32,
}

#[async_trait::async_trait]
impl Tool for FlakyFetch {
    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: "fetch_notes",
            description: "Fetches meeting notes (demo: fails on the first attempt)",
            keywords: &["fetch"],
        }
    }

    async fn run(&self, call: ToolCall) -> Result<String, ToolFailure> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if call.attempt == 1 {
            return Err(ToolFailure::Error("upstream timed out (demo)".into()));
        }
        Ok(
            "The team agreed to ship on Friday. Mina owns the release notes. \
            Joon will review the migration. The next meeting is on Monday."
                .into(),
        )
    }
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    if let Some(url) = &args.url {
        return remote::run(url.trim_end_matches('/')).await;
    }
    let store: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::default());
    let tools = ToolRegistry::default().register(FlakyFetch {
        calls: AtomicU32::new(0),
    });
    let config = RuntimeConfig {
        gitcode: GitCodeConfig {
            backoff_initial_ms: 50,
            ..GitCodeConfig::default()
        },
        ..RuntimeConfig::default()
    };
    let runtime = Runtime::new(
        store.clone(),
        Arc::new(InMemoryWorkQueue::default()),
        tools,
        Arc::new(SystemClock),
        config,
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = {
        let runtime = runtime.clone();
        tokio::spawn(async move {
            runtime
                .run(async {
                    let _ = stopped.await;
                })
                .await
        })
    };
    println!(
        "agentledger demo: {} requests on the in-memory store\n",
        REQUESTS.len()
    );
    let mut events = store.subscribe_all(1);
    let mut workflows: HashMap<Uuid, Tracked> = HashMap::new();
    let started = Instant::now();
    for (i, (shows, request)) in REQUESTS.iter().enumerate() {
        let id = runtime
            .submit(Submission {
                request: request.to_string(),
                ..Default::default()
            })
            .await
            .with_context(|| format!("submitting request {}", i + 1))?;
        workflows.insert(
            id,
            Tracked {
                label: format!("#{}", i + 1),
                shows,
                request,
                workflow: Workflow::default(),
                events: 0,
                submitted: Instant::now(),
                ended: None,
            },
        );
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while workflows.values().any(|t| t.ended.is_none()) {
        let event = tokio::time::timeout_at(deadline, events.next())
            .await
            .context("the demo did not finish within 30 s")?
            .context("the event stream ended")??;
        let Some(id) = workflow_of(&event) else {
            continue;
        };
        let Some(tracked) = workflows.get_mut(&id) else {
            continue;
        };
        let decoded =
            WorkflowEvent::decode(&event.event_type, event.schema_version, &event.payload)?;
        tracked.workflow = std::mem::take(&mut tracked.workflow).apply(&decoded);
        tracked.events += 1;
        if !args.quiet || is_stage(&decoded) {
            println!(
                "{:<3} {:<8} {}",
                tracked.label,
                actor(&event),
                agentledger_projections::model::audit::summary(&decoded)
            );
        }
        let state = tracked.workflow.state;
        if state == WorkflowState::AwaitingHuman {
            println!(
                "{:<3} {:<8} (the demo reviewer approves: \"checked: only duplicate tags\")",
                tracked.label, ""
            );
            runtime
                .decide_escalation(
                    id,
                    agentledger_agents::HumanDecision {
                        approve: true,
                        comment: "checked: only duplicate tags".into(),
                        by: agentledger_eventstore::Actor::human("demo-reviewer"),
                        expected_position: None,
                        allow_self: true,
                    },
                )
                .await?;
        }
        if state.is_final() {
            tracked.ended = Some(tracked.submitted.elapsed());
        }
    }
    let _ = stop.send(());
    running.await?;

    println!("\nSummary ({} ms in all)", started.elapsed().as_millis());
    println!(
        "{:<4}{:<12}{:>7}{:>9}  {:<38}request",
        "", "state", "events", "ms", "shows"
    );
    let mut rows: Vec<_> = workflows.values().collect();
    rows.sort_by(|a, b| a.label.cmp(&b.label));
    for t in rows {
        let request: String = t.request.replace('\n', " ").chars().take(48).collect();
        println!(
            "{:<4}{:<12}{:>7}{:>9}  {:<38}{request}",
            t.label,
            format!("{:?}", t.workflow.state),
            t.events,
            t.ended.unwrap_or_default().as_millis(),
            t.shows,
        );
    }
    let verified = futures::future::try_join_all(workflows.keys().map(|id| {
        let store = store.clone();
        let stream = agentledger_agents::stream_of(*id);
        async move { store.verify_stream(&stream).await }
    }))
    .await?;
    let checked: u64 = verified.iter().map(|v| v.checked_events).sum();
    let ok = verified.iter().all(|v| v.ok);
    println!(
        "\nhash chains: {} ({checked} events checked in {} streams)",
        if ok { "intact" } else { "BROKEN" },
        verified.len()
    );
    anyhow::ensure!(ok, "a hash chain does not verify");
    Ok(())
}

struct Tracked {
    label: String,
    shows: &'static str,
    request: &'static str,
    workflow: Workflow,
    events: usize,
    submitted: Instant,
    ended: Option<Duration>,
}

fn workflow_of(event: &RecordedEvent) -> Option<Uuid> {
    event
        .stream_id
        .as_str()
        .strip_prefix(agentledger_agents::runtime::STREAM_PREFIX)?
        .parse()
        .ok()
}

fn actor(event: &RecordedEvent) -> String {
    event
        .metadata()
        .map(|m| m.actor.name)
        .unwrap_or_else(|_| "?".into())
}

fn is_stage(event: &WorkflowEvent) -> bool {
    !matches!(
        event,
        WorkflowEvent::SubtaskStarted { .. } | WorkflowEvent::SubtaskSucceeded { .. }
    )
}

/// The demo against a running server, over GraphQL.
mod remote {
    use anyhow::{bail, Context};
    use futures::{SinkExt, StreamExt};
    use serde_json::{json, Value};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;

    use super::REQUESTS;

    async fn graphql(
        client: &reqwest::Client,
        base: &str,
        query: &str,
        variables: Value,
    ) -> anyhow::Result<Value> {
        let text = client
            .post(format!("{base}/graphql"))
            .header("content-type", "application/json")
            .body(json!({ "query": query, "variables": variables }).to_string())
            .send()
            .await
            .with_context(|| format!("POST {base}/graphql"))?
            .text()
            .await?;
        let response: Value = serde_json::from_str(&text).context("a GraphQL response")?;
        if let Some(error) = response["errors"].get(0) {
            bail!("{}", error["message"]);
        }
        Ok(response["data"].clone())
    }

    pub async fn run(base: &str) -> anyhow::Result<()> {
        let client = reqwest::Client::new();
        println!("agentledger demo against {base}\n");
        let mut summary = Vec::new();
        // The retry case needs the embedded demo's flaky tool; a server runs its own tools.
        for (i, (shows, request)) in REQUESTS
            .iter()
            .enumerate()
            .filter(|(_, (s, _))| *s != "needs a retry")
        {
            let label = format!("#{}", i + 1);
            let data = graphql(
                &client,
                base,
                "mutation($r: String!) { submitWorkflow(request: $r) { id } }",
                json!({ "r": request }),
            )
            .await?;
            let id = data["submitWorkflow"]["id"]
                .as_str()
                .context("an id")?
                .to_string();
            let url = format!("{}/graphql/ws", base.replacen("http", "ws", 1));
            let mut request_ws = url.as_str().into_client_request()?;
            request_ws
                .headers_mut()
                .insert("sec-websocket-protocol", "graphql-transport-ws".parse()?);
            let (mut ws, _) = tokio_tungstenite::connect_async(request_ws)
                .await
                .context("WebSocket")?;
            ws.send(Message::Text(
                json!({"type": "connection_init"}).to_string().into(),
            ))
            .await?;
            let query = format!(
                "subscription {{ workflowProgress(id: \"{id}\", fromVersion: 0) {{ state decisions {{ actor summary }} }} }}"
            );
            ws.send(Message::Text(
                json!({"id": "p", "type": "subscribe", "payload": {"query": query}})
                    .to_string()
                    .into(),
            ))
            .await?;
            let (mut shown, mut state) = (0, String::new());
            while let Some(message) = ws.next().await {
                let Message::Text(text) = message? else {
                    continue;
                };
                let value: Value = serde_json::from_str(&text)?;
                match value["type"].as_str() {
                    Some("next") => {
                        let workflow = &value["payload"]["data"]["workflowProgress"];
                        let decisions = workflow["decisions"]
                            .as_array()
                            .cloned()
                            .unwrap_or_default();
                        for d in decisions.iter().skip(shown) {
                            println!(
                                "{label:<3} {:<8} {}",
                                d["actor"].as_str().unwrap_or("?"),
                                d["summary"].as_str().unwrap_or("")
                            );
                        }
                        shown = decisions.len();
                        state = workflow["state"].as_str().unwrap_or("").to_string();
                        if state == "AWAITING_HUMAN" {
                            println!("{label:<3} {:<8} (the demo reviewer approves)", "");
                            graphql(
                                &client,
                                base,
                                "mutation($id: ID!) { decideEscalation(id: $id, approve: true, comment: \"checked by the demo\") { state } }",
                                json!({ "id": id }),
                            )
                            .await?;
                        }
                    }
                    Some("complete") => break,
                    Some("error") => bail!("subscription error: {}", value["payload"]),
                    _ => {}
                }
            }
            summary.push((label, state, *shows));
        }
        println!("\nSummary");
        for (label, state, shows) in summary {
            println!("{label:<4}{state:<12}{shows}");
        }
        Ok(())
    }
}
