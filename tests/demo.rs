//! End-to-end: `agentledger demo` runs every path of a workflow in one
//! process and ends with intact hash chains.

mod common;

use std::process::Command;

#[test]
fn the_demo_shows_every_outcome_and_verifies_its_chains() {
    let output = Command::new(env!("CARGO_BIN_EXE_agentledger"))
        .arg("demo")
        .env("RUST_LOG", "warn")
        .output()
        .expect("agentledger runs");
    let stdout = String::from_utf8(output.stdout).expect("UTF-8 output");
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let summary = stdout
        .split("\nSummary")
        .nth(1)
        .expect("a summary follows the live stages");
    let state_of = |label: &str| {
        summary
            .lines()
            .find(|l| l.starts_with(label))
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap_or_else(|| panic!("{label} in {summary}"))
            .to_string()
    };
    assert_eq!(state_of("#1 "), "Completed");
    assert_eq!(state_of("#2 "), "Completed");
    assert_eq!(state_of("#3 "), "Rejected");
    assert_eq!(state_of("#4 "), "Completed");
    assert_eq!(state_of("#5 "), "Completed");
    assert_eq!(state_of("#6 "), "Flagged");
    // The live part shows the stages as they happened.
    assert!(stdout.contains("#4           (the demo reviewer approves"));
    assert!(stdout.contains(
        "#5  gitcode  st-1 attempt 1 failed (Error): upstream timed out (demo); will retry"
    ));
    assert!(stdout.contains("#5  gitcode  st-1 attempt 2 succeeded"));
    assert!(stdout.contains("#1  gitcode  st-3 attempt 1 succeeded: 49.5"));
    assert!(stdout.contains("#2  sena     analysis round 0: st-1=summarize, st-2=text_stats"));
    assert!(stdout.contains("hash chains: intact"));
}

#[test]
fn the_demo_follows_a_running_server_over_graphql() {
    let server = common::Server::start(&[("RUST_LOG", "warn")]);
    let output = Command::new(env!("CARGO_BIN_EXE_agentledger"))
        .args(["demo", "--url", &server.base])
        .env("RUST_LOG", "warn")
        .output()
        .expect("agentledger runs");
    let stdout = String::from_utf8(output.stdout).expect("UTF-8 output");
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let summary = stdout.split("\nSummary").nth(1).expect("a summary");
    for (label, state) in [
        ("#1 ", "COMPLETED"),
        ("#3 ", "REJECTED"),
        ("#4 ", "COMPLETED"),
        ("#6 ", "FLAGGED"),
    ] {
        let line = summary
            .lines()
            .find(|l| l.starts_with(label))
            .unwrap_or_else(|| panic!("{label} in {summary}"));
        assert_eq!(line.split_whitespace().nth(1), Some(state), "{line}");
    }
    assert!(
        stdout.contains("#4           (the demo reviewer approves)"),
        "{stdout}"
    );
    assert!(server.stop().success());
}
