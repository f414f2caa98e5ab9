//! Roles served by a language model, against a stub chat-completions
//! endpoint on loopback and real PostgreSQL: valid answers are recorded
//! with what the model was sent and said; invalid JSON, answers that break
//! the schema, slow answers, rate limits and server errors fall back to the
//! reference policy and say so; the key is sent and never recorded; reading
//! the workflow back never asks the model again.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentledger_agents::{LlmConfig, PostgresWorkQueue, RuntimeConfig, SystemClock, ToolRegistry};
use agentledger_domain::names::AgentRole;
use agentledger_domain::workflow::{ModelCall, WorkflowEvent, WorkflowState};
use agentledger_eventstore::testing::TestDatabase;
use agentledger_eventstore::EventStore;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use common::*;
use serde_json::{json, Value};

const KEY: &str = "sk-test-not-to-be-recorded-7f3a";
const REQUEST: &str = "이 메모의 단어 수를 세고, then list its keywords.";

/// How the stub endpoint answers.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Valid,
    NotJson,
    BreaksSchema,
    Slow,
    /// `429` with `Retry-After: 0` once, then valid answers.
    RateLimitedOnce,
    RateLimitedAlways,
    ServerError,
}

struct Stub {
    mode: Mode,
    requests: AtomicUsize,
    /// Every Authorization header and request body seen.
    seen: Mutex<Vec<(String, Value)>>,
}

/// A valid decision of the role a request asks for (by its schema's name).
fn decision(role: &str) -> Value {
    match role {
        "analyst_decision" => json!({
            "subtasks": [
                { "id": "count", "title": "단어 수 세기", "tool": "text_stats" },
                { "id": "keys", "title": "List the keywords", "tool": "keywords", "dependsOn": ["count"] }
            ],
            "confidence": 0.82,
            "rationale": "two steps; the keywords read the count"
        }),
        "gatekeeper_decision" => json!({
            "verdict": "APPROVE", "priority": "HIGH", "risk": 0.05,
            "reasons": ["plain text work"], "rationale": "nothing risky"
        }),
        _ => json!({
            "transparency": 0.9, "collaboration": 0.85, "autonomy": 1.0, "fairness": 0.95,
            "passed": true, "findings": [], "rationale": "검토 완료"
        }),
    }
}

fn completion(content: &str) -> Response {
    axum::Json(json!({
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "choices": [{ "index": 0, "message": { "role": "assistant", "content": content },
                      "finish_reason": "stop" }],
        "usage": { "prompt_tokens": 321, "completion_tokens": 45, "total_tokens": 366 }
    }))
    .into_response()
}

