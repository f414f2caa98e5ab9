//! `agentledger prove`: an inclusion proof of one event, or a consistency
//! proof between two tree sizes, from the ledger's stored tree (RFC 9162,
//! hashes hex), as JSON. With `--digest`, the proof is for that signed
//! digest's tree and is checked against its root before it is printed.

use agentledger_eventstore::digest::leaf;
use agentledger_eventstore::postgres::PostgresTiles;
use agentledger_eventstore::signing::SignedDigest;
use agentledger_eventstore::tlog::{self, TileReader, TreeTiles};
use agentledger_eventstore::{EventStore, PostgresEventStore, PostgresOptions};
use anyhow::{bail, Context};
use serde_json::json;

use crate::DatabaseArgs;

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["position", "from_size"])))]
pub struct ProveArgs {
    /// The event to prove included.
    #[arg(long, conflicts_with_all = ["from_size", "to_size"])]
    position: Option<u64>,
    /// With --position: the tree size to prove it in (default: the whole
    /// tree now).
    #[arg(long, requires = "position", conflicts_with = "digest")]
    tree_size: Option<u64>,
    /// With --position: prove it in the tree of this signed digest (a file
    /// written by `agentledger digest`), and check the proof against the
    /// digest's root.
    #[arg(long, requires = "position")]
    digest: Option<std::path::PathBuf>,
    /// The smaller tree size of a consistency proof.
    #[arg(long, requires = "to_size")]
    from_size: Option<u64>,
    /// The larger tree size of a consistency proof.
    #[arg(long, requires = "from_size")]
    to_size: Option<u64>,
    #[command(flatten)]
    database: DatabaseArgs,
}

pub async fn run(args: ProveArgs) -> anyhow::Result<()> {
    let url = args
        .database
        .database_url
        .as_deref()
        .context("DATABASE_URL is not set")?;
    let store = PostgresEventStore::connect(url, PostgresOptions::default()).await?;
    let tiles = PostgresTiles::new(store.pool().clone());
    let hex_all = |hashes: &[tlog::Hash]| hashes.iter().map(hex::encode).collect::<Vec<_>>();
    if let (Some(from), Some(to)) = (args.from_size, args.to_size) {
        let hashes = tlog::consistency_proof(&tiles, from, to).await?;
        let from_root = tlog::tree_root(&tiles, from).await?;
        let to_root = tlog::tree_root(&tiles, to).await?;
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "from_size": from,
                "to_size": to,
                "from_root": hex::encode(from_root),
                "to_root": hex::encode(to_root),
                "hashes": hex_all(&hashes),
            }))?
        );
        return Ok(());
    }
    let position = args.position.expect("clap requires one of the two");
    let digest = match &args.digest {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            Some(
                serde_json::from_str::<SignedDigest>(&text).with_context(|| {
                    format!(
                        "{} is not a digest written by `agentledger digest`",
                        path.display()
                    )
                })?,
            )
        }
        None => None,
    };
    if let Some(d) = &digest {
        d.check_signature()
            .map_err(|e| anyhow::anyhow!("the digest does not check: {e}"))?;
        match tiles.size_at(d.position).await? {
            Some(events) if events == d.events => {}
            Some(events) => bail!(
                "the digest covers {} events up to position {}, the ledger's tree {events}: \
                 events were added or removed below that position",
                d.events,
                d.position
            ),
            None => bail!(
                "the ledger's tree does not reach the digest's position {} yet; try again",
                d.position
            ),
        }
    }
    let size = match (&digest, args.tree_size) {
        (Some(d), _) => d.events,
        (None, Some(size)) => size,
        (None, None) => tiles.tree_size().await?,
    };
    let index = tiles.leaf_index(position).await?.with_context(|| {
        format!("the ledger's tree has no event at position {position} (none took it, or the tree does not reach it yet)")
    })?;
    let event = store
        .read_all(position, 1)
        .await?
        .into_iter()
        .find(|e| e.global_position == position)
        .with_context(|| format!("no event at position {position}"))?;
    let leaf_hash = leaf(position, &event.hash);
    let hashes = tlog::inclusion_proof(&tiles, index, size).await?;
    let root = tlog::tree_root(&tiles, size).await?;
    if let Some(d) = &digest {
        if hex::encode(root) != d.root {
            bail!(
                "the stored tree of {size} leaves has root {}, the digest says {}: the ledger or \
                 its tree changed since the digest (run `agentledger verify --digest`)",
                hex::encode(root),
                d.root
            );
        }
        if !tlog::verify_inclusion(index, size, &leaf_hash, &hashes, &root) {
            bail!("the proof does not lead to the digest's root");
        }
    }
    println!(
        "{}",
        serde_json::to_string_pretty(&json!({
            "position": position,
            "stream_id": event.stream_id.as_str(),
            "event_type": event.event_type,
            "event_hash": hex::encode(event.hash),
            "leaf_index": index,
            "tree_size": size,
            "leaf_hash": hex::encode(leaf_hash),
            "root": hex::encode(root),
            "hashes": hex_all(&hashes),
        }))?
    );
    if let Some(d) = &digest {
        eprintln!(
            "checked: the digest's signature (key {1}, its own: compare it with the key you keep), \
             and position {position} is leaf {index} of its tree ({size} events up to position {0})",
            d.position, d.key_id
        );
    }
    Ok(())
}
