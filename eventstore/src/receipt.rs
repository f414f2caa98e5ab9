//! Receipts: one file with a stream's events, each with its inclusion proof
//! in the ledger's tree, and a checkpoint of that tree signed by the
//! deployment's key. Anyone holding the file and the deployment's verifier
//! key checks it with no database: every event's hash from its content, the
//! stream's chain from its first event, every event's proof up to the
//! checkpoint's root, and the checkpoint's signature.

use serde::{Deserialize, Serialize};

use crate::chain::ChainVerifier;
use crate::checkpoint::{signed_checkpoint, verifier_key, verify_checkpoint};
use crate::digest::leaf;
use crate::signing::LedgerKeys;
use crate::tlog::{self, TreeTiles};
use crate::{EventStore, RecordedEvent, StoreError, StreamId};

/// How long a receipt waits for the tree to reach the stream's last event.
const TREE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Most events one receipt holds.
pub const MAX_EVENTS: usize = 10_000;

/// The `format` of a receipt this build writes and reads.
pub const RECEIPT_FORMAT: &str = "agentledger-receipt-1";

/// A receipt.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Receipt {
    pub format: String,
    pub stream_id: String,
    /// The signed checkpoint (C2SP note) every proof leads to.
    pub checkpoint: String,
    /// The key that signed it, as a note verifier key. Check it against
    /// one kept apart (`--public-key`): a forger would replace it.
    pub verifier_key: String,
    pub events: Vec<ReceiptEvent>,
}

/// One event of a receipt with its proof.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReceiptEvent {
    pub event: RecordedEvent,
    pub leaf_index: u64,
    /// RFC 9162 audit path, leaf side first, hex.
    pub inclusion_proof: Vec<String>,
}

/// What a checked receipt covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiptCheck {
    pub events: usize,
    /// The stream's versions covered: 0 to this one. Events recorded after
    /// the receipt was written are not in it.
    pub last_version: u64,
    pub tree_size: u64,
    pub origin: String,
}