async fn answer(
    axum::extract::State(stub): axum::extract::State<Arc<Stub>>,
    headers: HeaderMap,
    axum::Json(body): axum::Json<Value>,
) -> Response {
    let n = stub.requests.fetch_add(1, Ordering::SeqCst);
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let role = body["response_format"]["json_schema"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    stub.seen.lock().unwrap().push((auth, body));
    match stub.mode {
        Mode::Valid => completion(&decision(&role).to_string()),
        Mode::NotJson => completion("Sure! I would approve this plan."),
        Mode::BreaksSchema => {
            completion(&json!({ "verdict": "MAYBE", "subtasks": "all" }).to_string())
        }
        Mode::Slow => {
            tokio::time::sleep(Duration::from_secs(3)).await;
            completion(&decision(&role).to_string())
        }
        Mode::RateLimitedOnce if n % 2 == 0 => (
            StatusCode::TOO_MANY_REQUESTS,
            [("retry-after", "0")],
            "slow down",
        )
            .into_response(),
        Mode::RateLimitedOnce => completion(&decision(&role).to_string()),
        Mode::RateLimitedAlways => (
            StatusCode::TOO_MANY_REQUESTS,
            [("retry-after", "0")],
            "slow down",
        )
            .into_response(),
        Mode::ServerError => (StatusCode::INTERNAL_SERVER_ERROR, "boom").into_response(),
    }
}

/// Starts the stub on loopback; returns its base URL.
async fn stub(mode: Mode) -> (Arc<Stub>, String) {
    let stub = Arc::new(Stub {
        mode,
        requests: AtomicUsize::new(0),
        seen: Mutex::new(Vec::new()),
    });
    let app = axum::Router::new()
        .route("/v1/chat/completions", axum::routing::post(answer))
        .with_state(stub.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (stub, format!("http://{address}/v1"))
}

/// One workflow through a runtime whose three deciding roles are served by
/// the stub in `mode`; its events once final.
async fn through_model(
    mode: Mode,
) -> (
    Arc<Stub>,
    Vec<WorkflowEvent>,
    Vec<Arc<agentledger_eventstore::RecordedEvent>>,
    agentledger_agents::Runtime,
    Running,
    TestDatabase,
) {
    through_model_cached(mode, false).await
}

/// [`through_model`], with the result cache on or off.
async fn through_model_cached(
    mode: Mode,
    cached: bool,
) -> (
    Arc<Stub>,
    Vec<WorkflowEvent>,
    Vec<Arc<agentledger_eventstore::RecordedEvent>>,
    agentledger_agents::Runtime,
    Running,
    TestDatabase,
) {
    let db = TestDatabase::create().await;
    let store = Arc::new(db.store().await);
    let queue = Arc::new(PostgresWorkQueue::new(store.pool().clone()));
    let (stub, base_url) = stub(mode).await;
    let config = RuntimeConfig {
        llm_roles: BTreeSet::from([AgentRole::Analyst, AgentRole::Gatekeeper, AgentRole::Ethics]),
        llm: Some(LlmConfig {
            base_url,
            model: "stub-1".into(),
            api_key: Some(KEY.into()),
            timeout: Duration::from_millis(400),
            max_tokens: 256,
            retries: 2,
        }),
        cache: agentledger_agents::cache::CacheConfig {
            enabled: cached,
            ..Default::default()
        },
        ..RuntimeConfig::default()
    };
    let running = Running::start(
        store.clone() as Arc<dyn EventStore>,
        queue,
        ToolRegistry::default(),
        Arc::new(SystemClock),
        config,
    );
    let runtime = running.runtime.clone();
    let id = runtime
        .submit(agentledger_agents::Submission {
            request: REQUEST.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let seen = settle(&*store, &[id]).await;
    let followed = &seen[&id];
    assert_eq!(
        followed.workflow.state,
        WorkflowState::Completed,
        "{mode:?}"
    );
    assert_each_decision_once(id, followed);
    (
        stub,
        followed.decoded.clone(),
        followed.events.clone(),
        runtime,
        running,
        db,
    )
}

/// The model record of each decision, by event type.
fn models(events: &[WorkflowEvent]) -> Vec<(&'static str, ModelCall)> {
    events
        .iter()
        .filter_map(|e| match e {
            WorkflowEvent::AnalysisProduced { model, .. } => {
                Some(("AnalysisProduced", model.clone()?))
            }
            WorkflowEvent::GateDecided { model, .. } => Some(("GateDecided", model.clone()?)),
            WorkflowEvent::EthicsReviewed { model, .. } => Some(("EthicsReviewed", model.clone()?)),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn a_model_decides_every_role_and_the_ledger_keeps_what_it_was_told_and_said() {
    let (stub, events, recorded, runtime, running, _db) = through_model(Mode::Valid).await;
    let models = models(&events);
    assert_eq!(models.len(), 3, "one model record per decision");
    let seen = stub.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3);
    for ((event_type, call), (auth, body)) in models.iter().zip(&seen) {
        assert!(!call.fallback, "{event_type}: {call:?}");
        assert_eq!(
            (call.provider.as_str(), call.model.as_str()),
            ("openai-compatible", "stub-1")
        );
        assert_eq!(
            (call.input_tokens, call.output_tokens, call.requests),
            (Some(321), Some(45), 1)
        );
        // The hash is of the exact messages sent.
        let sent = serde_json::to_vec(&body["messages"]).unwrap();
        assert_eq!(
            call.prompt_sha256,
            hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&sent))
        );
        assert_eq!(body["temperature"], 0);
        assert_eq!(body["max_tokens"], 256);
        assert!(body["response_format"]["json_schema"]["schema"]["properties"].is_object());
        let role = body["response_format"]["json_schema"]["name"]
            .as_str()
            .unwrap();
        assert_eq!(call.answer.as_str(), decision(role).to_string());
        assert_eq!(auth, &format!("Bearer {KEY}"));
    }
    // The context the model saw is the one external workers get.
    assert!(seen[0].1["messages"][1]["content"]
        .as_str()
        .unwrap()
        .contains("이 메모의"));
    // The decisions are the model's, under its policy.
    assert!(events.iter().any(|e| matches!(e,
        WorkflowEvent::GateDecided { priority: agentledger_domain::workflow::Priority::High, rationale, .. }
            if rationale.as_str() == "nothing risky")));
    for event in recorded.iter().filter(|e| {
        matches!(
            e.event_type.as_str(),
            "AnalysisProduced" | "GateDecided" | "EthicsReviewed"
        )
    }) {
        let policy = event.metadata().unwrap().policy.unwrap();
        assert!(policy.name.ends_with("-llm"), "{policy:?}");
        assert!(policy.version.ends_with("-llm/1"), "{policy:?}");
    }
    // The key went in the header only.
    for event in &recorded {
        assert!(!event.payload.to_string().contains(KEY));
        assert!(!event.metadata.to_string().contains(KEY));
    }
    // Reading the workflow back (what replay and audit do) asks nobody.
    let asked = stub.requests.load(Ordering::SeqCst);
    let history = runtime.load(events_id(&recorded)).await.unwrap().unwrap();
    assert_eq!(history.workflow.state, WorkflowState::Completed);
    assert_eq!(
        stub.requests.load(Ordering::SeqCst),
        asked,
        "replay never calls the model"
    );
    running.stop().await;
}

fn events_id(events: &[Arc<agentledger_eventstore::RecordedEvent>]) -> uuid::Uuid {
    workflow_id(&events[0]).unwrap()
}

/// Each decision fell back to the reference policy and says why.
async fn falls_back(mode: Mode, reason: &str, requests: u8) {
    let (stub, events, recorded, _runtime, running, _db) = through_model(mode).await;
    let models = models(&events);
    assert_eq!(
        models.len(),
        3,
        "{mode:?}: the failure is recorded with each decision"
    );
    for (event_type, call) in &models {
        assert!(call.fallback, "{mode:?} {event_type}");
        let why = call.fallback_reason.as_ref().unwrap().as_str().to_string();
        assert!(why.contains(reason), "{mode:?} {event_type}: {why}");
        assert_eq!(call.requests, requests, "{mode:?} {event_type}");
    }
    assert_eq!(
        stub.requests.load(Ordering::SeqCst),
        3 * usize::from(requests)
    );
    for event in recorded.iter().filter(|e| {
        matches!(
            e.event_type.as_str(),
            "AnalysisProduced" | "GateDecided" | "EthicsReviewed"
        )
    }) {
        let policy = event.metadata().unwrap().policy.unwrap();
        assert!(policy.name.ends_with("-reference"), "{mode:?}: {policy:?}");
    }
    running.stop().await;
}

#[tokio::test]
async fn an_answer_that_is_not_json_falls_back_to_the_reference_policy() {
    falls_back(Mode::NotJson, "not JSON", 1).await;
}

#[tokio::test]
async fn an_answer_that_breaks_the_schema_falls_back_and_names_the_rule() {
    falls_back(Mode::BreaksSchema, "breaks the decision schema", 1).await;
}

#[tokio::test]
async fn a_slow_answer_past_the_timeout_falls_back() {
    falls_back(Mode::Slow, "no answer within 400 ms", 1).await;
}

#[tokio::test]
async fn rate_limits_are_retried_after_their_pause_and_fall_back_once_spent() {
    let (stub, events, _recorded, _runtime, running, _db) =
        through_model(Mode::RateLimitedOnce).await;
    for (event_type, call) in models(&events) {
        assert!(!call.fallback, "{event_type}: {call:?}");
        assert_eq!(call.requests, 2, "{event_type}: one 429, then the answer");
    }
    assert_eq!(stub.requests.load(Ordering::SeqCst), 6);
    running.stop().await;
    falls_back(
        Mode::RateLimitedAlways,
        "rate-limited (429) after 3 request(s)",
        3,
    )
    .await;
}

#[tokio::test]
async fn server_errors_are_retried_then_fall_back() {
    falls_back(Mode::ServerError, "500", 3).await;
}

#[tokio::test]
async fn with_the_cache_on_the_same_prompt_is_answered_from_the_ledger() {
    let (stub, first, recorded, runtime, running, db) =
        through_model_cached(Mode::Valid, true).await;
    assert_eq!(stub.requests.load(Ordering::SeqCst), 3);
    // The same request again: the same prompts, answered from the cache.
    let id = runtime
        .submit(agentledger_agents::Submission {
            request: REQUEST.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let store = db.store().await;
    let seen = settle(&store, &[id]).await;
    let again = &seen[&id];
    assert_eq!(again.workflow.state, WorkflowState::Completed);
    assert_eq!(stub.requests.load(Ordering::SeqCst), 3, "no new request");
    let positions: Vec<u64> = recorded
        .iter()
        .filter(|e| {
            matches!(
                e.event_type.as_str(),
                "AnalysisProduced" | "GateDecided" | "EthicsReviewed"
            )
        })
        .map(|e| e.global_position)
        .collect();
    let (before, after) = (models(&first), models(&again.decoded));
    assert_eq!(after.len(), 3);
    for (((_, old), (event_type, new)), position) in before.iter().zip(&after).zip(positions) {
        assert_eq!(new.reused_from, Some(position), "{event_type}");
        assert_eq!((new.requests, new.fallback), (0, false), "{event_type}");
        assert_eq!(new.prompt_sha256, old.prompt_sha256);
        assert_eq!(new.answer, old.answer);
    }
    let stats = runtime.cache_stats();
    assert_eq!((stats.model_hits, stats.model_misses), (3, 3));
    running.stop().await;
}

/// A span as it was opened and filled in: its id, name and fields.
type SeenSpan = (
    tracing::span::Id,
    String,
    std::collections::BTreeMap<String, String>,
);

/// Every span opened while the test runs.
#[derive(Clone, Default)]
struct Spans(Arc<Mutex<Vec<SeenSpan>>>);

struct Fields<'a>(&'a mut std::collections::BTreeMap<String, String>);

impl tracing::field::Visit for Fields<'_> {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().into(), format!("{value:?}"));
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Spans {
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        _: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let mut fields = std::collections::BTreeMap::new();
        attrs.record(&mut Fields(&mut fields));
        let name = attrs.metadata().name().to_string();
        self.0.lock().unwrap().push((id.clone(), name, fields));
    }

    fn on_record(
        &self,
        id: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        _: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let mut spans = self.0.lock().unwrap();
        if let Some((_, _, fields)) = spans.iter_mut().rev().find(|(i, _, _)| i == id) {
            values.record(&mut Fields(fields));
        }
    }
}

#[tokio::test]
async fn a_model_decision_names_the_model_and_its_tokens_on_its_agent_span() {
    use tracing_subscriber::layer::SubscriberExt;
    let spans = Spans::default();
    // This test's runtime is on one thread: the subscriber sees its spans.
    let _guard =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(spans.clone()));
    let (_stub, _events, _recorded, _runtime, running, _db) = through_model(Mode::Valid).await;
    running.stop().await;
    let spans = spans.0.lock().unwrap().clone();
    let agents: Vec<_> = spans
        .iter()
        .filter(|(_, name, _)| name == "invoke_agent")
        .map(|(_, _, f)| f)
        .collect();
    let by = |agent: &str| {
        agents
            .iter()
            .find(|f| f.get("gen_ai.agent.name").map(String::as_str) == Some(agent))
            .unwrap_or_else(|| panic!("no invoke_agent span for {agent}: {agents:?}"))
    };
    for agent in ["sena", "lubit", "rune"] {
        let fields = by(agent);
        assert_eq!(fields["otel.name"], format!("invoke_agent {agent}"));
        assert_eq!(fields["gen_ai.request.model"], "stub-1", "{fields:?}");
        assert_eq!(fields["gen_ai.provider.name"], "openai-compatible");
        assert_eq!(fields["gen_ai.usage.input_tokens"], "321");
        assert_eq!(fields["gen_ai.usage.output_tokens"], "45");
    }
    // The executor runs tools, not a model.
    assert!(!by("gitcode").contains_key("gen_ai.request.model"));
    let tools: Vec<_> = spans
        .iter()
        .filter(|(_, name, _)| name == "execute_tool")
        .map(|(_, _, f)| f["gen_ai.tool.name"].clone())
        .collect();
    assert_eq!(tools, ["text_stats", "keywords"]);
}
