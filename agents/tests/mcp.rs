//! Tools of a real MCP server (built with `rmcp`'s server side, over
//! streamable HTTP on loopback), called by the executor on real
//! PostgreSQL: the intent recorded before each call and the outcome
//! after; a crash between the two retried only for a tool declared
//! idempotent, and sent to a person otherwise.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentledger_agents::{
    FaultPlan, FaultPoint, HumanDecision, ManualClock, McpServer, McpToolSpec, PostgresWorkQueue,
    Runtime, RuntimeConfig, Submission, SystemClock, ToolRegistry, WorkQueue,
};
use agentledger_domain::policy::gitcode::GitCodeConfig;
use agentledger_domain::workflow::{FailureKind, ToolIntent, WorkflowEvent, WorkflowState};
use agentledger_eventstore::testing::TestDatabase;
use agentledger_eventstore::{Actor, EventStore};
use common::*;
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{CallToolResult, Content, Meta, ServerCapabilities, ServerInfo};
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{tool, tool_handler, tool_router, ErrorData, ServerHandler};
use serde_json::Value;
use sha2::Digest;

/// A call the server received: tool, arguments, idempotency key, and the
/// ledger's head when it arrived.
#[derive(Debug, Clone)]
struct Received {
    tool: String,
    arguments: Value,
    key: Option<String>,
    head: u64,
}

#[derive(Debug, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
struct NotifyArgs {
    /// What to say.
    text: String,
    /// Why.
    instruction: String,
}

#[derive(Debug, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
struct PingArgs {
    text: String,
}

#[derive(Debug, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
struct SlowArgs {
    text: String,
}

#[derive(Debug, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
struct TallyArgs {
    n: u32,
}

/// The server: `notify` answers, `ping` fails its first call, `tally`
/// takes no text (so no subtask input fits it).
#[derive(Clone)]
struct Notifier {
    received: Arc<Mutex<Vec<Received>>>,
    store: Arc<dyn EventStore>,
    tool_router: ToolRouter<Self>,
}

fn key_of(meta: &Meta) -> Option<String> {
    meta.get(agentledger_agents::mcp::IDEMPOTENCY_META_KEY)
        .and_then(Value::as_str)
        .map(str::to_string)
}

#[tool_router]
impl Notifier {
    #[tool(description = "Sends a notification to the team")]
    async fn notify(
        &self,
        meta: Meta,
        Parameters(args): Parameters<NotifyArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        let answer = format!("sent {} characters", args.text.chars().count());
        self.note("notify", serde_json::to_value(&args).unwrap(), &meta)
            .await;
        Ok(CallToolResult::success(vec![Content::text(answer)]))
    }

    #[tool(description = "Pages whoever is on call")]
    async fn ping(
        &self,
        meta: Meta,
        Parameters(args): Parameters<PingArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        let first = self
            .note("ping", serde_json::to_value(&args).unwrap(), &meta)
            .await
            == 1;
        Ok(if first {
            CallToolResult::error(vec![Content::text("the pager is busy")])
        } else {
            CallToolResult::success(vec![Content::text("paged")])
        })
    }

