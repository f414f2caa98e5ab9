//! `agentledger bench api --closed-loop`: what one client gets, the way
//! the peers' own benchmarks measure it. Each of C clients submits a
//! workflow over HTTP, follows it with `workflowProgress` over its
//! WebSocket until a final state, then submits the next. Reported:
//! workflows/s, submit → final latency, and what one workflow costs
//! PostgreSQL (transactions, rows, WAL) and the CPU of both processes.
//!
//! The database counts come from `pg_stat_database` of the service's
//! database. PostgreSQL publishes a backend's counts when it exits, or
//! within about ten seconds while it idles: with a server the bench started,
//! the counts are read after that server stopped (its start-up included);
//! with `--url`, after waiting for the statistics to settle. WAL and the
//! PostgreSQL CPU are cluster-wide: measure on an otherwise quiet server.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::{SinkExt, StreamExt};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use super::api::REQUEST;

const FINAL: [&str; 5] = ["COMPLETED", "REJECTED", "FAILED", "FLAGGED", "CANCELLED"];

/// What the closed loop drives.
pub(super) struct Target<'a> {
    /// `http://host:port` of the server.
    pub base: &'a str,
    /// The credential to present, when the server requires one.
    pub key: Option<&'a str>,
    pub concurrency: usize,
    pub duration: Duration,
}

/// The counters read before and after a run.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Counters {
    commits: i64,
    rollbacks: i64,
    inserted: i64,
    updated: i64,
    deleted: i64,
    wal_records: i64,
    wal_bytes: i64,
    /// CPU of every `postgres` process (and of those reaped), in ticks.
    postgres_ticks: u64,
}

impl Counters {
    /// Reads the counters of database `name` through `client`.
    pub(super) async fn read(client: &tokio_postgres::Client, name: &str) -> anyhow::Result<Self> {
        let row = client
            .query_one(
                "SELECT d.xact_commit, d.xact_rollback, d.tup_inserted, d.tup_updated, \
                 d.tup_deleted, w.wal_records, \
                 pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint \
                 FROM pg_stat_database d, pg_stat_wal w WHERE d.datname = $1",
                &[&name],
            )
            .await
            .with_context(|| format!("reading the statistics of database {name}"))?;
        Ok(Self {
            commits: row.get(0),
            rollbacks: row.get(1),
            inserted: row.get(2),
            updated: row.get(3),
            deleted: row.get(4),
            wal_records: row.get(5),
            wal_bytes: row.get(6),
            postgres_ticks: postgres_ticks(),
        })
    }
}

/// One run's figures.
pub(super) struct Report {
    pub concurrency: usize,
    pub seconds: f64,
    pub workflows: usize,
    /// Submit → final state seen, sorted.
    latencies: Vec<Duration>,
}

impl Report {
    fn percentile_ms(&self, q: f64) -> f64 {
        if self.latencies.is_empty() {
            return f64::NAN;
        }
        let i = ((self.latencies.len() as f64 * q).ceil() as usize).clamp(1, self.latencies.len());
        self.latencies[i - 1].as_secs_f64() * 1e3
    }

    /// The figures as JSON, with the per-workflow costs when counted:
    /// `counted` workflows between the two counter readings, and the
    /// server's CPU ticks over the same span.
    pub(super) fn to_json(
        &self,
        costs: Option<(Counters, Counters, usize)>,
        server_ticks: Option<u64>,
    ) -> Value {
        let mut out = json!({
            "concurrency": self.concurrency,
            "seconds": self.seconds,
            "workflows": self.workflows,
            "workflows_per_second": self.workflows as f64 / self.seconds,
            "latency_ms": {
                "p50": self.percentile_ms(0.5),
                "p99": self.percentile_ms(0.99),
                "max": self.percentile_ms(1.0),
            },
        });
        if let Some((before, after, counted)) = costs {
            let per = |d: i64| d as f64 / counted.max(1) as f64;
            let ms_per = |ticks: u64| ticks as f64 * 10.0 / counted.max(1) as f64;
            out["per_workflow"] = json!({
                "workflows_counted": counted,
                "transactions": per(after.commits + after.rollbacks - before.commits - before.rollbacks),
                "commits": per(after.commits - before.commits),
                "rows_inserted": per(after.inserted - before.inserted),
                "rows_updated": per(after.updated - before.updated),
                "rows_deleted": per(after.deleted - before.deleted),
                "wal_records": per(after.wal_records - before.wal_records),
                "wal_bytes": per(after.wal_bytes - before.wal_bytes),
                "postgres_cpu_ms": ms_per(after.postgres_ticks.saturating_sub(before.postgres_ticks)),
                "server_cpu_ms": server_ticks.map(ms_per),
            });
        }
        out
    }
}

