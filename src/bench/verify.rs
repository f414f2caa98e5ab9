//! `agentledger bench verify`: how fast the whole ledger is verified, and
//! in how much memory. A ledger of real workflow events (made by the agents
//! in memory) is replicated under new stream ids, each copy with its own
//! recomputed chains, and streamed into a scratch database with COPY: a
//! million events without holding them in memory. Then, in the same run:
//! a plain sequential read of every event, page after page (the baseline:
//! what the database and the driver cost), `verify_ledger` (every chain recomputed), `check_ledger`
//! (chains and the tree head, what a digest needs), and the real
//! `agentledger verify` process, whose peak RSS is sampled from /proc.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use agentledger_eventstore::chain::recompute_hash;
use agentledger_eventstore::digest::check_ledger;
use agentledger_eventstore::{
    EventStore, PostgresEventStore, PostgresOptions, RecordedEvent, StreamId,
};
use anyhow::{bail, Context};
use uuid::Uuid;

use super::{connect, Scratch};

#[derive(clap::Args)]
pub struct VerifyArgs {
    /// A database on the server to measure (used to create a scratch database).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
    /// Events in the ledger.
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    /// Events of real workflows the ledger is replicated from.
    #[arg(long, default_value_t = 20_000)]
    template: u64,
    /// Leave the scratch database (its URL is printed) for profiling.
    #[arg(long)]
    keep: bool,
}

pub async fn run(args: VerifyArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let template = super::rebuild::generate(args.template).await?;
    println!(
        "template: {} events from the agents in memory ({:.1} s)",
        template.len(),
        started.elapsed().as_secs_f64()
    );
    let scratch = Scratch::create(&args.database_url).await?;
    let result = measure(&scratch.url, &template, args.events).await;
    if args.keep {
        println!("kept the scratch database: {}", scratch.url);
    } else {
        scratch.drop_database().await?;
    }
    result
}

async fn measure(url: &str, template: &[RecordedEvent], events: u64) -> anyhow::Result<()> {
    let client = connect(url).await?;
    let started = Instant::now();
    anyhow::ensure!(!template.is_empty(), "an empty template");
    let loaded = super::rebuild::copy_events(&client, replicas(template, events)).await?;
    println!(
        "ledger: {loaded} events loaded with COPY in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let store = PostgresEventStore::connect(url, PostgresOptions::default()).await?;
    let head = store.head_position().await?;

    println!(
        "{:<34}{:>10}{:>12}{:>10}",
        "pass", "seconds", "events/s", "× read"
    );
    let read = {
        let started = Instant::now();
        let mut from = 1;
        let mut seen = 0u64;
        while from <= head {
            let page = store.read_range(from, head, 10_000).await?;
            let Some(last) = page.last() else { break };
            from = last.global_position + 1;
            seen += page.len() as u64;
        }
        anyhow::ensure!(seen == loaded, "read {seen} of {loaded} events");
        started.elapsed().as_secs_f64()
    };
    let row = |name: &str, seconds: f64| {
        println!(
            "{:<34}{:>10.1}{:>12.0}{:>10.2}",
            name,
            seconds,
            loaded as f64 / seconds,
            seconds / read
        );
    };
    row("read only, sequential (baseline)", read);

    let started = Instant::now();
    let verification = agentledger_eventstore::verify_ledger(&store, |_, _| {}).await?;
    anyhow::ensure!(
        verification.ok && verification.checked_events == loaded,
        "{verification:?}"
    );
    row("verify_ledger (chains)", started.elapsed().as_secs_f64());

    let started = Instant::now();
    let check = check_ledger(&store, head, |_, _| {}).await?;
    anyhow::ensure!(check.verification.ok && check.events == loaded);
    row(
        "check_ledger (chains + tree head)",
        started.elapsed().as_secs_f64(),
    );

    // The CLI as an operator runs it, in its own process.
    let started = Instant::now();
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .arg("verify")
        .env("DATABASE_URL", url)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("starting agentledger verify")?;
    let mut peak_kib = 0;
    let status = loop {
        peak_kib = peak_kib.max(status_kib(child.id(), "VmHWM:"));
        if let Some(status) = child.try_wait()? {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let seconds = started.elapsed().as_secs_f64();
    if !status.success() {
        bail!("agentledger verify failed: {status}");
    }
    row("agentledger verify (process)", seconds);
    println!(
        "agentledger verify: peak RSS {:.1} MiB over {loaded} events (sampled every 20 ms)",
        peak_kib as f64 / 1024.0
    );
    Ok(())
}

/// `events` events: copies of `template` under new stream ids and event
/// ids, each stream's chain recomputed, made one at a time.
pub(super) fn replicas(
    template: &[RecordedEvent],
    events: u64,
) -> impl Iterator<Item = RecordedEvent> + '_ {
    let mut streams: HashMap<StreamId, (StreamId, [u8; 32])> = HashMap::new();
    (0..events).map(move |i| {
        let original = &template[(i % template.len() as u64) as usize];
        if i % template.len() as u64 == 0 {
            streams.clear(); // a new copy: new streams
        }
        let (stream, last_hash) = streams
            .entry(original.stream_id.clone())
            .or_insert_with(|| {
                let prefix = original
                    .stream_id
                    .as_str()
                    .split_once('-')
                    .map_or("copy", |(prefix, _)| prefix);
                (
                    StreamId::new(format!("{prefix}-{}", Uuid::now_v7())).expect("valid"),
                    [0; 32],
                )
            });
        let mut event = original.clone();
        event.global_position = i + 1;
        event.stream_id = stream.clone();
        event.event_id = Uuid::now_v7();
        event.prev_hash = *last_hash;
        event.hash = recompute_hash(&event);
        *last_hash = event.hash;
        event
    })
}

/// A field of /proc/PID/status in KiB (0 when unknown).
pub(super) fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}