    #[tool(description = "Archives a text; slow the first time")]
    async fn archive(
        &self,
        meta: Meta,
        Parameters(args): Parameters<SlowArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        let first = self
            .note("archive", serde_json::to_value(&args).unwrap(), &meta)
            .await
            == 1;
        if first {
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        Ok(CallToolResult::success(vec![Content::text("archived")]))
    }

    #[tool(description = "Counts to n")]
    async fn tally(
        &self,
        meta: Meta,
        Parameters(args): Parameters<TallyArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        self.note("tally", serde_json::to_value(&args).unwrap(), &meta)
            .await;
        Ok(CallToolResult::success(vec![Content::text(
            (1..=args.n)
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(" "),
        )]))
    }
}

impl Notifier {
    /// Keeps a call; returns how many calls of `tool` there were.
    async fn note(&self, tool: &str, arguments: Value, meta: &Meta) -> usize {
        let head = self.store.head_position().await.unwrap();
        let mut received = self.received.lock().unwrap();
        received.push(Received {
            tool: tool.into(),
            arguments,
            key: key_of(meta),
            head,
        });
        received.iter().filter(|r| r.tool == tool).count()
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for Notifier {
    fn get_info(&self) -> ServerInfo {
        ServerInfo {
            capabilities: ServerCapabilities::builder().enable_tools().build(),
            ..Default::default()
        }
    }
}

/// A running server and what it received.
struct Server {
    url: String,
    received: Arc<Mutex<Vec<Received>>>,
}

impl Server {
    /// Serves on loopback; each call notes the head of `store`'s ledger.
    async fn start(store: Arc<dyn EventStore>) -> Self {
        let received = Arc::new(Mutex::new(Vec::new()));
        let notifier = Notifier {
            received: received.clone(),
            store,
            tool_router: Notifier::tool_router(),
        };
        let service: StreamableHttpService<Notifier, LocalSessionManager> =
            StreamableHttpService::new(
                move || Ok(notifier.clone()),
                Default::default(),
                StreamableHttpServerConfig::default(),
            );
        let router = axum::Router::new().nest_service("/mcp", service);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/mcp", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, router).await });
        Self { url, received }
    }

    fn calls(&self, tool: &str) -> Vec<Received> {
        let received = self.received.lock().unwrap();
        received
            .iter()
            .filter(|r| r.tool == tool)
            .cloned()
            .collect()
    }

    fn tool(&self, name: &str, keywords: &[&str], idempotent: bool) -> McpToolSpec {
        McpToolSpec {
            name: format!("team_{name}"),
            server: McpServer::Url(self.url.clone()),
            tool: name.into(),
            description: format!("{name} on the team's server"),
            keywords: keywords.iter().map(|k| k.to_string()).collect(),
            idempotent,
            deterministic: false,
            input_argument: None,
            instruction_argument: None,
            bearer_token_env: None,
            env: Vec::new(),
        }
    }
}

async fn postgres(db: &TestDatabase) -> (Arc<dyn EventStore>, Arc<dyn WorkQueue>) {
    let store = db.store().await;
    let queue = Arc::new(PostgresWorkQueue::new(store.pool().clone()));
    (Arc::new(store) as Arc<dyn EventStore>, queue)
}

/// Retries start at once: the crash tests' clock only moves when told.
fn config(owner: &str, server: &Server, idempotent: bool) -> RuntimeConfig {
    RuntimeConfig {
        owner: owner.into(),
        gitcode: GitCodeConfig {
            backoff_initial_ms: 0,
            ..GitCodeConfig::default()
        },
        mcp_tools: vec![
            server.tool("notify", &["notify", "알림"], idempotent),
            server.tool("ping", &["ping"], idempotent),
            server.tool("tally", &["tally"], idempotent),
            server.tool("archive", &["archive"], idempotent),
        ],
        ..RuntimeConfig::default()
    }
}

/// Starts, failures and successes in order, as `start 1`, `Error 1`, `ok 1`.
fn attempts(decoded: &[WorkflowEvent]) -> Vec<String> {
    decoded
        .iter()
        .filter_map(|e| match e {
            WorkflowEvent::SubtaskStarted { attempt, .. } => Some(format!("start {attempt}")),
            WorkflowEvent::SubtaskFailed { attempt, kind, .. } => {
                Some(format!("{kind:?} {attempt}"))
            }
            WorkflowEvent::SubtaskSucceeded { attempt, .. } => Some(format!("ok {attempt}")),
            WorkflowEvent::SubtaskEscalated { attempt, .. } => Some(format!("person {attempt}")),
            _ => None,
        })
        .collect()
}

/// The starts that recorded an intent, with their intents.
fn intents(followed: &Followed) -> Vec<(Arc<agentledger_eventstore::RecordedEvent>, ToolIntent)> {
    followed
        .events
        .iter()
        .zip(&followed.decoded)
        .filter_map(|(recorded, e)| match e {
            WorkflowEvent::SubtaskStarted {
                intent: Some(intent),
                ..
            } => Some((recorded.clone(), intent.clone())),
            _ => None,
        })
        .collect()
}

fn sha256_of(arguments: &Value) -> String {
    hex::encode(sha2::Sha256::digest(
        agentledger_eventstore::chain::canonical_json(arguments),
    ))
}

/// Each call's intent, recorded before it: the server, the tool, the hash
/// of exactly the arguments the server received, and an idempotency key
/// that is the intent event's id and reached the server with the call.
/// The outcome follows; a tool's error is retried with a new intent; an
/// input no argument takes fails at once, with nothing sent.
#[tokio::test]
async fn an_mcp_tool_is_called_with_its_intent_recorded_first() {
    let db = TestDatabase::create().await;
    let (store, queue) = postgres(&db).await;
    let server = Server::start(store.clone()).await;
    let running = Running::start(
        store.clone(),
        queue,
        ToolRegistry::default(),
        Arc::new(SystemClock),
        config("node", &server, false),
    );
    let mut ids = Vec::new();
    let notice = "Notify the team: 배포가 끝났습니다.";
    for request in [notice, "Ping the on-call engineer.", "Tally the votes."] {
        let id = running
            .runtime
            .submit(Submission {
                request: request.into(),
                ..Default::default()
            })
            .await
            .unwrap();
        ids.push(id);
    }
    let seen = settle(&*store, &ids).await;

    // notify: one call, declared first.
    let notify = &seen[&ids[0]];
    assert_eq!(notify.workflow.state, WorkflowState::Completed);
    assert_eq!(attempts(&notify.decoded), ["start 1", "ok 1"]);
    let calls = server.calls("notify");
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0].arguments["text"], notice);
    let (start, intent) = notify
        .events
        .iter()
        .zip(&notify.decoded)
        .find_map(|(recorded, e)| match e {
            WorkflowEvent::SubtaskStarted {
                intent: Some(intent),
                ..
            } => Some((recorded, intent)),
            _ => None,
        })
        .expect("the start records the intent");
    assert_eq!(intent.server, server.url);
    assert_eq!(intent.tool, "notify");
    assert!(!intent.idempotent);
    assert_eq!(intent.arguments_sha256, sha256_of(&calls[0].arguments));
    assert_eq!(intent.idempotency_key, start.event_id);
    assert!(
        calls[0].head >= start.global_position,
        "the intent was committed before the server acted"
    );
    assert_eq!(
        calls[0].key.as_deref(),
        Some(start.event_id.to_string().as_str())
    );
    let output = notify.decoded.iter().find_map(|e| match e {
        WorkflowEvent::SubtaskSucceeded { output, .. } => Some(output.as_str().to_string()),
        _ => None,
    });
    assert_eq!(
        output,
        Some(format!("sent {} characters", notice.chars().count())),
        "the server's answer is the outcome"
    );
    assert_each_decision_once(ids[0], notify);

