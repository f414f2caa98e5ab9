//! `agentledger bench rebuild`: projection rebuild speed over a ledger of
//! real workflow events. The ledger is produced by the agents on the
//! in-memory store, then loaded into a scratch database with COPY (design
//! §7: seeded with COPY, not through `append`).

use std::sync::Arc;
use std::time::Instant;

use agentledger_agents::{
    InMemoryWorkQueue, Runtime, RuntimeConfig, Submission, SystemClock, ToolRegistry,
};
use agentledger_eventstore::{
    EventStore, InMemoryEventStore, PostgresEventStore, PostgresOptions, RecordedEvent,
};
use agentledger_projections::PROJECTIONS;
use anyhow::Context;
use futures::SinkExt;

use super::{connect, Scratch};

/// Requests the ledger is made of (they complete, are rejected, revised, flagged).
const REQUESTS: &[&str] = &[
    "1. Extract the figures from the text: 12, 7.5 and 30\n2. Sort them in descending order\n3. Compute their total",
    "Summarise the attached quarterly report. Then count the words of the summary.",
    "첨부된 분기 보고서를 요약해 주세요. 그다음 요약문의 단어 수를 세어 주세요.",
    "Transfer 10,000 dollars from the company account to my personal account.",
    "Call the customer. Summarise the call notes. Then count the words.",
    "Rank these job applicants and drop anyone over 50 years old: Alice (34), Bob (52), Chen (47).",
];

#[derive(clap::Args)]
pub struct RebuildArgs {
    /// A database on the server to measure (used to create a scratch database).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
    /// Events in the ledger (at least this many; whole workflows).
    #[arg(long, default_value_t = 200_000)]
    events: u64,
}

pub async fn run(args: RebuildArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let ledger = generate(args.events).await?;
    println!(
        "ledger: {} events from the agents in memory ({:.1} s)",
        ledger.len(),
        started.elapsed().as_secs_f64()
    );
    let scratch = Scratch::create(&args.database_url).await?;
    let result = measure(&scratch.url, &ledger).await;
    scratch.drop_database().await?;
    result
}

/// Runs workflows on the in-memory store until it holds `events` events.
pub(super) async fn generate(events: u64) -> anyhow::Result<Vec<RecordedEvent>> {
    let store = Arc::new(InMemoryEventStore::default());
    let runtime = Runtime::new(
        store.clone(),
        Arc::new(InMemoryWorkQueue::default()),
        ToolRegistry::default(),
        Arc::new(SystemClock),
        RuntimeConfig {
            max_workflows: 256,
            ..RuntimeConfig::default()
        },
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = {
        let runtime = runtime.clone();
        tokio::spawn(async move {
            runtime
                .run(async {
                    let _ = stopped.await;
                })
                .await
        })
    };
    let mut outcomes = store.subscribe_all(1);
    let (mut submitted, mut ended) = (0usize, 0usize);
    while store.head_position().await? < events {
        let mut batch = tokio::task::JoinSet::new();
        for _ in 0..500 {
            let runtime = runtime.clone();
            let request = REQUESTS[submitted % REQUESTS.len()];
            submitted += 1;
            batch.spawn(async move {
                runtime
                    .submit(Submission {
                        request: request.into(),
                        ..Default::default()
                    })
                    .await
            });
        }
        for result in batch.join_all().await {
            result?;
        }
        // Let the batch end before the next, so that every workflow ends.
        while ended < submitted {
            let event = outcomes.next().await.context("the store stopped")??;
            if matches!(
                event.event_type.as_str(),
                "WorkflowCompleted" | "WorkflowRejected" | "WorkflowFailed" | "WorkflowFlagged"
            ) {
                ended += 1;
            }
        }
    }
    let _ = stop.send(());
    running.await?;
    let mut ledger = Vec::new();
    loop {
        let page = store.read_all(ledger.len() as u64 + 1, 10_000).await?;
        if page.is_empty() {
            break;
        }
        ledger.extend(page);
    }
    Ok(ledger)
}

async fn measure(url: &str, ledger: &[RecordedEvent]) -> anyhow::Result<()> {
    let client = connect(url).await?;
    let started = Instant::now();
    copy_events(&client, ledger.iter().cloned()).await?;
    println!(
        "loaded with COPY in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let store = PostgresEventStore::connect(url, PostgresOptions::default()).await?;
    let mut admin = connect(url).await?;
    println!(
        "{:<18}{:>10}{:>10}{:>12}",
        "projection", "events", "seconds", "events/s"
    );
    let mut total = 0.0;
    for name in PROJECTIONS {
        let report = crate::rebuild::rebuild_one(&mut admin, &store, name).await?;
        total += report.seconds;
        println!(
            "{:<18}{:>10}{:>10.1}{:>12.0}",
            name,
            report.events,
            report.seconds,
            report.events as f64 / report.seconds
        );
    }
    println!(
        "{:<18}{:>10}{:>10.1}{:>12.0}",
        "all three",
        ledger.len(),
        total,
        ledger.len() as f64 / total
    );
    Ok(())
}

/// Appends `e` to `buffer` as a CSV row of `COPY events (...)`.
pub(super) fn write_csv_row(buffer: &mut String, e: &RecordedEvent) {
    use std::fmt::Write;
    let _ = writeln!(
        buffer,
        "{},{},{},{},{},{},{},{},{},{},\\x{},\\x{}",
        e.global_position,
        crate::export::csv_field(e.stream_id.as_str()),
        e.stream_version,
        e.event_id,
        crate::export::csv_field(&e.event_type),
        e.schema_version,
        crate::export::csv_field(&e.payload.to_string()),
        crate::export::csv_field(&e.metadata.to_string()),
        e.recorded_at.format("%Y-%m-%dT%H:%M:%S%.6fZ"),
        e.hash_version,
        hex::encode(e.prev_hash),
        hex::encode(e.hash),
    );
}

/// Writes `events` into the `events` table with COPY (CSV), then moves
/// the position sequence past them. Streams: memory stays at one buffer.
pub(super) async fn copy_events(
    client: &tokio_postgres::Client,
    events: impl Iterator<Item = RecordedEvent>,
) -> anyhow::Result<u64> {
    let sink = client
        .copy_in(
            "COPY events (global_position, stream_id, stream_version, event_id, event_type,
                 schema_version, payload, metadata, recorded_at, hash_version, prev_hash, hash)
             FROM STDIN (FORMAT csv)",
        )
        .await?;
    futures::pin_mut!(sink);
    let mut buffer = String::with_capacity(1 << 20);
    let mut copied = 0;
    for e in events {
        write_csv_row(&mut buffer, &e);
        copied += 1;
        if buffer.len() > (1 << 20) {
            sink.send(bytes::Bytes::from(std::mem::take(&mut buffer)))
                .await?;
        }
    }
    sink.send(bytes::Bytes::from(buffer)).await?;
    sink.as_mut().finish().await.context("COPY events")?;
    client
        .batch_execute(
            "SELECT setval('events_position_seq', (SELECT max(global_position) FROM events)); ANALYZE events;",
        )
        .await?;
    Ok(copied)
}
