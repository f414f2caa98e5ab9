//! The ledger's Merkle tree head (design §8, RFC 6962 hashing): over every
//! event up to a position, in position order, a leaf is
//! `SHA-256(0x00 ‖ position as 8 big-endian bytes ‖ event hash)` and a node
//! `SHA-256(0x01 ‖ left ‖ right)`; the tree splits at the largest power of
//! two below its size. It binds positions (which the per-stream chains do
//! not) and notices a removed last event of a stream. Computed in one pass
//! with memory for log₂(n) subtree roots.

use sha2::{Digest, Sha256};

use crate::{EventStore, LedgerVerifier, Position, StoreError, Verification};

/// Builds the tree head incrementally from leaves in position order.
#[derive(Debug, Default, Clone)]
pub struct MerkleBuilder {
    /// Roots of perfect subtrees, largest first, with their sizes.
    stack: Vec<(u64, [u8; 32])>,
    leaves: u64,
}

fn node(left: &[u8; 32], right: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// The leaf hash of the event at `position` with chain hash `hash`.
pub fn leaf(position: Position, hash: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(position.to_be_bytes());
    h.update(hash);
    h.finalize().into()
}

impl MerkleBuilder {
    /// An empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the next event (positions must increase).
    pub fn push(&mut self, position: Position, hash: &[u8; 32]) {
        let mut entry = (1u64, leaf(position, hash));
        while let Some((size, top)) = self.stack.last() {
            if *size != entry.0 {
                break;
            }
            entry = (size * 2, node(top, &entry.1));
            self.stack.pop();
        }
        self.stack.push(entry);
        self.leaves += 1;
    }

    /// Leaves so far.
    pub fn len(&self) -> u64 {
        self.leaves
    }

    /// True before the first leaf.
    pub fn is_empty(&self) -> bool {
        self.leaves == 0
    }

    /// The tree head: SHA-256 of nothing for an empty tree.
    pub fn root(&self) -> [u8; 32] {
        let mut subtrees = self.stack.iter().rev();
        let Some((_, last)) = subtrees.next() else {
            return Sha256::digest([]).into();
        };
        subtrees.fold(*last, |acc, (_, left)| node(left, &acc))
    }
}

/// The tree head over every event with position ≤ `up_to`, reading the
/// ledger in pages; and how many events it covers.
pub async fn ledger_root(
    store: &dyn EventStore,
    up_to: Position,
) -> Result<([u8; 32], u64), StoreError> {
    let check = check_ledger(store, up_to, |_, _| {}).await?;
    Ok((check.root, check.events))
}

/// What one pass over the ledger up to a position found.
#[derive(Debug, Clone)]
pub struct LedgerCheck {
    /// Every chain recomputed from stored content.
    pub verification: Verification,
    /// The tree head over the stored hashes.
    pub root: [u8; 32],
    /// Events covered.
    pub events: u64,
}

/// In one pass over events with position ≤ `up_to`: recomputes every
/// stream's chain from content and builds the tree head. Memory: one entry
/// per stream plus log₂(n) subtree roots. `progress` gets (position, up_to)
/// after each page.
pub async fn check_ledger(
    store: &dyn EventStore,
    up_to: Position,
    progress: impl FnMut(Position, Position),
) -> Result<LedgerCheck, StoreError> {
    let (chains, tree) = crate::scan(
        store,
        up_to,
        (LedgerVerifier::new(), MerkleBuilder::new()),
        |(chains, tree), event| {
            chains.check_canonical(event);
            tree.push(event.global_position, &event.hash);
        },
        progress,
    )
    .await?;
    Ok(LedgerCheck {
        verification: chains.finish(),
        root: tree.root(),
        events: tree.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 6962's recursive definition, for comparison.
    fn reference(leaves: &[[u8; 32]]) -> [u8; 32] {
        match leaves.len() {
            0 => Sha256::digest([]).into(),
            1 => leaves[0],
            n => {
                let k = 1usize << (usize::BITS - 1 - (n - 1).leading_zeros());
                node(&reference(&leaves[..k]), &reference(&leaves[k..]))
            }
        }
    }

    #[test]
    fn the_incremental_head_equals_the_recursive_definition() {
        for n in 0..130u64 {
            let mut tree = MerkleBuilder::new();
            let mut leaves = Vec::new();
            for p in 1..=n {
                // Positions with holes, as the ledger has.
                let position = p * 3;
                let hash = [p as u8; 32];
                tree.push(position, &hash);
                leaves.push(leaf(position, &hash));
            }
            assert_eq!(tree.root(), reference(&leaves), "{n} leaves");
            assert_eq!(tree.len(), n);
        }
    }

    #[test]
    fn positions_and_hashes_are_both_bound() {
        let root = |items: &[(u64, u8)]| {
            let mut tree = MerkleBuilder::new();
            items.iter().for_each(|(p, h)| tree.push(*p, &[*h; 32]));
            tree.root()
        };
        let base = root(&[(1, 1), (2, 2), (3, 3)]);
        assert_ne!(base, root(&[(1, 1), (2, 2), (4, 3)]), "a moved position");
        assert_ne!(base, root(&[(1, 1), (2, 2), (3, 4)]), "a changed hash");
        assert_ne!(base, root(&[(1, 1), (2, 2)]), "a removed last event");
        assert_ne!(base, root(&[(2, 2), (1, 1), (3, 3)]), "a reordering");
    }
}