    // ping: the tool's error is retried, under a new intent and key.
    let ping = &seen[&ids[1]];
    assert_eq!(ping.workflow.state, WorkflowState::Completed);
    assert_eq!(
        attempts(&ping.decoded),
        ["start 1", "Error 1", "start 2", "ok 2"]
    );
    let keys: Vec<_> = server.calls("ping").into_iter().map(|c| c.key).collect();
    assert_eq!(keys.len(), 2);
    assert_ne!(keys[0], keys[1]);

    // tally: no argument takes text; nothing is sent, nothing retried.
    let tally = &seen[&ids[2]];
    assert_eq!(tally.workflow.state, WorkflowState::Failed);
    assert!(tally.decoded.iter().any(|e| matches!(
        e,
        WorkflowEvent::SubtaskFailed {
            kind: FailureKind::Invalid,
            will_retry: false,
            error,
            ..
        } if error.as_str().contains("input_argument")
    )));
    assert!(server.calls("tally").is_empty());
    running.stop().await;
}

/// A runtime killed after the server acted but before the outcome was
/// recorded: the survivor records the attempt as abandoned and asks a
/// person instead of calling again; the call is made again only after a
/// person approves, under a new key, and the person's decision names the
/// escalation it answers.
#[tokio::test]
async fn a_lost_call_to_a_tool_not_idempotent_waits_for_a_person() {
    let db = TestDatabase::create().await;
    let (store, queue) = postgres(&db).await;
    let server = Server::start(store.clone()).await;
    let clock = ManualClock::new(chrono::Utc::now());
    let doomed = Running::start_runtime(Runtime::with_faults(
        store.clone(),
        queue.clone(),
        ToolRegistry::default(),
        Arc::new(clock.clone()),
        config("doomed", &server, false),
        Some(FaultPlan::at(FaultPoint::BeforeSubtaskResult, 1)),
    ));
    let id = doomed
        .runtime
        .submit(Submission {
            request: "Notify the team: 점검이 시작됩니다.".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    doomed.ended().await;
    // The dead runtime's sleeps go with its tasks: only then do the
    // survivor's count.
    clock.sleepers_at_most(0).await;
    assert_eq!(server.calls("notify").len(), 1, "the server acted once");

    let survivor = Running::start(
        store.clone(),
        queue.clone(),
        ToolRegistry::default(),
        Arc::new(clock.clone()),
        config("survivor", &server, false),
    );
    clock.sleepers_at_least(3).await;
    clock.advance(RuntimeConfig::default().lease + Duration::from_secs(1));
    let followed = {
        let store = store.clone();
        tokio::spawn(async move {
            follow_until(&*store, &[id], Duration::from_secs(20), |w| {
                w.state == WorkflowState::AwaitingHuman
            })
            .await
        })
        .await
    };
    let Ok(seen) = followed else {
        let stream = agentledger_eventstore::StreamId::new(format!("workflow-{id}")).unwrap();
        let stored = store.read_stream(&stream, 0, 100).await.unwrap();
        let head = store.head_position().await.unwrap();
        panic!(
            "not waiting for a person; head {head}, stored: {:?}",
            stored
                .iter()
                .map(|e| (e.global_position, e.event_type.clone()))
                .collect::<Vec<_>>()
        );
    };
    let waiting = &seen[&id];
    assert_eq!(
        attempts(&waiting.decoded),
        ["start 1", "Abandoned 1", "person 1"]
    );
    assert_eq!(server.calls("notify").len(), 1, "not called again unasked");
    let escalated = waiting.events.last().unwrap().clone();
    assert_eq!(escalated.event_type, "SubtaskEscalated");

    survivor
        .runtime
        .decide_escalation(
            id,
            HumanDecision {
                approve: true,
                comment: "the notice did not go out; send it".into(),
                by: Actor::human("operator-kim"),
                expected_position: None,
                allow_self: false,
            },
        )
        .await
        .unwrap();
    let seen = follow_until(&*store, &[id], Duration::from_secs(60), |w| {
        w.state.is_final()
    })
    .await;
    let done = &seen[&id];
    assert_eq!(done.workflow.state, WorkflowState::Completed);
    assert_eq!(
        attempts(&done.decoded),
        ["start 1", "Abandoned 1", "person 1", "start 2", "ok 2"]
    );
    let answers = done.decoded.iter().find_map(|e| match e {
        WorkflowEvent::HumanDecisionRecorded { answers, .. } => answers.clone(),
        _ => None,
    });
    assert_eq!(answers.map(|a| a.position), Some(escalated.global_position));
    // The call made again keeps the lost call's key, naming where it was
    // first declared: a server that keeps keys acts at most once.
    let keys: Vec<_> = server.calls("notify").into_iter().map(|c| c.key).collect();
    assert_eq!(keys.len(), 2);
    assert_eq!(keys[0], keys[1]);
    let intents = intents(done);
    assert_eq!(intents.len(), 2);
    assert_eq!(intents[1].1.idempotency_key, intents[0].1.idempotency_key);
    assert_eq!(intents[1].1.repeats, Some(intents[0].0.global_position));
    assert_ne!(intents[1].0.event_id, intents[0].0.event_id);
    assert_each_decision_once(id, done);
    survivor.stop().await;
}

/// The same crash at a tool declared idempotent: the survivor calls again
/// by itself.
#[tokio::test]
async fn a_lost_call_to_an_idempotent_tool_is_made_again() {
    let db = TestDatabase::create().await;
    let (store, queue) = postgres(&db).await;
    let server = Server::start(store.clone()).await;
    let clock = ManualClock::new(chrono::Utc::now());
    let doomed = Running::start_runtime(Runtime::with_faults(
        store.clone(),
        queue.clone(),
        ToolRegistry::default(),
        Arc::new(clock.clone()),
        config("doomed", &server, true),
        Some(FaultPlan::at(FaultPoint::BeforeSubtaskResult, 1)),
    ));
    let id = doomed
        .runtime
        .submit(Submission {
            request: "Notify the team: 점검이 끝났습니다.".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    doomed.ended().await;
    // The dead runtime's sleeps go with its tasks: only then do the
    // survivor's count.
    clock.sleepers_at_most(0).await;

    let survivor = Running::start(
        store.clone(),
        queue.clone(),
        ToolRegistry::default(),
        Arc::new(clock.clone()),
        config("survivor", &server, true),
    );
    clock.sleepers_at_least(3).await;
    clock.advance(RuntimeConfig::default().lease + Duration::from_secs(1));
    let seen = follow_until(&*store, &[id], Duration::from_secs(60), |w| {
        w.state.is_final()
    })
    .await;
    let done = &seen[&id];
    assert_eq!(done.workflow.state, WorkflowState::Completed);
    assert_eq!(
        attempts(&done.decoded),
        ["start 1", "Abandoned 1", "start 2", "ok 2"]
    );
    assert!(done
        .decoded
        .iter()
        .all(|e| !matches!(e, WorkflowEvent::SubtaskEscalated { .. })));
    let keys: Vec<_> = server.calls("notify").into_iter().map(|c| c.key).collect();
    assert_eq!(keys.len(), 2);
    assert_eq!(keys[0], keys[1], "the repeat keeps the lost call's key");
    assert_each_decision_once(id, done);
    survivor.stop().await;
}

/// A call that misses its deadline may still act: for a tool not declared
/// idempotent it is not made again unasked. The attempt is recorded as
/// timed out, a person is asked, and after the approval the call goes out
/// again under the same key; the connection the late call held is dropped
/// and the next call opens another.
#[tokio::test]
async fn a_call_past_its_deadline_waits_for_a_person_and_repeats_its_key() {
    let db = TestDatabase::create().await;
    let (store, queue) = postgres(&db).await;
    let server = Server::start(store.clone()).await;
    let mut config = config("node", &server, false);
    config.gitcode.attempt_timeout_ms = 500;
    let running = Running::start(
        store.clone(),
        queue,
        ToolRegistry::default(),
        Arc::new(SystemClock),
        config,
    );
    let id = running
        .runtime
        .submit(Submission {
            request: "Archive this note: 회의록 초안.".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let seen = follow_until(&*store, &[id], Duration::from_secs(60), |w| {
        w.state == WorkflowState::AwaitingHuman
    })
    .await;
    assert_eq!(
        attempts(&seen[&id].decoded),
        ["start 1", "Timeout 1", "person 1"]
    );
    assert_eq!(server.calls("archive").len(), 1);
    running
        .runtime
        .decide_escalation(
            id,
            HumanDecision {
                approve: true,
                comment: "archive it again; the archive drops repeats".into(),
                by: Actor::human("operator-park"),
                expected_position: None,
                allow_self: false,
            },
        )
        .await
        .unwrap();
    let seen = follow_until(&*store, &[id], Duration::from_secs(60), |w| {
        w.state.is_final()
    })
    .await;
    let done = &seen[&id];
    assert_eq!(done.workflow.state, WorkflowState::Completed);
    assert_eq!(
        attempts(&done.decoded),
        ["start 1", "Timeout 1", "person 1", "start 2", "ok 2"]
    );
    let keys: Vec<_> = server.calls("archive").into_iter().map(|c| c.key).collect();
    assert_eq!(keys.len(), 2);
    assert_eq!(keys[0], keys[1]);
    let intents = intents(done);
    assert_eq!(intents[1].1.repeats, Some(intents[0].0.global_position));
    assert_each_decision_once(id, done);
    running.stop().await;
}

/// A server whose one tool, `relay`, takes `text` until it is told to take
/// `message` instead; it says so with `tools/list_changed`.
#[derive(Clone, Default)]
struct Changing {
    renamed: Arc<std::sync::atomic::AtomicBool>,
    peer: Arc<Mutex<Option<rmcp::Peer<rmcp::RoleServer>>>>,
    listings: Arc<tokio::sync::watch::Sender<usize>>,
    received: Arc<Mutex<Vec<Value>>>,
}

impl ServerHandler for Changing {
    fn get_info(&self) -> ServerInfo {
        ServerInfo {
            capabilities: ServerCapabilities::builder()
                .enable_tools()
                .enable_tool_list_changed()
                .build(),
            ..Default::default()
        }
    }

    async fn list_tools(
        &self,
        _request: Option<rmcp::model::PaginatedRequestParams>,
        context: rmcp::service::RequestContext<rmcp::RoleServer>,
    ) -> Result<rmcp::model::ListToolsResult, ErrorData> {
        *self.peer.lock().unwrap() = Some(context.peer.clone());
        let field = if self.renamed.load(std::sync::atomic::Ordering::SeqCst) {
            "message"
        } else {
            "text"
        };
        let schema = serde_json::json!({
            "type": "object",
            "properties": { field: { "type": "string" } },
            "required": [field]
        });
        let tool = rmcp::model::Tool::new(
            "relay",
            "Relays a message",
            Arc::new(schema.as_object().unwrap().clone()),
        );
        self.listings.send_modify(|n| *n += 1);
        Ok(rmcp::model::ListToolsResult {
            tools: vec![tool],
            ..Default::default()
        })
    }

    async fn call_tool(
        &self,
        request: rmcp::model::CallToolRequestParams,
        _context: rmcp::service::RequestContext<rmcp::RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let arguments = Value::Object(request.arguments.unwrap_or_default());
        self.received.lock().unwrap().push(arguments);
        Ok(CallToolResult::success(vec![Content::text("relayed")]))
    }
}

/// The tools are listed at start and again when the server says they
/// changed: the next call is built after the new schema.
#[tokio::test]
async fn a_server_whose_tools_change_is_listed_again() {
    let db = TestDatabase::create().await;
    let (store, queue) = postgres(&db).await;
    let changing = Changing::default();
    let service: StreamableHttpService<Changing, LocalSessionManager> = {
        let changing = changing.clone();
        StreamableHttpService::new(
            move || Ok(changing.clone()),
            Default::default(),
            StreamableHttpServerConfig::default(),
        )
    };
    let router = axum::Router::new().nest_service("/mcp", service);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/mcp", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await });
    let running = Running::start(
        store.clone(),
        queue,
        ToolRegistry::default(),
        Arc::new(SystemClock),
        RuntimeConfig {
            mcp_tools: vec![McpToolSpec {
                name: "relay".into(),
                server: McpServer::Url(url),
                tool: "relay".into(),
                description: "relays".into(),
                keywords: vec!["relay".into()],
                idempotent: true,
                deterministic: false,
                input_argument: None,
                instruction_argument: None,
                bearer_token_env: None,
                env: Vec::new(),
            }],
            ..RuntimeConfig::default()
        },
    );
    let mut listings = changing.listings.subscribe();
    let mut changes = running.runtime.mcp_tool_changes();
    let relay = |request: &'static str| {
        let runtime = running.runtime.clone();
        let store = store.clone();
        async move {
            let id = runtime
                .submit(Submission {
                    request: request.into(),
                    ..Default::default()
                })
                .await
                .unwrap();
            let seen = settle(&*store, &[id]).await;
            assert_eq!(seen[&id].workflow.state, WorkflowState::Completed);
        }
    };
    relay("Relay this: 안녕하세요.").await;
    let first = *listings.borrow_and_update();
    assert!(first >= 1, "listed at start");

    changing
        .renamed
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let peer = changing.peer.lock().unwrap().clone().unwrap();
    peer.notify_tool_list_changed().await.unwrap();
    changes.wait_for(|n| *n >= 1).await.unwrap();
    relay("Relay this too: 반갑습니다.").await;
    assert_eq!(
        *listings.borrow(),
        first + 1,
        "listed once more, before the second call"
    );

    let received = changing.received.lock().unwrap().clone();
    assert_eq!(received.len(), 2, "{received:?}");
    assert_eq!(received[0]["text"], "Relay this: 안녕하세요.");
    assert_eq!(
        received[1]["message"], "Relay this too: 반갑습니다.",
        "the second call follows the schema listed after the change"
    );
    running.stop().await;
}
