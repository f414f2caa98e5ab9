//! `agentledger bench api`: the service as clients see it. Starts a real
//! `agentledger serve` process on a scratch database, opens subscriptions
//! over WebSocket (one per workflow, `workflowEvents`), submits workflows
//! over HTTP, and reports workflows/s through GraphQL, the latency from an
//! event's `recorded_at` to a subscriber receiving it, and the server's RSS
//! with every subscription open. With `--closed-loop`, C clients each
//! submit a workflow and follow it to its end before the next
//! (`closed_loop`), with what one workflow costs the database.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentledger_agents::workflow_id_for_key;
use agentledger_eventstore::{PostgresEventStore, PostgresOptions, RecordedEvent};
use anyhow::Context;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use super::{closed_loop, Scratch};

pub(super) const REQUEST: &str = "1. Extract the figures from the text: 12, 7.5 and 30\n2. Sort them in descending order\n3. Compute their total";

#[derive(clap::Args)]
pub struct ApiArgs {
    /// A database on the server to measure (used to create a scratch
    /// database); with `--url`, the server's own database, whose
    /// statistics give the per-workflow costs (optional there).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Workflows, each followed by its own subscription.
    #[arg(long, default_value_t = 1_000)]
    subscriptions: usize,
    /// Submission rate, workflows/s (open loop).
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
    /// Run the server with authentication required, the client with an API
    /// key (roles submitter and viewer) on every request and socket.
    #[arg(long)]
    auth: bool,
    /// Closed loop: each client submits a workflow over HTTP, follows it
    /// with `workflowProgress` until a final state, then submits the next.
    #[arg(long)]
    closed_loop: bool,
    /// Closed loop: clients at once; several, comma-separated, run one
    /// after the other, each on a fresh database and server.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    concurrency: Vec<usize>,
    /// Closed loop: seconds measured per run (after a one-second warm-up).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Closed loop: runs per concurrency.
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Closed loop: drive a running server at this address
    /// (`http://host:port`) instead of starting one; `--key` is its credential.
    #[arg(long)]
    url: Option<String>,
    /// Closed loop with `--url`: the API key to present.
    #[arg(long, env = "AGENTLEDGER_API_KEY", hide_env_values = true)]
    key: Option<String>,
    /// Closed loop: one JSON object per run on stdout, no progress bar.
    #[arg(long)]
    json: bool,
    /// Closed loop: before each run, load a ledger of this many events
    /// (real workflow events replicated, with COPY) and project it, so
    /// that the cost per workflow is measured on a full ledger.
    #[arg(long, default_value_t = 0)]
    preload: u64,
    /// Closed loop on a server this bench starts: leave the analyst, the
    /// gatekeeper and the ethics reviewer to workers run by the bench over
    /// the API (two per role; authentication on), to measure the worker
    /// protocol against the built-ins.
    #[arg(long)]
    external_agents: bool,
}

/// The credential the client presents, and the owner its workflows get;
/// with external agents, the workers' key (role `agent`).
struct Client {
    key: Option<String>,
    owner: String,
    worker_key: Option<String>,
}

pub async fn run(args: ApiArgs) -> anyhow::Result<()> {
    if args.closed_loop {
        return closed_loop_runs(&args).await;
    }
    let database_url = args
        .database_url
        .as_deref()
        .context("DATABASE_URL (or --database-url) is needed")?;
    let scratch = Scratch::create(database_url).await?;
    let result = measure(&args, &scratch.url).await;
    scratch.drop_database().await?;
    result
}

