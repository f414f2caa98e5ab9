//! OpenTelemetry traces from a real `agentledger serve` on real PostgreSQL,
//! received on a loopback OTLP/HTTP endpoint (protobuf, decoded with the
//! protocol's own generated types): the span names and attributes of the
//! GenAI conventions, their parentage, the service name from
//! `OTEL_SERVICE_NAME`, and the trace id in each recorded event's metadata.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentledger_eventstore::testing::TestDatabase;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::header;
use axum::routing::post;
use axum::Router;
use common::{post as graphql, Server};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use serde_json::json;

const REQUEST: &str =
    "Summarise the attached quarterly report. Then count the words of the summary.";

#[derive(Clone, Default)]
struct Received {
    /// Every span with its resource's `service.name`.
    spans: Arc<Mutex<Vec<(String, Span)>>>,
    requests: Arc<Mutex<Vec<String>>>,
}

fn text(attributes: &[KeyValue], key: &str) -> Option<String> {
    attributes.iter().find(|a| a.key == key).and_then(|a| {
        match a.value.as_ref()?.value.as_ref()? {
            Any::StringValue(s) => Some(s.clone()),
            Any::IntValue(i) => Some(i.to_string()),
            other => Some(format!("{other:?}")),
        }
    })
}

async fn collect(
    State(received): State<Received>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> impl axum::response::IntoResponse {
    received.requests.lock().unwrap().push(
        headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string(),
    );
    let request = ExportTraceServiceRequest::decode(body).expect("an OTLP protobuf export");
    let mut spans = received.spans.lock().unwrap();
    for resource in request.resource_spans {
        let service = resource
            .resource
            .as_ref()
            .and_then(|r| text(&r.attributes, "service.name"))
            .unwrap_or_default();
        for scope in resource.scope_spans {
            spans.extend(scope.spans.into_iter().map(|s| (service.clone(), s)));
        }
    }
    (
        [(header::CONTENT_TYPE, "application/x-protobuf")],
        Vec::<u8>::new(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_workflow_is_traced_by_the_genai_conventions_and_linked_to_its_events() {
    let received = Received::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let app = Router::new()
        .route("/v1/traces", post(collect))
        .with_state(received.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let db = TestDatabase::create().await;
    let server = Server::start(&[
        ("DATABASE_URL", db.service_url().as_str()),
        ("AGENTLEDGER_ADMIN_DATABASE_URL", db.admin_url()),
        ("AGENTLEDGER_PROFILE", "test"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_SERVICE_NAME", "agentledger-traces-test"),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ("RUST_LOG", "warn"),
    ]);
    let base = &server.base;
    let (_, body) = graphql(
        base,
        None,
        "mutation($r: String!) { submitWorkflow(request: $r) { id } }",
        &json!({ "r": REQUEST }),
    )
    .await;
    let id = body["data"]["submitWorkflow"]["id"]
        .as_str()
        .unwrap()
        .to_string();

    // The spans arrive in batches: wait for the workflow's last tool and
    // its review, or fail after 30 s naming what came.
    let wanted = [
        "invoke_workflow",
        "invoke_agent sena",
        "invoke_agent lubit",
        "invoke_agent gitcode",
        "invoke_agent rune",
        "execute_tool summarize",
        "execute_tool text_stats",
    ];
    let started = Instant::now();
    let spans: Vec<(String, Span)> = loop {
        let spans: Vec<(String, Span)> = received.spans.lock().unwrap().clone();
        let names: Vec<&str> = spans.iter().map(|(_, s)| s.name.as_str()).collect();
        if wanted.iter().all(|w| names.contains(w)) {
            break spans;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "spans after 30 s: {names:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(received
        .requests
        .lock()
        .unwrap()
        .iter()
        .all(|t| t == "application/x-protobuf"));
    assert!(spans
        .iter()
        .all(|(service, _)| service == "agentledger-traces-test"));

    let named = |name: &str| -> Vec<&Span> {
        spans
            .iter()
            .map(|(_, s)| s)
            .filter(|s| s.name == name)
            .collect()
    };
    let workflows = named("invoke_workflow");
    assert_eq!(workflows.len(), 1, "one drive, one workflow span");
    let root = workflows[0];
    assert!(root.parent_span_id.is_empty(), "invoke_workflow is a root");
    assert_eq!(
        text(&root.attributes, "gen_ai.operation.name").as_deref(),
        Some("invoke_workflow")
    );
    assert_eq!(
        text(&root.attributes, "agentledger.workflow.id").as_deref(),
        Some(id.as_str())
    );
    let mut versions = HashMap::new();
    for agent in ["sena", "lubit", "gitcode", "rune"] {
        let steps = named(&format!("invoke_agent {agent}"));
        assert!(!steps.is_empty(), "{agent}");
        for step in steps {
            assert_eq!(step.trace_id, root.trace_id, "{agent}: one trace");
            assert_eq!(
                step.parent_span_id, root.span_id,
                "{agent}: under the workflow"
            );
            assert_eq!(
                text(&step.attributes, "gen_ai.operation.name").as_deref(),
                Some("invoke_agent")
            );
            assert_eq!(
                text(&step.attributes, "gen_ai.agent.name").as_deref(),
                Some(agent)
            );
            let version = text(&step.attributes, "gen_ai.agent.version").unwrap();
            assert!(!version.is_empty());
            versions.insert(agent, version);
            // The reference policies call no model.
            assert_eq!(text(&step.attributes, "gen_ai.request.model"), None);
        }
    }
    let executor = named("invoke_agent gitcode")[0];
    for tool in ["summarize", "text_stats"] {
        let attempts = named(&format!("execute_tool {tool}"));
        assert_eq!(attempts.len(), 1, "{tool}: one attempt");
        let attempt = attempts[0];
        assert_eq!(attempt.trace_id, root.trace_id);
        assert_eq!(
            attempt.parent_span_id, executor.span_id,
            "{tool}: under the executor"
        );
        assert_eq!(
            text(&attempt.attributes, "gen_ai.tool.name").as_deref(),
            Some(tool)
        );
        assert_eq!(
            text(&attempt.attributes, "gen_ai.operation.name").as_deref(),
            Some("execute_tool")
        );
        assert_eq!(
            text(&attempt.attributes, "gen_ai.tool.call.id").map(|c| c.len()),
            Some(36)
        );
        assert_eq!(text(&attempt.attributes, "error.type"), None);
        assert!(attempt.end_time_unix_nano >= attempt.start_time_unix_nano);
    }

    // From the ledger to the trace: every event the runtime recorded names
    // it; the submission (recorded by the API, outside any drive) does not.
    let trace_id = hex::encode(&root.trace_id);
    let (_, body) = graphql(
        base,
        None,
        "query($id: ID!) { events(workflowId: $id, first: 100) { type metadata } }",
        &json!({ "id": id }),
    )
    .await;
    let events = body["data"]["events"].as_array().unwrap();
    assert!(events.len() >= 8, "{body}");
    for event in events {
        let linked = event["metadata"]["trace_id"].as_str();
        if event["type"] == "WorkflowSubmitted" {
            assert_eq!(linked, None);
        } else {
            assert_eq!(linked, Some(trace_id.as_str()), "{event}");
        }
    }
    println!(
        "{} spans in trace {trace_id}; agent versions {versions:?}; {} events linked",
        spans.len(),
        events.len() - 1
    );
    server.stop();
}

#[test]
fn a_protocol_this_build_cannot_speak_is_refused_at_start() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_agentledger"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env_remove("DATABASE_URL")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("http/protobuf or http/json"), "{stderr}");
    assert!(out.stdout.is_empty(), "it never listened");
}
