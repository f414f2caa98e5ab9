//! Helpers shared by the end-to-end tests: a real `agentledger serve`
//! process on a random port.

#![allow(dead_code)] // each test file uses a different part

pub mod cluster;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

/// A running `agentledger serve`, stopped with SIGTERM on drop.
pub struct Server {
    child: Child,
    pub base: String,
}

impl Server {
    pub fn start(env: &[(&str, &str)]) -> Self {
        Self::start_logging(env, Stdio::inherit())
    }

    /// [`Server::start`] with the server's log (stderr) going to `log`.
    pub fn start_logging(env: &[(&str, &str)], log: impl Into<Stdio>) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_agentledger"));
        command
            .args(["serve", "--listen", "127.0.0.1:0"])
            .env_remove("DATABASE_URL")
            .env_remove("AGENTLEDGER_ADMIN_DATABASE_URL")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(log);
        let mut child = command.spawn().expect("agentledger starts");
        // The server prints its address once it listens: the event to wait for.
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped"))
            .read_line(&mut line)
            .expect("stdout");
        let base = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected: {line:?}"))
            .to_string();
        Self { child, base }
    }

    /// SIGKILL, as the OOM killer does: no shutdown of any kind.
    pub fn kill(mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("wait");
    }

    pub fn stop(mut self) -> std::process::ExitStatus {
        terminate(&self.child);
        self.child.wait().expect("wait")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn terminate(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
}

/// Runs `agentledger ARGS` with `DATABASE_URL` set (and no admin URL).
pub fn agentledger(args: &[&str], database_url: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_agentledger"))
        .args(args)
        .env("DATABASE_URL", database_url)
        .env_remove("AGENTLEDGER_ADMIN_DATABASE_URL")
        .env("RUST_LOG", "warn")
        .output()
        .expect("agentledger runs")
}

/// Runs `requests` through the agents on `store` (no projections, no
/// server) and returns once every one has completed; their ids, in order.
pub async fn complete_workflows(
    store: &agentledger_eventstore::PostgresEventStore,
    requests: &[&str],
) -> Vec<uuid::Uuid> {
    use std::sync::Arc;

    use agentledger_agents::{
        PostgresWorkQueue, Runtime, RuntimeConfig, Submission, SystemClock, ToolRegistry,
    };
    use agentledger_eventstore::EventStore;

    let runtime = Runtime::new(
        Arc::new(store.clone()),
        Arc::new(PostgresWorkQueue::new(store.pool().clone())),
        ToolRegistry::default(),
        Arc::new(SystemClock),
        RuntimeConfig::default(),
    );
    let mut events = store.subscribe_all(store.head_position().await.unwrap() + 1);
    let (stop, running) = run_in_background(&runtime);
    let mut ids = Vec::new();
    for request in requests {
        let submission = Submission {
            request: request.to_string(),
            ..Default::default()
        };
        ids.push(runtime.submit(submission).await.unwrap());
    }
    let mut ended = 0;
    while ended < requests.len() {
        if events.next().await.unwrap().unwrap().event_type == "WorkflowCompleted" {
            ended += 1;
        }
    }
    let _ = stop.send(());
    running.await.unwrap();
    ids
}

/// Runs `runtime`'s claim loop in a task until the sender fires (or the
/// runtime dies by a fault); the task ends when the loop has stopped.
pub fn run_in_background(
    runtime: &agentledger_agents::Runtime,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let runtime = runtime.clone();
    let task = tokio::spawn(async move {
        runtime
            .run(async {
                let _ = stopped.await;
            })
            .await
    });
    (stop, task)
}

/// Creates an API key with the CLI; its secret (the last line of stdout).
pub fn create_key(
    db: &agentledger_eventstore::testing::TestDatabase,
    name: &str,
    roles: &[&str],
    tenant: &str,
) -> String {
    let mut args = vec!["apikey", "create", "--name", name, "--tenant", tenant];
    for role in roles {
        args.extend(["--role", role]);
    }
    let out = agentledger(&args, db.admin_url());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let secret = stdout.lines().last().unwrap().to_string();
    assert!(secret.starts_with("alk_"), "{stdout}");
    // The secret appears once, alone on its line.
    assert_eq!(stdout.matches(&secret).count(), 1);
    secret
}

/// POST /graphql with `credential` as a bearer token: (status, body).
pub async fn post(
    base: &str,
    credential: Option<&str>,
    query: &str,
    variables: &serde_json::Value,
) -> (u16, serde_json::Value) {
    let mut request = reqwest::Client::new()
        .post(format!("{base}/graphql"))
        .header("content-type", "application/json");
    if let Some(credential) = credential {
        request = request.header("authorization", format!("Bearer {credential}"));
    }
    let response = request
        .body(serde_json::json!({ "query": query, "variables": variables }).to_string())
        .send()
        .await
        .expect("POST /graphql");
    let status = response.status().as_u16();
    let body = serde_json::from_str(&response.text().await.unwrap()).expect("JSON");
    (status, body)
}

/// Submits `request` over GraphQL with `credential` and returns its id
/// once the read model shows it COMPLETED (within 30 s).
pub async fn submit_completed(base: &str, credential: &str, request: &str) -> uuid::Uuid {
    let (status, body) = post(
        base,
        Some(credential),
        "mutation($r: String!) { submitWorkflow(request: $r) { id } }",
        &serde_json::json!({ "r": request }),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let id = body["data"]["submitWorkflow"]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("{body}"))
        .to_string();
    let started = std::time::Instant::now();
    loop {
        let (_, body) = post(
            base,
            Some(credential),
            "query($id: ID!) { workflow(id: $id) { state } }",
            &serde_json::json!({ "id": id }),
        )
        .await;
        if body["data"]["workflow"]["state"] == "COMPLETED" {
            return id.parse().expect("a workflow id is a UUID");
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "{body}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

pub fn code(body: &serde_json::Value) -> Option<&str> {
    body["errors"][0]["extensions"]["code"].as_str()
}

/// A file removed when dropped.
pub struct TempFile(pub std::path::PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// How many events the ledger holds, read as the owner.
pub async fn count_events(db: &agentledger_eventstore::testing::TestDatabase) -> i64 {
    db.admin_client()
        .await
        .query_one("SELECT count(*) FROM events", &[])
        .await
        .unwrap()
        .get(0)
}

/// Follows `events` (a `$all` subscription) until every workflow of `ids`
/// has a final event, at most `limit`; each workflow's events in order,
/// or the ids still open when the time ran out.
pub async fn follow_to_end(
    events: &mut agentledger_eventstore::Subscription,
    ids: impl IntoIterator<Item = String>,
    limit: std::time::Duration,
) -> Result<
    std::collections::HashMap<String, Vec<agentledger_eventstore::RecordedEvent>>,
    std::collections::HashSet<String>,
> {
    let mut open: std::collections::HashSet<String> = ids.into_iter().collect();
    let mut streams: std::collections::HashMap<String, Vec<agentledger_eventstore::RecordedEvent>> =
        std::collections::HashMap::new();
    let follow = async {
        while !open.is_empty() {
            let event = events.next().await.unwrap().unwrap();
            let Some(id) = event.stream_id.as_str().strip_prefix("workflow-") else {
                continue;
            };
            if matches!(
                event.event_type.as_str(),
                "WorkflowCompleted" | "WorkflowRejected" | "WorkflowFlagged" | "WorkflowFailed"
            ) {
                open.remove(id);
            }
            streams
                .entry(id.to_string())
                .or_default()
                .push((*event).clone());
        }
    };
    match tokio::time::timeout(limit, follow).await {
        Ok(()) => Ok(streams),
        Err(_) => Err(open),
    }
}

/// `serve` on `db` in the test profile with authentication required and
/// the configuration file `toml` (removed when the returned file drops).
pub fn serve_with_config(
    db: &agentledger_eventstore::testing::TestDatabase,
    toml: &str,
) -> (Server, TempFile) {
    let config =
        TempFile(std::env::temp_dir().join(format!("agentledger-{}.toml", uuid::Uuid::new_v4())));
    std::fs::write(&config.0, toml).unwrap();
    let config_path = config.0.to_string_lossy().to_string();
    let server = Server::start(&[
        ("DATABASE_URL", db.service_url().as_str()),
        ("AGENTLEDGER_ADMIN_DATABASE_URL", db.admin_url()),
        ("AGENTLEDGER_PROFILE", "test"),
        ("AGENTLEDGER_AUTH_MODE", "required"),
        ("AGENTLEDGER_CONFIG", config_path.as_str()),
        ("RUST_LOG", "warn"),
    ]);
    (server, config)
}

/// A Python virtual environment under cargo's target directory named
/// `name`, with the requirements of the example in `example` installed
/// (again when they change); `None`, with the reason printed, where this
/// machine has no Python 3.
pub fn python_venv(example: &std::path::Path, name: &str) -> Option<std::path::PathBuf> {
    use std::process::Command;
    if Command::new("python3").arg("--version").output().is_err() {
        println!("skipped: python3 is not installed");
        return None;
    }
    let venv = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let bin = venv.join("bin/python");
    let requirements = example.join("requirements.txt");
    let stamp = venv.join("requirements.txt");
    let current = std::fs::read(&requirements).unwrap();
    if std::fs::read(&stamp).ok().as_ref() != Some(&current) {
        let made = Command::new("python3")
            .args(["-m", "venv", "--clear"])
            .arg(&venv)
            .status()
            .unwrap();
        assert!(made.success(), "python3 -m venv failed");
        let installed = Command::new(&bin)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "-r",
            ])
            .arg(&requirements)
            .status()
            .unwrap();
        assert!(
            installed.success(),
            "pip install -r {}",
            requirements.display()
        );
        std::fs::write(&stamp, current).unwrap();
    }
    Some(bin)
}
