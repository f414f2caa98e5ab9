//! `agentledger bench proofs`: what the ledger's tree costs and what its
//! proofs cost to serve, over a ledger of real workflow events replicated
//! to a million (loaded with COPY, as `bench verify` does). In one run: the
//! tree built from nothing by the same builder `serve` runs (`tlog::maintain`,
//! batches of 1,000 leaves per transaction) beside a plain read of the same
//! events (the baseline), the tiles' size on disk, then inclusion proofs of
//! random events, consistency proofs between random sizes, and signed
//! checkpoints: time per proof (p50, p99) and proof size.

use std::sync::Arc;
use std::time::{Duration, Instant};

use agentledger_eventstore::postgres::PostgresTiles;
use agentledger_eventstore::tlog::{self, TileReader};
use agentledger_eventstore::{EventStore, PostgresEventStore, PostgresOptions};

use super::{connect, Scratch};

#[derive(clap::Args)]
pub struct ProofsArgs {
    /// A database on the server to measure (used to create a scratch database).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
    /// Events in the ledger.
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    /// Events of real workflows the ledger is replicated from.
    #[arg(long, default_value_t = 20_000)]
    template: u64,
    /// Proofs of each kind to time.
    #[arg(long, default_value_t = 1_000)]
    proofs: usize,
}

pub async fn run(args: ProofsArgs) -> anyhow::Result<()> {
    let template = super::rebuild::generate(args.template).await?;
    let scratch = Scratch::create(&args.database_url).await?;
    let result = measure(&scratch.url, &template, &args).await;
    scratch.drop_database().await?;
    result
}

/// A small, seeded generator: the same proofs in every run.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n.max(1)
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

async fn measure(
    url: &str,
    template: &[agentledger_eventstore::RecordedEvent],
    args: &ProofsArgs,
) -> anyhow::Result<()> {
    let client = connect(url).await?;
    let started = Instant::now();
    let loaded =
        super::rebuild::copy_events(&client, super::verify::replicas(template, args.events))
            .await?;
    println!(
        "ledger: {loaded} events loaded with COPY in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let store = PostgresEventStore::connect(url, PostgresOptions::default()).await?;
    let head = store.head_position().await?;

    // The baseline: reading every event once, page after page.
    let started = Instant::now();
    let mut from = 1;
    while from <= head {
        let page = store.read_range(from, head, 10_000).await?;
        let Some(last) = page.last() else { break };
        from = last.global_position + 1;
    }
    let read = started.elapsed().as_secs_f64();

    // The tree from nothing, as serve builds it.
    let tiles = PostgresTiles::new(store.pool().clone());
    let stop = tokio_util::sync::CancellationToken::new();
    let started = Instant::now();
    let builder = tokio::spawn(tlog::maintain(
        Arc::new(store.clone()),
        Arc::new(tiles.clone()),
        stop.clone(),
    ));
    while tiles.tree_size().await? < loaded {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let built = started.elapsed().as_secs_f64();
    stop.cancel();
    builder.await?;
    let bytes: i64 = client
        .query_one("SELECT pg_total_relation_size('ledger_tiles')", &[])
        .await?
        .get(0);
    println!(
        "read every event (baseline): {read:.1} s, {:.0} events/s",
        loaded as f64 / read
    );
    println!(
        "build the tree: {built:.1} s, {:.0} leaves/s ({:.2} × the read); tiles {:.1} MiB ({:.1} bytes per event)",
        loaded as f64 / built,
        built / read,
        bytes as f64 / (1 << 20) as f64,
        bytes as f64 / loaded as f64
    );

    let mut rng = Lcg(0x5eed);
    let root = tlog::tree_root(&tiles, loaded).await?;
    let mut times = Vec::with_capacity(args.proofs);
    let mut hashes = 0usize;
    for _ in 0..args.proofs {
        let index = rng.below(loaded);
        let started = Instant::now();
        let proof = tlog::inclusion_proof(&tiles, index, loaded).await?;
        times.push(started.elapsed());
        hashes = hashes.max(proof.len());
        let event = &store.read_all(index + 1, 1).await?[0];
        anyhow::ensure!(tlog::verify_inclusion(
            index,
            loaded,
            &agentledger_eventstore::digest::leaf(event.global_position, &event.hash),
            &proof,
            &root
        ));
    }
    times.sort();
    println!(
        "inclusion proof in a tree of {loaded}: p50 {:.2} ms, p99 {:.2} ms; {hashes} hashes ({} bytes)",
        percentile(&times, 0.5),
        percentile(&times, 0.99),
        hashes * 32
    );

    let mut times = Vec::with_capacity(args.proofs);
    let mut hashes = 0usize;
    for _ in 0..args.proofs {
        let from = 1 + rng.below(loaded - 1);
        let started = Instant::now();
        let proof = tlog::consistency_proof(&tiles, from, loaded).await?;
        times.push(started.elapsed());
        hashes = hashes.max(proof.len());
    }
    times.sort();
    println!(
        "consistency proof to {loaded}: p50 {:.2} ms, p99 {:.2} ms; at most {hashes} hashes ({} bytes)",
        percentile(&times, 0.5),
        percentile(&times, 0.99),
        hashes * 32
    );

    let key = ed25519_dalek_key();
    let mut times = Vec::with_capacity(200);
    for _ in 0..200 {
        let started = Instant::now();
        let size = tiles.tree_size().await?;
        let root = tlog::tree_root(&tiles, size).await?;
        let _ = agentledger_eventstore::checkpoint::signed_checkpoint(
            "bench/ledger",
            size,
            &root,
            &key,
        );
        times.push(started.elapsed());
    }
    times.sort();
    println!(
        "signed checkpoint of the whole tree: p50 {:.2} ms, p99 {:.2} ms",
        percentile(&times, 0.5),
        percentile(&times, 0.99)
    );
    Ok(())
}

fn ed25519_dalek_key() -> agentledger_eventstore::signing::SigningKey {
    agentledger_eventstore::signing::SigningKey::from_bytes(&[1u8; 32])
}
