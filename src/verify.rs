//! `agentledger verify`: recomputes hash chains from what is stored and
//! names the first event that does not match. Exits non-zero when broken.

use agentledger_eventstore::signing::{self, PostgresLedgerKeys, SignedDigest};
use agentledger_eventstore::{EventStore, PostgresEventStore, PostgresOptions, Verification};
use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use uuid::Uuid;

use crate::DatabaseArgs;

#[derive(clap::Args)]
pub struct VerifyArgs {
    /// Verify one workflow's stream instead of the whole ledger.
    #[arg(long, conflicts_with = "export")]
    workflow: Option<Uuid>,
    /// Verify an exported JSONL file, without the database.
    #[arg(long, conflicts_with = "digest")]
    export: Option<std::path::PathBuf>,
    /// Verify a receipt (`agentledger receipt`), without the database:
    /// every event's hash and chain, every inclusion proof, and the
    /// checkpoint's signature.
    #[arg(long, conflicts_with_all = ["digest", "export", "workflow"])]
    receipt: Option<std::path::PathBuf>,
    /// Verify an archive segment (`agentledger retain`), without the
    /// database: every workflow's receipt, every archived audit row against
    /// its receipt's events, and the segment's closing counts.
    #[arg(long, conflicts_with_all = ["digest", "export", "workflow", "receipt"])]
    archive: Option<std::path::PathBuf>,
    /// Prove that the ledger up to a signed digest's position is unchanged
    /// (a file written by `agentledger digest`).
    #[arg(long, conflicts_with = "workflow")]
    digest: Option<std::path::PathBuf>,
    /// With --digest: the public key (hex) kept apart from the system; without
    /// it the digest's key must be one this deployment's database lists.
    /// With --receipt or --archive (required there): the deployment's note
    /// verifier key (`ledgerKeys`, `/.well-known/agentledger-key`), kept
    /// apart from the file.
    #[arg(long)]
    public_key: Option<String>,
    #[command(flatten)]
    database: DatabaseArgs,
}

pub async fn run(args: VerifyArgs) -> anyhow::Result<()> {
    if let Some(path) = &args.receipt {
        return check_receipt(path, args.public_key.as_deref());
    }
    if let Some(path) = &args.archive {
        return check_archive(path, args.public_key.as_deref());
    }
    if args.public_key.is_some() && args.digest.is_none() {
        bail!("--public-key goes with --digest, --receipt or --archive");
    }
    if let Some(path) = &args.export {
        let verification = crate::export::verify_file(path)?;
        return report(&path.display().to_string(), &verification);
    }
    let url = args
        .database
        .database_url
        .as_deref()
        .context("DATABASE_URL is not set")?;
    let store = PostgresEventStore::connect(url, PostgresOptions::default()).await?;
    if let Some(path) = &args.digest {
        return check_digest(&store, path, args.public_key.as_deref()).await;
    }
    let (what, verification) = match args.workflow {
        Some(id) => {
            let verification = store
                .verify_stream(&agentledger_agents::stream_of(id))
                .await?;
            if verification.checked_events == 0 {
                bail!("no workflow {id} in the ledger");
            }
            (format!("workflow {id}"), verification)
        }
        None => {
            let bar = progress_bar();
            let verification = agentledger_eventstore::verify_ledger(&store, |position, head| {
                bar.set_length(head);
                bar.set_position(position);
            })
            .await?;
            bar.finish_and_clear();
            report("the ledger", &verification)?;
            return check_tree(&store).await;
        }
    };
    report(&what, &verification)
}

/// The stored tree (what proofs and checkpoints are served from) against
/// the events: every tile is rebuilt from the events and compared (a
/// growing tile may have grown since), and the positions recorded as
/// holes must be exactly those no event took.
async fn check_tree(store: &PostgresEventStore) -> anyhow::Result<()> {
    use agentledger_eventstore::postgres::PostgresTiles;
    use agentledger_eventstore::tlog::{TileReader, TreeBuilder};
    let client = store.pool().get().await?;
    let row = client
        .query_one("SELECT size, position FROM ledger_tree", &[])
        .await?;
    let (size, position) = (row.get::<_, i64>(0) as u64, row.get::<_, i64>(1) as u64);
    let stored_holes: Vec<u64> = client
        .query(
            "SELECT position FROM ledger_tree_holes WHERE position <= $1 ORDER BY 1",
            &[&(position as i64)],
        )
        .await?
        .iter()
        .map(|r| r.get::<_, i64>(0) as u64)
        .collect();
    drop(client);
    if size == 0 {
        println!("the ledger's tree: not built yet (a running `serve` builds it from the events)");
        return Ok(());
    }
    let tiles = PostgresTiles::new(store.pool().clone());
    let mut builder = TreeBuilder::new();
    let mut holes = Vec::new();
    let mut from = 1;
    let broken = |what: String| {
        anyhow::anyhow!(
            "the ledger's tree: BROKEN: {what}; proofs and checkpoints from it are wrong (the \
             events are what counts: the tree must be rebuilt)"
        )
    };
    while from <= position {
        let page = store.read_range(from, position, 10_000).await?;
        let Some(last) = page.last() else { break };
        from = last.global_position + 1;
        for event in &page {
            builder.push(event.global_position, &event.hash);
        }
        let (changed, found) = builder.take_changes();
        holes.extend(found);
        let wanted: Vec<_> = changed.keys().copied().collect();
        let stored = tiles.read_tiles(&wanted).await?;
        for (tile, ours) in &changed {
            let matches = stored.get(tile).is_some_and(|theirs| {
                theirs.len() >= ours.len() && theirs[..ours.len()] == ours[..]
            });
            if !matches {
                return Err(broken(format!(
                    "tile {}/{} does not match the events",
                    tile.level, tile.index
                )));
            }
        }
    }
    if builder.size() != size || builder.position() != position {
        return Err(broken(format!(
            "it says {size} leaves up to position {position}; the events give {} up to {}",
            builder.size(),
            builder.position()
        )));
    }
    if holes != stored_holes {
        return Err(broken(format!(
            "its record of positions no event took ({} of them) differs from the events' ({})",
            stored_holes.len(),
            holes.len()
        )));
    }
    println!("the ledger's tree: ok, every tile of its {size} leaves up to position {position} matches the events");
    Ok(())
}