async fn closed_loop_runs(args: &ApiArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.preload == 0 || args.url.is_none(),
        "--preload loads a scratch database: it cannot be used with --url"
    );
    anyhow::ensure!(
        !args.external_agents || args.url.is_none(),
        "--external-agents configures the server this bench starts: it cannot be used with --url"
    );
    let template = if args.preload > 0 {
        super::rebuild::generate(PRELOAD_TEMPLATE).await?
    } else {
        Vec::new()
    };
    for &concurrency in &args.concurrency {
        for _ in 0..args.runs {
            let duration = Duration::from_secs(args.seconds);
            let report = match &args.url {
                Some(url) => {
                    let target = closed_loop::Target {
                        base: url,
                        key: args.key.as_deref(),
                        concurrency,
                        duration,
                    };
                    closed_loop_against(args, &target).await?
                }
                None => {
                    let database_url = args
                        .database_url
                        .as_deref()
                        .context("DATABASE_URL (or --database-url, or --url) is needed")?;
                    let scratch = Scratch::create(database_url).await?;
                    let result = match preload(&scratch.url, &template, args.preload).await {
                        Ok(()) => closed_loop_own(args, &scratch, concurrency).await,
                        Err(e) => Err(e),
                    };
                    scratch.drop_database().await?;
                    let mut report = result?;
                    report["preloaded_events"] = args.preload.into();
                    report
                }
            };
            closed_loop::print(&report, args.json);
        }
    }
    Ok(())
}

/// Events of real workflows a preloaded ledger is replicated from.
const PRELOAD_TEMPLATE: u64 = 20_000;

