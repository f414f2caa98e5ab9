//! The operations kit checked against the real thing: the Prometheus alert
//! rules pass `promtool check rules` and their unit tests (`promtool test
//! rules`), and every metric and label value they use is one a real
//! `serve` exports at /metrics.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use agentledger_eventstore::testing::TestDatabase;
use common::{create_key, post, serve_with_config};
use serde_json::json;

const PROMETHEUS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/ops/prometheus");

/// promtool, or `None` with the reason printed.
fn promtool() -> Option<&'static str> {
    match Command::new("promtool").arg("--version").output() {
        Ok(out) if out.status.success() => Some("promtool"),
        _ => {
            println!("skipped: promtool is not installed (Debian's prometheus package; ops/test.sh installs it)");
            None
        }
    }
}

#[test]
fn the_alert_rules_pass_promtool_and_their_unit_tests() {
    let Some(promtool) = promtool() else { return };
    for args in [
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts.test.yml"],
    ] {
        let out = Command::new(promtool)
            .args(args)
            .current_dir(PROMETHEUS)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The `agentledger_…` names and the `label="value"` pairs the alert
/// rules and the Grafana dashboard use.
fn used_by_rules() -> (BTreeSet<String>, BTreeSet<(String, String)>) {
    let rules = std::fs::read_to_string(Path::new(PROMETHEUS).join("alerts.yml")).unwrap();
    let dashboard = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("ops/grafana/agentledger.json"),
    )
    .unwrap();
    let parsed: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
    let exprs: Vec<String> = parsed["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().clone())
        .map(|t| t["expr"].as_str().unwrap().replace("\\\"", "\""))
        .collect();
    let mut names = BTreeSet::new();
    let mut labels = BTreeSet::new();
    let lines = rules
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .map(str::to_string)
        .chain(exprs);
    for line in lines {
        let line = line.as_str();
        let mut rest = line;
        while let Some(at) = rest.find("agentledger_") {
            let name: String = rest[at..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            rest = &rest[at + name.len()..];
            names.insert(name);
        }
        for (label, value) in [
            ("outcome", "hit"),
            ("route", "/graphql"),
            ("state", "AWAITING_HUMAN"),
            ("state", "COMPLETED"),
            ("state", "FAILED"),
        ] {
            if line.contains(&format!("{label}=\"{value}\"")) {
                labels.insert((label.to_string(), value.to_string()));
            }
        }
    }
    (names, labels)
}

#[tokio::test(flavor = "multi_thread")]
async fn every_metric_the_alerts_and_the_dashboard_use_is_exported() {
    let db = TestDatabase::create().await;
    let submitter = create_key(&db, "client", &["submitter"], "default");
    let (server, _config) = serve_with_config(&db, "");
    // One request, so that the request series exist.
    let (status, body) = post(
        &server.base,
        Some(&submitter),
        "mutation { submitWorkflow(request: \"Count the words of this note.\") { id } }",
        &json!({}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let metrics = reqwest::get(format!("{}/metrics", server.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(server.stop().success());

    let (names, labels) = used_by_rules();
    assert!(names.len() >= 6, "{names:?}");
    for name in &names {
        let base = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(name);
        assert!(
            metrics.contains(&format!("# TYPE {base} ")),
            "the rules use {name}, which /metrics does not export:\n{metrics}"
        );
    }
    assert!(metrics.contains("agentledger_ready 1"), "{metrics}");
    for (label, value) in &labels {
        // Workflow states are all exported (zero or not); the route of a request seen.
        assert!(
            metrics.contains(&format!("{label}=\"{value}\"")),
            "the rules use {label}=\"{value}\", which /metrics does not show:\n{metrics}"
        );
    }
}

#[test]
fn prometheus_config_of_the_compose_file_passes_promtool() {
    let Some(promtool) = promtool() else { return };
    let out = Command::new(promtool)
        .args(["check", "config", "prometheus.yml"])
        .current_dir(PROMETHEUS)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every Kubernetes manifest validates against the Kubernetes schemas
/// (`kubernetes-validate --strict`, from PyPI), and the kustomization
/// applies every one of them but the secret's example.
#[test]
fn the_kubernetes_manifests_validate_against_the_kubernetes_schemas() {
    let k8s = Path::new(env!("CARGO_MANIFEST_DIR")).join("ops/k8s");
    let mut manifests: Vec<String> = std::fs::read_dir(&k8s)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|name| name.ends_with(".yaml") && name != "kustomization.yaml")
        .collect();
    manifests.sort();
    assert!(manifests.len() >= 6, "{manifests:?}");
    let kustomization = std::fs::read_to_string(k8s.join("kustomization.yaml")).unwrap();
    for name in manifests.iter().filter(|n| *n != "secret.example.yaml") {
        assert!(
            kustomization.contains(&format!("- {name}")),
            "kustomization.yaml does not apply {name}"
        );
    }
    let requirements = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/k8s");
    let Some(python) = common::python_venv(&requirements, "k8s-venv") else {
        return;
    };
    let validator = python.with_file_name("kubernetes-validate");
    let out = Command::new(validator)
        .args(["--strict", "--kubernetes-version", "1.33"])
        .args(&manifests)
        .current_dir(&k8s)
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{said}");
    assert_eq!(
        said.matches(" passed for resource ").count(),
        manifests.len(),
        "{said}"
    );
}