fn progress_bar() -> ProgressBar {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "verifying [{bar:30}] {pos}/{len} positions, {per_sec}, ETA {eta}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    bar
}

async fn check_digest(
    store: &PostgresEventStore,
    path: &std::path::Path,
    trusted: Option<&str>,
) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let digest: SignedDigest = serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is not a digest written by `agentledger digest`",
            path.display()
        )
    })?;
    let keys = PostgresLedgerKeys::new(store.pool().clone());
    let bar = progress_bar();
    let outcome = signing::check_digest(store, &keys, &digest, trusted, |position, up_to| {
        bar.set_length(up_to);
        bar.set_position(position);
    })
    .await?;
    bar.finish_and_clear();
    match outcome {
        Ok(()) => {
            println!(
                "digest {}: ok, the {} events up to position {} are unchanged since {} (key {}{})",
                path.display(),
                digest.events,
                digest.position,
                digest
                    .signed_at
                    .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                digest.key_id,
                if trusted.is_some() {
                    ", the trusted key given"
                } else {
                    ", listed by this deployment"
                }
            );
            Ok(())
        }
        Err(e) => bail!("digest {}: FAILED: {e}", path.display()),
    }
}

fn check_receipt(path: &std::path::Path, trusted: Option<&str>) -> anyhow::Result<()> {
    use agentledger_eventstore::receipt::{self, Receipt};
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let receipt: Receipt = serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is not a receipt written by `agentledger receipt`",
            path.display()
        )
    })?;
    let Some(trusted) = trusted else {
        bail!(
            "give --public-key: the deployment's verifier key, kept apart (ledgerKeys, \
             /.well-known/agentledger-key). The key inside the receipt ({}) proves nothing \
             alone: whoever forged the file would have put theirs there",
            receipt.verifier_key
        );
    };
    match receipt::verify(&receipt, Some(trusted)) {
        Ok(checked) => {
            println!(
                "receipt {}: ok, versions 0 to {} of {} ({} events) are in the tree of {} leaves \
                 that {} signed with the key given; events recorded after it was written are not \
                 covered",
                path.display(),
                checked.last_version,
                receipt.stream_id,
                checked.events,
                checked.tree_size,
                checked.origin,
            );
            Ok(())
        }
        Err(e) => bail!("receipt {}: FAILED: {e}", path.display()),
    }
}

fn check_archive(path: &std::path::Path, trusted: Option<&str>) -> anyhow::Result<()> {
    let Some(trusted) = trusted else {
        bail!(
            "give --public-key: the deployment's verifier key, kept apart (ledgerKeys, \
             /.well-known/agentledger-key)"
        );
    };
    match crate::retention::verify_segment(path, trusted) {
        Ok(checked) => {
            println!(
                "archive {}: ok, {} segment: {} workflows ({} events proved, {} audit rows \
                 matched to them), {} agent-metric rows; sha256 {} (compare it with \
                 retention_segments)",
                path.display(),
                checked.contents,
                checked.workflows,
                checked.events,
                checked.audit_rows,
                checked.metric_rows,
                checked.sha256,
            );
            Ok(())
        }
        Err(e) => bail!("archive {}: FAILED: {e}", path.display()),
    }
}

fn report(what: &str, v: &Verification) -> anyhow::Result<()> {
    if v.ok {
        println!("{what}: ok, {} events checked", v.checked_events);
        return Ok(());
    }
    bail!(
        "{what}: BROKEN at position {} ({}); {} events checked",
        v.first_broken_position.unwrap_or_default(),
        v.reason.as_deref().unwrap_or("no reason given"),
        v.checked_events
    )
}
