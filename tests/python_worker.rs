//! The Python worker of `examples/python-worker` (gql over HTTP and
//! WebSocket) serves the GATEKEEPER role and the external `sentiment` tool
//! of a real `agentledger serve` on real PostgreSQL: every workflow ends,
//! each verdict is the worker's own policy with the worker as its actor,
//! and each sentiment output is the worker's. Its Python packages are
//! installed into a virtual environment under cargo's target directory.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use agentledger_domain::workflow::WorkflowEvent;
use agentledger_eventstore::testing::TestDatabase;
use agentledger_eventstore::EventStore;
use common::{create_key, follow_to_end, post, serve_with_config};
use serde_json::json;

const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/python-worker");

/// A virtual environment with the example's requirements; `None` (with
/// the reason printed) where this machine has no Python 3.
fn python() -> Option<PathBuf> {
    common::python_venv(Path::new(EXAMPLE), "python-worker-venv")
}

/// The worker's `sentiment` answer for `text`, as its README describes it.
fn sentiment(text: &str) -> String {
    let output = Command::new(python().unwrap())
        .current_dir(EXAMPLE)
        .args([
            "-c",
            "import sys, worker; print(worker.sentiment(sys.argv[1]))",
            text,
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap().trim().to_string()
}

const POSITIVE: &str = "Rate the sentiment of this review: great product, I love it.";
const KOREAN: &str = "이 리뷰의 감정을 평가해 주세요: 정말 최고, 만족합니다";
const REJECTED: &str = "Count the words of my password list.";
const URGENT: &str = "Count the words of this note, urgent.";

#[tokio::test(flavor = "multi_thread")]
async fn a_python_worker_serves_the_gatekeeper_and_a_tool_through_the_api() {
    let Some(python) = python() else { return };
    let db = TestDatabase::create().await;
    let submitter = create_key(&db, "app", &["submitter"], "default");
    let worker_key = create_key(&db, "python", &["agent"], "default");
    let (server, _config) = serve_with_config(
        &db,
        "[agents]\ngatekeeper = \"external\"\n\n\
         [[tools.external]]\nname = \"sentiment\"\n\
         description = \"Says whether a text is positive, negative or neutral\"\n\
         keywords = [\"sentiment\", \"tone\", \"감정\"]\n",
    );
    let mut worker = Command::new(&python)
        .current_dir(EXAMPLE)
        .args([
            "worker.py",
            "--url",
            &server.base,
            "--worker-id",
            "py-gate-1",
        ])
        .env("AGENTLEDGER_API_KEY", &worker_key)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the worker starts");

    let store = db.store().await;
    let mut events = store.subscribe_all(1);
    let mut submitted = HashMap::new();
    for i in 0..12 {
        let request = [POSITIVE, KOREAN, REJECTED, URGENT][i % 4];
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
    let finished = follow_to_end(
        &mut events,
        submitted.keys().cloned(),
        Duration::from_secs(120),
    )
    .await;
    let _ = worker.kill();
    let _ = worker.wait();
    let streams = finished.unwrap_or_else(|open| panic!("workflows not final: {open:?}"));

    for (id, request) in &submitted {
        let events = &streams[id];
        let decoded: Vec<WorkflowEvent> = events
            .iter()
            .map(|e| WorkflowEvent::decode(&e.event_type, e.schema_version, &e.payload).unwrap())
            .collect();
        let gate = events
            .iter()
            .find(|e| e.event_type == "GateDecided")
            .unwrap();
        let metadata = gate.metadata().unwrap();
        assert_eq!(
            (
                metadata.actor.name.as_str(),
                metadata.actor.version.as_str()
            ),
            ("py-gate-1", "1.0.0"),
            "{id}"
        );
        assert_eq!(metadata.policy.unwrap().name, "gatekeeper-python");
        let last = events.last().unwrap().event_type.as_str();
        if *request == REJECTED {
            assert_eq!(last, "WorkflowRejected", "{id}: the worker's own rule");
            continue;
        }
        assert_eq!(last, "WorkflowCompleted", "{id}");
        let verdict_priority = decoded.iter().find_map(|e| match e {
            WorkflowEvent::GateDecided { priority, .. } => Some(*priority),
            _ => None,
        });
        let expected_priority = if *request == URGENT {
            agentledger_domain::workflow::Priority::High
        } else {
            agentledger_domain::workflow::Priority::Normal
        };
        assert_eq!(verdict_priority, Some(expected_priority), "{id}");
        if *request == POSITIVE || *request == KOREAN {
            let output = decoded.iter().find_map(|e| match e {
                WorkflowEvent::SubtaskSucceeded { output, .. } => Some(output.as_str().to_string()),
                _ => None,
            });
            let expected = sentiment(request);
            assert!(expected.starts_with("sentiment: positive"), "{expected}");
            assert_eq!(output.as_deref(), Some(expected.as_str()), "{id}");
        }
    }
    assert!(server.stop().success());
}