/// Prints `report` (as JSON with `json`).
pub(super) fn print(report: &Value, json: bool) {
    if json {
        println!("{report}");
        return;
    }
    let r = report;
    println!(
        "closed loop, {} client(s), {:.1} s: {} workflows, {:.0} workflows/s; submit → final p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        r["concurrency"],
        r["seconds"].as_f64().unwrap_or_default(),
        r["workflows"],
        r["workflows_per_second"].as_f64().unwrap_or_default(),
        r["latency_ms"]["p50"].as_f64().unwrap_or_default(),
        r["latency_ms"]["p99"].as_f64().unwrap_or_default(),
        r["latency_ms"]["max"].as_f64().unwrap_or_default(),
    );
    let p = &r["per_workflow"];
    if p.is_object() {
        let f = |k: &str| p[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "per workflow ({} counted): {:.1} transactions ({:.1} committed), rows {:.1} inserted / {:.1} updated / {:.1} deleted, {:.0} WAL records, {:.1} KB WAL",
            p["workflows_counted"],
            f("transactions"),
            f("commits"),
            f("rows_inserted"),
            f("rows_updated"),
            f("rows_deleted"),
            f("wal_records"),
            f("wal_bytes") / 1e3,
        );
        println!(
            "CPU per workflow: PostgreSQL {:.2} ms, server {}",
            f("postgres_cpu_ms"),
            p["server_cpu_ms"]
                .as_f64()
                .map_or("not measured".to_string(), |ms| format!("{ms:.2} ms")),
        );
    }
}

/// Runs the closed loop for `target.duration` after a one-second warm-up
/// (whose workflows count toward the costs, not the latencies); returns
/// the run's figures and how many workflows completed in all.
pub(super) async fn drive(target: &Target<'_>, json: bool) -> anyhow::Result<(Report, usize)> {
    let ws_url = format!("{}/graphql/ws", target.base.replacen("http", "ws", 1));
    let warm_until = Instant::now() + Duration::from_secs(1);
    let end = warm_until + target.duration;
    let completed = Arc::new(AtomicU64::new(0));
    let bar = if json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(target.duration.as_secs())
    };
    bar.set_style(
        ProgressStyle::with_template("[{bar:30}] {pos}/{len} s  {msg}").expect("a valid template"),
    );
    let mut clients = tokio::task::JoinSet::new();
    for client in 0..target.concurrency {
        let http = reqwest::Client::new();
        let (base, ws_url) = (target.base.to_string(), ws_url.clone());
        let key = target.key.map(str::to_string);
        let completed = completed.clone();
        clients.spawn(async move {
            let mut ws = open(&ws_url, key.as_deref()).await?;
            let mut timed = Vec::new();
            let mut all = 0usize;
            let mut n = 0u64;
            while Instant::now() < end {
                let started = Instant::now();
                let id = submit(&http, &base, key.as_deref()).await?;
                n += 1;
                let sub = format!("{client}-{n}");
                tokio::time::timeout(Duration::from_secs(120), follow(&mut ws, &sub, &id))
                    .await
                    .with_context(|| format!("workflow {id} did not finish within 120 s"))??;
                let took = started.elapsed();
                all += 1;
                completed.fetch_add(1, Ordering::Relaxed);
                if started >= warm_until && Instant::now() <= end {
                    timed.push(took);
                }
            }
            anyhow::Ok((timed, all))
        });
    }
    let ticker = {
        let (bar, completed) = (bar.clone(), completed.clone());
        tokio::spawn(async move {
            let start = Instant::now();
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                bar.set_position(start.elapsed().as_secs().saturating_sub(1));
                bar.set_message(format!(
                    "{} workflows completed",
                    completed.load(Ordering::Relaxed)
                ));
            }
        })
    };
    let mut latencies = Vec::new();
    let mut all = 0;
    while let Some(result) = clients.join_next().await {
        let (timed, count) = result??;
        latencies.extend(timed);
        all += count;
    }
    ticker.abort();
    bar.finish_and_clear();
    latencies.sort();
    Ok((
        Report {
            concurrency: target.concurrency,
            seconds: target.duration.as_secs_f64(),
            workflows: latencies.len(),
            latencies,
        },
        all,
    ))
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A `graphql-transport-ws` socket to `url`, initialised with `key`.
pub(super) async fn open(url: &str, key: Option<&str>) -> anyhow::Result<Socket> {
    let mut request = url.into_client_request()?;
    request
        .headers_mut()
        .insert("sec-websocket-protocol", "graphql-transport-ws".parse()?);
    let (mut ws, _) = tokio_tungstenite::connect_async(request)
        .await
        .context("WebSocket")?;
    ws.send(Message::Text(
        json!({"type": "connection_init", "payload": {"X-API-Key": key}})
            .to_string()
            .into(),
    ))
    .await?;
    let ack = next_json(&mut ws).await?;
    anyhow::ensure!(ack["type"] == "connection_ack", "connection_init: {ack}");
    Ok(ws)
}

