//! The ledger's tree on PostgreSQL, checked with an implementation that
//! was not written here (`tlog_tiles`, a port of Go's `sumdb/tlog`): the
//! root the tiles give equals the tree head computed from the events, and
//! every inclusion and consistency proof we serve passes its checks.

use std::sync::Arc;
use std::time::Duration;

use agentledger_eventstore::digest::{leaf, ledger_root};
use agentledger_eventstore::postgres::PostgresTiles;
use agentledger_eventstore::testing::TestDatabase;
use agentledger_eventstore::tlog::{self, TileReader, TreeTiles};
use agentledger_eventstore::*;
use serde_json::json;

async fn filled(db: &TestDatabase, events: usize) -> PostgresEventStore {
    let store = db.store().await;
    for i in 0..events / 10 {
        let stream = StreamId::new(format!("workflow-{}", i % 13)).unwrap();
        let batch = (0..10)
            .map(|j| {
                NewEvent::new(
                    "Tested",
                    json!({ "i": i, "j": j, "text": "증명" }),
                    Metadata::new(Actor::system()),
                )
            })
            .collect();
        store
            .append(&stream, ExpectedVersion::Any, batch)
            .await
            .unwrap();
    }
    store
}

/// Waits until the stored tree covers `size` leaves (polled: the builder
/// announces nothing), at most 30 s.
async fn grown_to(tiles: &PostgresTiles, size: u64) {
    for _ in 0..3_000 {
        if tiles.tree_size().await.unwrap() >= size {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the tree never reached {size} leaves");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proofs_from_stored_tiles_pass_an_independent_verifier() {
    let db = TestDatabase::create().await;
    let store = filled(&db, 1_330).await;
    let head = store.head_position().await.unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    // Two builders on one database, as two nodes run them: one extends
    // the tree per batch, the other finds it extended and catches up.
    let tiles = PostgresTiles::new(store.pool().clone());
    for _ in 0..2 {
        tokio::spawn(tlog::maintain(
            Arc::new(store.clone()),
            Arc::new(PostgresTiles::new(store.pool().clone())),
            stop.clone(),
        ));
    }
    grown_to(&tiles, 1_330).await;
    let events = store.read_all(1, 2_000).await.unwrap();
    let (expected_root, count) = ledger_root(&store, head).await.unwrap();
    assert_eq!(count, 1_330);
    assert_eq!(tlog::tree_root(&tiles, count).await.unwrap(), expected_root);

    let hash = |h: [u8; 32]| tlog_tiles::Hash(h);
    for size in [1u64, 2, 255, 256, 257, 1_000, 1_330] {
        let root = tlog::tree_root(&tiles, size).await.unwrap();
        for index in [0, size / 2, size - 1] {
            let event = &events[index as usize];
            assert_eq!(
                tiles.leaf_index(event.global_position).await.unwrap(),
                Some(index)
            );
            let proof = tlog::inclusion_proof(&tiles, index, size).await.unwrap();
            let leaf_hash = leaf(event.global_position, &event.hash);
            tlog_tiles::check_record(
                &proof.iter().copied().map(hash).collect(),
                size,
                hash(root),
                index,
                hash(leaf_hash),
            )
            .unwrap_or_else(|e| panic!("leaf {index} of {size}: {e}"));
            // Another event's leaf does not pass with this proof.
            let other = leaf(event.global_position + 1, &event.hash);
            assert!(tlog_tiles::check_record(
                &proof.iter().copied().map(hash).collect(),
                size,
                hash(root),
                index,
                hash(other),
            )
            .is_err());
        }
        for from in [1u64, size / 3, size - 1] {
            if from == 0 || from >= size {
                continue;
            }
            let old = tlog::tree_root(&tiles, from).await.unwrap();
            let proof = tlog::consistency_proof(&tiles, from, size).await.unwrap();
            tlog_tiles::check_tree(
                &proof.iter().copied().map(hash).collect(),
                size,
                hash(root),
                from,
                hash(old),
            )
            .unwrap_or_else(|e| panic!("{from} → {size}: {e}"));
        }
    }
    // A tree size beyond what the tiles cover is refused, not guessed.
    assert!(matches!(
        tlog::tree_root(&tiles, count + 1).await,
        Err(StoreError::BadInput(_))
    ));

    // The builders go on with the ledger.
    let more = store
        .append(
            &StreamId::new("workflow-late").unwrap(),
            ExpectedVersion::NoStream,
            vec![NewEvent::new(
                "Tested",
                json!({}),
                Metadata::new(Actor::system()),
            )],
        )
        .await
        .unwrap();
    grown_to(&tiles, 1_331).await;
    let (root, _) = ledger_root(&store, more.last_position).await.unwrap();
    assert_eq!(tlog::tree_root(&tiles, 1_331).await.unwrap(), root);
    stop.cancel();
}

/// Our signed checkpoint is a C2SP checkpoint to `signed_note` and
/// `tlog_tiles`: the signature verifies under our verifier key, the body
/// parses, and a changed size or another key is refused.
#[test]
fn a_checkpoint_verifies_with_an_independent_note_verifier() {
    use agentledger_eventstore::checkpoint::{signed_checkpoint, verifier_key};
    use signed_note::{Note, StandardVerifier, VerifierList};
    let key = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]);
    let origin = "ledger.example.com/agentledger";
    let root = [42u8; 32];
    let note = signed_checkpoint(origin, 1_330, &root, &key);
    let vkey = verifier_key(origin, &key.verifying_key());
    // The same verifier key the independent crate derives from the key.
    assert_eq!(
        vkey,
        signed_note::new_ed25519_verifier_key(origin, &key.verifying_key())
    );
    let verifiers = VerifierList::new(vec![Box::new(StandardVerifier::new(&vkey).unwrap())]);
    let parsed = Note::from_bytes(note.as_bytes()).unwrap();
    let (verified, _) = parsed.verify(&verifiers).unwrap();
    assert_eq!(verified.len(), 1);
    let checkpoint = tlog_tiles::Checkpoint::from_bytes(parsed.text()).unwrap();
    assert_eq!(checkpoint.origin(), origin);
    assert_eq!(checkpoint.size(), 1_330);
    assert_eq!(checkpoint.hash().0, root);

    let forged = note.replacen("\n1330\n", "\n1331\n", 1);
    assert!(Note::from_bytes(forged.as_bytes())
        .unwrap()
        .verify(&verifiers)
        .is_err());
    let other = ed25519_dalek::SigningKey::from_bytes(&[8u8; 32]);
    let stranger = signed_checkpoint(origin, 1_330, &root, &other);
    assert!(Note::from_bytes(stranger.as_bytes())
        .unwrap()
        .verify(&verifiers)
        .is_err());
}