/// Loads `events` events replicated from `template` into the empty
/// database at `url`, projects them into the read models (as `rebuild`
/// does), and leaves the tables vacuumed and analysed, as a ledger that
/// grew in service would be.
async fn preload(url: &str, template: &[RecordedEvent], events: u64) -> anyhow::Result<()> {
    if events == 0 {
        return Ok(());
    }
    let started = Instant::now();
    let mut admin = super::connect(url).await?;
    super::rebuild::copy_events(&admin, super::verify::replicas(template, events)).await?;
    let store = PostgresEventStore::connect(url, PostgresOptions::default()).await?;
    for name in agentledger_projections::PROJECTIONS {
        crate::rebuild::rebuild_one(&mut admin, &store, name).await?;
    }
    for statement in ["VACUUM ANALYZE", "CHECKPOINT"] {
        admin.batch_execute(statement).await.context(statement)?;
    }
    eprintln!(
        "preloaded {events} events and their read models in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// A closed-loop run against a server this bench starts on `scratch`; the
/// database counts are read once that server has stopped.
async fn closed_loop_own(
    args: &ApiArgs,
    scratch: &Scratch,
    concurrency: usize,
) -> anyhow::Result<Value> {
    let stats = super::connect(&scratch.server).await?;
    settle(&stats, &scratch.name).await?;
    let before = closed_loop::Counters::read(&stats, &scratch.name).await?;
    let (mut child, base, client) = start(args, &scratch.url).await?;
    let ticks = closed_loop::process_ticks(child.id());
    let target = closed_loop::Target {
        base: &base,
        key: client.key.as_deref(),
        concurrency,
        duration: Duration::from_secs(args.seconds),
    };
    let trips = Arc::new(super::workers::Trips::default());
    let stop_workers = tokio_util::sync::CancellationToken::new();
    let workers = client
        .worker_key
        .as_deref()
        .map(|key| super::workers::spawn(&base, key, trips.clone(), stop_workers.clone()));
    let driven = closed_loop::drive(&target, args.json).await;
    let server_ticks = closed_loop::process_ticks(child.id()).saturating_sub(ticks);
    stop_workers.cancel();
    let served = match workers {
        Some(workers) => workers.join_all().await.into_iter().collect(),
        None => Ok(()),
    };
    stop(&mut child);
    let (report, all) = driven?;
    served.context("an external worker failed")?;
    settle(&stats, &scratch.name).await?;
    let after = closed_loop::Counters::read(&stats, &scratch.name).await?;
    let mut report = report.to_json(Some((before, after, all)), Some(server_ticks));
    if client.worker_key.is_some() {
        report["external_agents"] = trips.summary();
    }
    Ok(report)
}

/// A closed-loop run against a running server; with DATABASE_URL, its
/// counts after waiting for PostgreSQL to publish them.
async fn closed_loop_against(
    args: &ApiArgs,
    target: &closed_loop::Target<'_>,
) -> anyhow::Result<Value> {
    let stats = match &args.database_url {
        Some(url) => {
            let client = super::connect(url).await?;
            let name: String = client
                .query_one("SELECT current_database()", &[])
                .await?
                .get(0);
            Some((client, name))
        }
        None => None,
    };
    // Idle backends publish their counts within ten seconds.
    let publish = Duration::from_secs(11);
    let before = match &stats {
        Some((client, name)) => {
            eprintln!(
                "waiting {} s for PostgreSQL's statistics",
                publish.as_secs()
            );
            tokio::time::sleep(publish).await;
            Some(closed_loop::Counters::read(client, name).await?)
        }
        None => None,
    };
    let (report, all) = closed_loop::drive(target, args.json).await?;
    let costs = match (&stats, before) {
        (Some((client, name)), Some(before)) => {
            eprintln!(
                "waiting {} s for PostgreSQL's statistics",
                publish.as_secs()
            );
            tokio::time::sleep(publish).await;
            Some((
                before,
                closed_loop::Counters::read(client, name).await?,
                all,
            ))
        }
        _ => None,
    };
    Ok(report.to_json(costs, None))
}

/// Waits until no backend is connected to database `name`: each has
/// published its statistics on exit.
async fn settle(stats: &tokio_postgres::Client, name: &str) -> anyhow::Result<()> {
    for _ in 0..1_000 {
        let connected: i64 = stats
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1",
                &[&name],
            )
            .await?
            .get(0);
        if connected == 0 {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    anyhow::bail!("connections to {name} stayed open for 10 s after the server stopped")
}

/// Stops a server started by [`start`] and waits for it.
fn stop(child: &mut std::process::Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

async fn measure(args: &ApiArgs, url: &str) -> anyhow::Result<()> {
    let (mut child, base, client) = start(args, url).await?;
    let result = drive(args, &base, child.id(), &client).await;
    stop(&mut child);
    result
}

/// Starts `agentledger serve` on database `url`; its address and the
/// credential to present.
async fn start(args: &ApiArgs, url: &str) -> anyhow::Result<(std::process::Child, String, Client)> {
    let mut serve = Command::new(std::env::current_exe()?);
    serve
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("DATABASE_URL", url)
        .env_remove("AGENTLEDGER_ADMIN_DATABASE_URL")
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped());
    if args.external_agents {
        let config =
            std::env::temp_dir().join(format!("agentledger-bench-{}.toml", std::process::id()));
        std::fs::write(&config, super::workers::CONFIG)?;
        serve.env("AGENTLEDGER_CONFIG", &config);
    }
    let client = if args.auth || args.external_agents {
        use agentledger_eventstore::api_keys::{ApiKeys, NewApiKey, PostgresApiKeys};
        agentledger_eventstore::migrate::run(url).await?;
        let keys = PostgresApiKeys::new(agentledger_eventstore::postgres::pool(url, 1)?);
        let (key, secret) = keys
            .create(NewApiKey {
                name: "bench".into(),
                roles: vec!["submitter".into(), "viewer".into()],
                tenant: "default".into(),
                expires_at: None,
            })
            .await?;
        let worker_key = if args.external_agents {
            let (_, secret) = keys
                .create(NewApiKey {
                    name: "bench-workers".into(),
                    roles: vec!["agent".into()],
                    tenant: "default".into(),
                    expires_at: None,
                })
                .await?;
            Some(secret)
        } else {
            None
        };
        serve.env("AGENTLEDGER_AUTH_MODE", "required");
        Client {
            key: Some(secret),
            owner: format!("apikey:{}", key.key_id),
            worker_key,
        }
    } else {
        Client {
            key: None,
            owner: "anonymous".into(),
            worker_key: None,
        }
    };
    let mut child = serve.spawn().context("starting agentledger serve")?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
    let base = line
        .trim()
        .strip_prefix("listening on ")
        .context("serve did not print its address")?
        .to_string();
    Ok((child, base, client))
}

async fn drive(args: &ApiArgs, base: &str, pid: u32, client: &Client) -> anyhow::Result<()> {
    let rss_idle = rss_kib(pid);
    let latencies: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let ws_url = format!("{}/graphql/ws", base.replacen("http", "ws", 1));
    let mut keys = Vec::new();
    let started = Instant::now();
    for i in 0..args.subscriptions {
        let key = format!("bench-{i}");
        let id = workflow_id_for_key(&client.owner, &key);
        keys.push(key);
        let mut ws = closed_loop::open(&ws_url, client.key.as_deref()).await?;
        let query = format!(
            "subscription {{ workflowEvents(workflowId: \"{id}\") {{ type recordedAt }} }}"
        );
        ws.send(Message::Text(
            json!({"id": "1", "type": "subscribe", "payload": {"query": query}})
                .to_string()
                .into(),
        ))
        .await?;
        let (latencies, done) = (latencies.clone(), done_tx.clone());
        tokio::spawn(async move {
            while let Some(Ok(message)) = ws.next().await {
                let Message::Text(text) = message else {
                    continue;
                };
                let received = chrono::Utc::now();
                let Ok(value) = serde_json::from_str::<Value>(&text) else {
                    continue;
                };
                let event = &value["payload"]["data"]["workflowEvents"];
                let Some(at) = event["recordedAt"]
                    .as_str()
                    .and_then(|t| t.parse::<chrono::DateTime<chrono::Utc>>().ok())
                else {
                    continue;
                };
                let latency = (received - at).to_std().unwrap_or_default();
                latencies.lock().expect("lock").push(latency);
                if event["type"] == "WorkflowCompleted" {
                    let _ = done.send(());
                }
            }
        });
    }
    println!(
        "{} subscriptions open in {:.1} s; server RSS {} MiB before they opened",
        args.subscriptions,
        started.elapsed().as_secs_f64(),
        rss_idle / 1024
    );
    let rss_open = rss_kib(pid);
    let http = reqwest::Client::new();
    let started = Instant::now();
    let mut submits = tokio::task::JoinSet::new();
    for (i, key) in keys.iter().enumerate() {
        let due = started + Duration::from_secs_f64(i as f64 / args.rate);
        tokio::time::sleep_until(due.into()).await;
        let (http, base, key) = (http.clone(), base.to_string(), key.clone());
        let credential = client.key.clone();
        submits.spawn(async move {
            let body = json!({
                "query": "mutation($r: String!, $k: String) { submitWorkflow(request: $r, idempotencyKey: $k) { id } }",
                "variables": { "r": REQUEST, "k": key },
            });
            let mut request = http
                .post(format!("{base}/graphql"))
                .header("content-type", "application/json");
            if let Some(credential) = credential {
                request = request.header("x-api-key", credential);
            }
            request
                .body(body.to_string())
                .send()
                .await
                .and_then(|r| r.error_for_status())
                .map(|_| ())
        });
    }
    while let Some(result) = submits.join_next().await {
        result?.context("submitWorkflow")?;
    }
    for _ in 0..keys.len() {
        tokio::time::timeout(Duration::from_secs(120), done_rx.recv())
            .await
            .context("a workflow did not complete within 120 s")?;
    }
    let elapsed = started.elapsed();
    let rss_busy = rss_kib(pid);
    let mut latencies = std::mem::take(&mut *latencies.lock().expect("lock"));
    latencies.sort();
    let ms = |q: f64| {
        latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)].as_secs_f64()
            * 1e3
    };
    println!(
        "{} workflows submitted over HTTP at {:.0}/s, all completed: {:.0} workflows/s end to end",
        keys.len(),
        args.rate,
        keys.len() as f64 / elapsed.as_secs_f64()
    );
    println!(
        "event recorded → subscriber received, {} deliveries: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        latencies.len(),
        ms(0.5),
        ms(0.99),
        ms(1.0)
    );
    println!(
        "server RSS: {} MiB with {} subscriptions open, {} MiB after the run",
        rss_open / 1024,
        args.subscriptions,
        rss_busy / 1024
    );
    Ok(())
}

/// The resident set of process `pid`, in KiB (0 when unknown).
fn rss_kib(pid: u32) -> u64 {
    super::verify::status_kib(pid, "VmRSS:")
}