async fn next_json(ws: &mut Socket) -> anyhow::Result<Value> {
    loop {
        match ws.next().await.context("the server closed the socket")?? {
            Message::Text(text) => return Ok(serde_json::from_str(&text)?),
            Message::Close(frame) => anyhow::bail!("the server closed the socket: {frame:?}"),
            _ => continue,
        }
    }
}

async fn submit(http: &reqwest::Client, base: &str, key: Option<&str>) -> anyhow::Result<String> {
    let body = json!({
        "query": "mutation($r: String!) { submitWorkflow(request: $r) { id } }",
        "variables": { "r": REQUEST },
    });
    let mut request = http
        .post(format!("{base}/graphql"))
        .header("content-type", "application/json");
    if let Some(key) = key {
        request = request.header("x-api-key", key);
    }
    let answer: Value = serde_json::from_slice(
        &request
            .body(body.to_string())
            .send()
            .await?
            .error_for_status()?
            .bytes()
            .await?,
    )?;
    answer["data"]["submitWorkflow"]["id"]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("submitWorkflow: {answer}"))
}

/// Follows workflow `id` until a final state, then until the server
/// completes the subscription.
async fn follow(ws: &mut Socket, sub: &str, id: &str) -> anyhow::Result<()> {
    ws.send(Message::Text(
        json!({"id": sub, "type": "subscribe", "payload": {
            "query": "subscription($id: ID!) { workflowProgress(id: $id) { state } }",
            "variables": { "id": id },
        }})
        .to_string()
        .into(),
    ))
    .await?;
    let mut finished = false;
    loop {
        let message = next_json(ws).await?;
        if message["id"] != sub {
            continue;
        }
        match message["type"].as_str() {
            Some("next") => {
                let state = &message["payload"]["data"]["workflowProgress"]["state"];
                anyhow::ensure!(state.is_string(), "workflowProgress: {message}");
                finished |= FINAL.iter().any(|f| state == f);
            }
            Some("complete") if finished => return Ok(()),
            _ => anyhow::bail!("workflowProgress of {id}: {message}"),
        }
    }
}

/// CPU time of every process named `postgres`, in clock ticks (1/100 s),
/// with the time of the backends the postmaster has reaped.
fn postgres_ticks() -> u64 {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter(|stat| stat.contains("(postgres)"))
        .map(|stat| cpu_ticks(&stat, true))
        .sum()
}

/// User and system ticks of one process from its `/proc/PID/stat` line,
/// with those of its reaped children when `children`.
pub(super) fn cpu_ticks(stat: &str, children: bool) -> u64 {
    // Fields after the parenthesised name: state is the 3rd field, utime
    // the 14th, stime 15th, cutime 16th, cstime 17th.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0;
    };
    let fields: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(4)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    let own = fields.first().copied().unwrap_or(0) + fields.get(1).copied().unwrap_or(0);
    if children {
        own + fields.get(2).copied().unwrap_or(0) + fields.get(3).copied().unwrap_or(0)
    } else {
        own
    }
}

/// User and system ticks of process `pid` (0 when it is gone).
pub(super) fn process_ticks(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| cpu_ticks(&stat, false))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_reads_utime_stime_and_the_childrens() {
        // A process whose name holds a space and a parenthesis.
        let stat = "42 (post gres) S 1 42 42 0 -1 4194560 500 0 0 0 7 3 11 13 20 0 1 0 100 0 0";
        assert_eq!(cpu_ticks(stat, false), 10);
        assert_eq!(cpu_ticks(stat, true), 34);
    }
}