/// The receipt of `stream`: its events, their proofs in the tree as far
/// as it reaches now, and a checkpoint of that tree signed now under
/// `origin`. The tree follows the ledger a moment behind: it waits up to
/// two seconds for it to reach the stream's last event, then refuses
/// (unavailable: try again).
pub async fn build(
    store: &dyn EventStore,
    tree: &dyn TreeTiles,
    keys: &dyn LedgerKeys,
    origin: &str,
    stream: &StreamId,
) -> Result<Receipt, StoreError> {
    let mut events = Vec::new();
    loop {
        let page = store
            .read_stream(stream, events.len() as u64, 1_000)
            .await?;
        let full = page.len() == 1_000;
        events.extend(page);
        if events.len() > MAX_EVENTS {
            return Err(StoreError::BadInput(format!(
                "{stream} has more than {MAX_EVENTS} events: too many for one receipt"
            )));
        }
        if !full {
            break;
        }
    }
    let Some(last) = events.last() else {
        return Err(StoreError::BadInput(format!("no stream {stream}")));
    };
    // The tree follows the ledger within moments (`tlog::SAVE_PAUSE`):
    // wait that long rather than refuse a workflow that just finished.
    let waited = std::time::Instant::now();
    while tree.leaf_index(last.global_position).await?.is_none() {
        if waited.elapsed() > TREE_WAIT {
            return Err(StoreError::Unavailable(format!(
                "the ledger's tree does not reach position {} yet; try again in a moment",
                last.global_position
            )));
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let mut indexes = Vec::with_capacity(events.len());
    for event in &events {
        indexes.push(
            tree.leaf_index(event.global_position)
                .await?
                .ok_or_else(|| StoreError::Corrupt {
                    position: event.global_position,
                    reason: "an event the tree covers has no leaf".into(),
                })?,
        );
    }
    // Read after the leaves: the tree only grows, so it covers them all.
    let size = tree.tree_size().await?;
    let root = tlog::tree_root(tree, size).await?;
    let (_, key) = keys.active().await?;
    let mut proved = Vec::with_capacity(events.len());
    for (event, index) in events.into_iter().zip(indexes) {
        let proof = tlog::inclusion_proof(tree, index, size).await?;
        proved.push(ReceiptEvent {
            event,
            leaf_index: index,
            inclusion_proof: proof.iter().map(hex::encode).collect(),
        });
    }
    Ok(Receipt {
        format: RECEIPT_FORMAT.to_string(),
        stream_id: stream.to_string(),
        checkpoint: signed_checkpoint(origin, size, &root, &key),
        verifier_key: verifier_key(origin, &key.verifying_key()),
        events: proved,
    })
}

/// Checks `receipt` with nothing but itself and, when given, the verifier
/// key kept apart (`trusted`); else against the key inside it.
pub fn verify(receipt: &Receipt, trusted: Option<&str>) -> Result<ReceiptCheck, String> {
    if receipt.format != RECEIPT_FORMAT {
        return Err(format!(
            "format {:?}; this build reads {RECEIPT_FORMAT}",
            receipt.format
        ));
    }
    let vkey = trusted.unwrap_or(&receipt.verifier_key);
    let checkpoint = verify_checkpoint(&receipt.checkpoint, vkey)?;
    if receipt.events.is_empty() {
        return Err("the receipt holds no event".into());
    }
    let mut chain = ChainVerifier::new();
    for proved in &receipt.events {
        let event = &proved.event;
        if event.stream_id.as_str() != receipt.stream_id {
            return Err(format!(
                "the event at position {} is of stream {}, not {}",
                event.global_position, event.stream_id, receipt.stream_id
            ));
        }
        chain.check(event);
        let proof: Vec<tlog::Hash> = proved
            .inclusion_proof
            .iter()
            .map(|h| hex::decode(h).ok().and_then(|b| b.try_into().ok()))
            .collect::<Option<_>>()
            .ok_or_else(|| {
                format!(
                    "position {}: a proof hash is not 32 bytes of hex",
                    event.global_position
                )
            })?;
        if !tlog::verify_inclusion(
            proved.leaf_index,
            checkpoint.size,
            &leaf(event.global_position, &event.hash),
            &proof,
            &checkpoint.root,
        ) {
            return Err(format!(
                "the event at position {} is not in the checkpoint's tree: its proof fails",
                event.global_position
            ));
        }
    }
    let verification = chain.finish();
    if !verification.ok {
        return Err(format!(
            "the stream's chain breaks at position {}: {}",
            verification.first_broken_position.unwrap_or_default(),
            verification.reason.unwrap_or_default()
        ));
    }
    Ok(ReceiptCheck {
        events: receipt.events.len(),
        last_version: receipt.events.last().map_or(0, |p| p.event.stream_version),
        tree_size: checkpoint.size,
        origin: checkpoint.origin,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signing::InMemoryLedgerKeys;
    use crate::tlog::{MemoryTiles, TreeBuilder};
    use crate::{Actor, ExpectedVersion, InMemoryEventStore, Metadata, NewEvent};
    use serde_json::json;

    #[tokio::test]
    async fn a_receipt_checks_alone_and_any_change_to_it_fails() {
        let store = InMemoryEventStore::default();
        let mine = StreamId::new("workflow-mine").unwrap();
        for i in 0..40 {
            let stream = if i % 3 == 0 {
                mine.clone()
            } else {
                StreamId::new(format!("workflow-{i}")).unwrap()
            };
            store
                .append(
                    &stream,
                    ExpectedVersion::Any,
                    vec![NewEvent::new(
                        "Tested",
                        json!({"i": i, "text": "영수증"}),
                        Metadata::new(Actor::system()),
                    )],
                )
                .await
                .unwrap();
        }
        let tiles = MemoryTiles::default();
        let mut builder = TreeBuilder::new();
        for e in store.read_all(1, 100).await.unwrap() {
            builder.push(e.global_position, &e.hash);
        }
        tiles.apply(&mut builder);
        let keys = InMemoryLedgerKeys::default();
        let receipt = build(&store, &tiles, &keys, "example.com/ledger", &mine)
            .await
            .unwrap();
        let (_, key) = keys.active().await.unwrap();
        let trusted = verifier_key("example.com/ledger", &key.verifying_key());
        let checked = verify(&receipt, Some(&trusted)).unwrap();
        assert_eq!((checked.events, checked.tree_size), (14, 40));

        let mut changed = receipt.clone();
        changed.events[3].event.payload["text"] = json!("바뀐 영수증");
        assert!(verify(&changed, Some(&trusted))
            .unwrap_err()
            .contains("chain breaks"));
        let mut dropped = receipt.clone();
        dropped.events.remove(2);
        assert!(verify(&dropped, Some(&trusted)).is_err());
        let mut moved = receipt.clone();
        moved.events[1].leaf_index += 1;
        assert!(verify(&moved, Some(&trusted))
            .unwrap_err()
            .contains("proof fails"));
        let stranger = crate::checkpoint::verifier_key(
            "example.com/ledger",
            &ed25519_dalek::SigningKey::from_bytes(&[9u8; 32]).verifying_key(),
        );
        assert!(verify(&receipt, Some(&stranger)).is_err());
        // Re-signed by a forger with their own key inside: only the key
        // kept apart catches it.
        let forger = ed25519_dalek::SigningKey::from_bytes(&[9u8; 32]);
        let mut forged = changed.clone();
        forged.verifier_key = stranger.clone();
        forged.checkpoint = signed_checkpoint("example.com/ledger", 40, &[0u8; 32], &forger);
        assert!(verify(&forged, Some(&trusted)).is_err());
    }
}
