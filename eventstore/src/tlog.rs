//! Proofs over the ledger's Merkle tree (design §8: a leaf per event in
//! position order, `SHA-256(0x00 ‖ position ‖ event hash)`; RFC 6962
//! nodes), served from stored tiles instead of the events.
//!
//! The tree is kept as C2SP `tlog-tiles` keep it: a tile at tile level `L`
//! holds up to 256 consecutive hashes of tree level `8·L` (level 0: the
//! leaves); a full tile never changes again, only the last tile of each
//! level grows. Any complete subtree's hash is then at most 255 hashes
//! away, inside one tile. [`TreeBuilder`] appends leaves and says which
//! tiles changed; [`inclusion_proof`], [`consistency_proof`] and
//! [`tree_root`] read the few tiles they need through a [`TileReader`], in
//! one round trip.
//!
//! Proofs are RFC 9162 §2.1.3 (inclusion, `PATH`) and §2.1.4 (consistency,
//! `SUBPROOF`), hashes in the RFC's order.

use std::collections::{BTreeSet, HashMap};

use async_trait::async_trait;
use sha2::{Digest, Sha256};

use crate::digest::leaf;
use crate::{Position, StoreError};

/// A SHA-256 hash.
pub type Hash = [u8; 32];

/// Tree levels per tile.
pub const TILE_HEIGHT: u32 = 8;
/// Hashes in a full tile.
pub const TILE_WIDTH: u64 = 1 << TILE_HEIGHT;

/// A tile: tile level `level` (tree level `8·level`), the `index`-th.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TileId {
    pub level: u8,
    pub index: u64,
}

/// The root of the complete subtree over leaves
/// `[index·2^level, (index+1)·2^level)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Node {
    level: u32,
    index: u64,
}

impl Node {
    /// The tile holding the tree-level-`8·L` hashes below it, and where.
    fn in_tile(self) -> (TileId, usize, usize) {
        let below = self.level % TILE_HEIGHT;
        let first = self.index << below;
        (
            TileId {
                level: (self.level / TILE_HEIGHT) as u8,
                index: first / TILE_WIDTH,
            },
            (first % TILE_WIDTH) as usize,
            1 << below,
        )
    }
}

fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// Hashes of `hashes` (a power of two of them) up to their subtree root.
fn reduce(hashes: &[Hash]) -> Hash {
    let mut level: Vec<Hash> = hashes.to_vec();
    while level.len() > 1 {
        level = level
            .chunks(2)
            .map(|pair| node_hash(&pair[0], &pair[1]))
            .collect();
    }
    level[0]
}

/// The largest power of two below `n` (`n` ≥ 2).
fn split(n: u64) -> u64 {
    1 << (63 - (n - 1).leading_zeros())
}

/// MTH(D[a:b]) (RFC 9162 §2.1.1) for the ranges the proofs visit, whose
/// left parts are always complete, aligned subtrees.
fn range_hash(a: u64, b: u64, get: &mut impl FnMut(Node) -> Hash) -> Hash {
    let n = b - a;
    if n.is_power_of_two() && a % n == 0 {
        return get(Node {
            level: n.trailing_zeros(),
            index: a / n,
        });
    }
    let k = split(n);
    let left = range_hash(a, a + k, get);
    let right = range_hash(a + k, b, get);
    node_hash(&left, &right)
}

/// PATH(m, D[a:b]) (RFC 9162 §2.1.3.1).
fn path(m: u64, a: u64, b: u64, get: &mut impl FnMut(Node) -> Hash, out: &mut Vec<Hash>) {
    let n = b - a;
    if n <= 1 {
        return;
    }
    let k = split(n);
    if m < a + k {
        path(m, a, a + k, get, out);
        out.push(range_hash(a + k, b, get));
    } else {
        path(m, a + k, b, get, out);
        out.push(range_hash(a, a + k, get));
    }
}

/// SUBPROOF(m, D[a:b], complete) (RFC 9162 §2.1.4.1), `m` relative to `a`.
fn subproof(
    m: u64,
    a: u64,
    b: u64,
    complete: bool,
    get: &mut impl FnMut(Node) -> Hash,
    out: &mut Vec<Hash>,
) {
    let n = b - a;
    if m == n {
        if !complete {
            out.push(range_hash(a, b, get));
        }
        return;
    }
    let k = split(n);
    if m <= k {
        subproof(m, a, a + k, complete, get, out);
        out.push(range_hash(a + k, b, get));
    } else {
        subproof(m - k, a + k, b, false, get, out);
        out.push(range_hash(a, a + k, get));
    }
}

/// Where the tiles are kept.
#[async_trait]
pub trait TileReader: Send + Sync {
    /// The tree's size now (leaves the stored tiles cover).
    async fn tree_size(&self) -> Result<u64, StoreError>;
    /// The stored hashes of each tile of `tiles` (a tile that is not full
    /// has fewer than 256).
    async fn read_tiles(&self, tiles: &[TileId]) -> Result<HashMap<TileId, Vec<Hash>>, StoreError>;
}

/// Runs `compute` twice: once to learn which subtree roots it needs, then,
/// with their tiles read in one call, for real.
async fn with_nodes<T>(
    reader: &dyn TileReader,
    size: u64,
    mut compute: impl FnMut(&mut dyn FnMut(Node) -> Hash) -> T,
) -> Result<T, StoreError> {
    let stored = reader.tree_size().await?;
    if size > stored {
        return Err(StoreError::BadInput(format!(
            "the tree has {stored} leaves so far, not {size}"
        )));
    }
    let mut wanted = BTreeSet::new();
    compute(&mut |node: Node| {
        wanted.insert(node.in_tile().0);
        [0; 32]
    });
    let tiles: Vec<TileId> = wanted.into_iter().collect();
    let read = reader.read_tiles(&tiles).await?;
    let mut missing = None;
    let result = compute(&mut |node: Node| {
        let (tile, offset, count) = node.in_tile();
        match read.get(&tile).and_then(|h| h.get(offset..offset + count)) {
            Some(hashes) => reduce(hashes),
            None => {
                missing.get_or_insert(tile);
                [0; 32]
            }
        }
    });
    match missing {
        Some(tile) => Err(StoreError::Corrupt {
            position: 0,
            reason: format!(
                "tile {}/{} of the ledger's tree is missing or short",
                tile.level, tile.index
            ),
        }),
        None => Ok(result),
    }
}

/// The tree head over the first `size` leaves.
pub async fn tree_root(reader: &dyn TileReader, size: u64) -> Result<Hash, StoreError> {
    if size == 0 {
        return Ok(Sha256::digest([]).into());
    }
    with_nodes(reader, size, |get| range_hash(0, size, &mut |n| get(n))).await
}

/// The audit path of leaf `index` in the tree of `size` leaves, leaf side
/// first (RFC 9162 §2.1.3).
pub async fn inclusion_proof(
    reader: &dyn TileReader,
    index: u64,
    size: u64,
) -> Result<Vec<Hash>, StoreError> {
    if index >= size {
        return Err(StoreError::BadInput(format!(
            "leaf {index} is not in a tree of {size} leaves"
        )));
    }
    with_nodes(reader, size, |get| {
        let mut out = Vec::new();
        path(index, 0, size, &mut |n| get(n), &mut out);
        out
    })
    .await
}

/// The proof that the tree of `from` leaves is a prefix of the tree of
/// `to` leaves (RFC 9162 §2.1.4); empty when `from` is 0 or equals `to`.
pub async fn consistency_proof(
    reader: &dyn TileReader,
    from: u64,
    to: u64,
) -> Result<Vec<Hash>, StoreError> {
    if from > to {
        return Err(StoreError::BadInput(format!(
            "a tree of {from} leaves cannot be a prefix of one of {to}"
        )));
    }
    if from == 0 || from == to {
        return Ok(Vec::new());
    }
    with_nodes(reader, to, |get| {
        let mut out = Vec::new();
        subproof(from, 0, to, true, &mut |n| get(n), &mut out);
        out
    })
    .await
}

/// Checks an inclusion proof (RFC 9162 §2.1.3.2): does `leaf_hash` at
/// `index` lead to `root` in the tree of `size` leaves?
pub fn verify_inclusion(
    index: u64,
    size: u64,
    leaf_hash: &Hash,
    proof: &[Hash],
    root: &Hash,
) -> bool {
    if index >= size {
        return false;
    }
    let (mut f_n, mut s_n) = (index, size - 1);
    let mut r = *leaf_hash;
    for p in proof {
        if s_n == 0 {
            return false;
        }
        if f_n & 1 == 1 || f_n == s_n {
            r = node_hash(p, &r);
            while f_n & 1 == 0 && f_n != 0 {
                f_n >>= 1;
                s_n >>= 1;
            }
        } else {
            r = node_hash(&r, p);
        }
        f_n >>= 1;
        s_n >>= 1;
    }
    s_n == 0 && r == *root
}

/// Checks a consistency proof (RFC 9162 §2.1.4.2) between the tree of
/// `from` leaves with head `old_root` and that of `to` with `new_root`.
pub fn verify_consistency(
    from: u64,
    to: u64,
    proof: &[Hash],
    old_root: &Hash,
    new_root: &Hash,
) -> bool {
    if from > to {
        return false;
    }
    if from == to {
        return proof.is_empty() && old_root == new_root;
    }
    if from == 0 {
        return proof.is_empty();
    }
    if proof.is_empty() {
        return false;
    }
    let mut proof = proof.to_vec();
    if from.is_power_of_two() {
        proof.insert(0, *old_root);
    }
    let Some((first, rest)) = proof.split_first() else {
        return false;
    };
    let (mut f_n, mut s_n) = (from - 1, to - 1);
    while f_n & 1 == 1 {
        f_n >>= 1;
        s_n >>= 1;
    }
    let (mut fr, mut sr) = (*first, *first);
    for c in rest {
        if s_n == 0 {
            return false;
        }
        if f_n & 1 == 1 || f_n == s_n {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            while f_n & 1 == 0 && f_n != 0 {
                f_n >>= 1;
                s_n >>= 1;
            }
        } else {
            sr = node_hash(&sr, c);
        }
        f_n >>= 1;
        s_n >>= 1;
    }
    s_n == 0 && fr == *old_root && sr == *new_root
}

/// Appends leaves and keeps the last (growing) tile of every level; says
/// which tiles changed since [`TreeBuilder::take_changes`] was last called.
#[derive(Debug, Clone, Default)]
pub struct TreeBuilder {
    size: u64,
    /// The last position covered (0: none yet).
    position: Position,
    /// Per tile level, the hashes of its last, not yet full, tile.
    edges: Vec<Vec<Hash>>,
    /// Tiles to write: their full contents now.
    changed: HashMap<TileId, Vec<Hash>>,
    /// Positions skipped since the last `take_changes` (aborted appends).
    holes: Vec<Position>,
}

impl TreeBuilder {
    /// An empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    /// A tree of `size` leaves up to `position`, whose last tiles (the
    /// partial tile of each level, as [`TreeBuilder::edge_tiles`] names
    /// them) hold `edges`.
    pub fn resume(
        size: u64,
        position: Position,
        edges: &HashMap<TileId, Vec<Hash>>,
    ) -> Result<Self, StoreError> {
        let mut builder = Self {
            size,
            position,
            ..Self::default()
        };
        for (tile, width) in Self::edge_tiles(size) {
            let hashes = edges
                .get(&tile)
                .filter(|h| h.len() == width)
                .ok_or_else(|| StoreError::Corrupt {
                    position,
                    reason: format!(
                        "the ledger's tree has {size} leaves but tile {}/{} does not hold {width} hashes",
                        tile.level, tile.index
                    ),
                })?;
            let level = tile.level as usize;
            if builder.edges.len() <= level {
                builder.edges.resize(level + 1, Vec::new());
            }
            builder.edges[level] = hashes.clone();
        }
        Ok(builder)
    }

    /// The partial tiles of a tree of `size` leaves, with their widths.
    pub fn edge_tiles(size: u64) -> Vec<(TileId, usize)> {
        let mut tiles = Vec::new();
        let mut count = size;
        let mut level = 0u8;
        while count > 0 {
            let width = (count % TILE_WIDTH) as usize;
            if width > 0 {
                tiles.push((
                    TileId {
                        level,
                        index: count / TILE_WIDTH,
                    },
                    width,
                ));
            }
            count /= TILE_WIDTH;
            level += 1;
        }
        tiles
    }

    /// Leaves so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The last position covered.
    pub fn position(&self) -> Position {
        self.position
    }

    /// Appends the event at `position` (greater than the last) with chain
    /// hash `hash`.
    pub fn push(&mut self, position: Position, hash: &Hash) {
        debug_assert!(position > self.position);
        self.holes.extend(self.position + 1..position);
        self.position = position;
        let mut hash = leaf(position, hash);
        let mut level = 0usize;
        let mut below = self.size;
        loop {
            if self.edges.len() <= level {
                self.edges.push(Vec::new());
            }
            let tile = TileId {
                level: level as u8,
                index: below / TILE_WIDTH,
            };
            self.edges[level].push(hash);
            self.changed.insert(tile, self.edges[level].clone());
            if self.edges[level].len() as u64 != TILE_WIDTH {
                break;
            }
            // A full tile: its root is the next hash one tile level up.
            hash = reduce(&self.edges[level]);
            self.edges[level].clear();
            below /= TILE_WIDTH;
            level += 1;
        }
        self.size += 1;
    }

    /// The tiles changed since the last call, and the positions skipped.
    pub fn take_changes(&mut self) -> (HashMap<TileId, Vec<Hash>>, Vec<Position>) {
        (
            std::mem::take(&mut self.changed),
            std::mem::take(&mut self.holes),
        )
    }
}

/// Encodes a tile's hashes as stored: 32 bytes each, in order.
pub fn encode_tile(hashes: &[Hash]) -> Vec<u8> {
    hashes.concat()
}

/// Decodes a stored tile.
pub fn decode_tile(bytes: &[u8]) -> Result<Vec<Hash>, StoreError> {
    if bytes.len() % 32 != 0 || bytes.len() as u64 > 32 * TILE_WIDTH {
        return Err(StoreError::Corrupt {
            position: 0,
            reason: format!("a tile of the ledger's tree has {} bytes", bytes.len()),
        });
    }
    Ok(bytes
        .chunks(32)
        .map(|c| c.try_into().expect("32 bytes"))
        .collect())
}

/// Where the tree is kept and extended.
#[async_trait]
pub trait TreeTiles: TileReader {
    /// A builder where the stored tree ends.
    async fn load(&self) -> Result<TreeBuilder, StoreError>;
    /// Stores what `builder` changed, if the stored tree still has `from`
    /// leaves; false (nothing stored) when another writer extended it.
    async fn save(&self, from: u64, builder: &mut TreeBuilder) -> Result<bool, StoreError>;
    /// The leaf index of the event at `position`, once the tree covers it
    /// (`None`: beyond the tree, or a position no event took).
    async fn leaf_index(&self, position: Position) -> Result<Option<u64>, StoreError>;
    /// How many leaves cover every event up to `position` (the tree size
    /// of a digest at that position), once the tree reaches it.
    async fn size_at(&self, position: Position) -> Result<Option<u64>, StoreError>;
}

/// Tiles held in memory: the dev stores' tree, and tests.
#[derive(Debug, Default)]
pub struct MemoryTiles {
    state: std::sync::RwLock<MemoryTree>,
}

#[derive(Debug, Default)]
struct MemoryTree {
    size: u64,
    position: Position,
    tiles: HashMap<TileId, Vec<Hash>>,
    holes: Vec<Position>,
}

impl MemoryTiles {
    /// Stores what `builder` changed.
    pub fn apply(&self, builder: &mut TreeBuilder) {
        let mut state = self.state.write().expect("tiles lock");
        Self::store(&mut state, builder);
    }

    fn store(state: &mut MemoryTree, builder: &mut TreeBuilder) {
        let (changed, holes) = builder.take_changes();
        state.tiles.extend(changed);
        state.holes.extend(holes);
        state.size = builder.size();
        state.position = builder.position();
    }
}

#[async_trait]
impl TileReader for MemoryTiles {
    async fn tree_size(&self) -> Result<u64, StoreError> {
        Ok(self.state.read().expect("tiles lock").size)
    }

    async fn read_tiles(&self, tiles: &[TileId]) -> Result<HashMap<TileId, Vec<Hash>>, StoreError> {
        let state = self.state.read().expect("tiles lock");
        Ok(tiles
            .iter()
            .filter_map(|t| state.tiles.get(t).map(|h| (*t, h.clone())))
            .collect())
    }
}

#[async_trait]
impl TreeTiles for MemoryTiles {
    async fn load(&self) -> Result<TreeBuilder, StoreError> {
        let state = self.state.read().expect("tiles lock");
        TreeBuilder::resume(state.size, state.position, &state.tiles)
    }

    async fn save(&self, from: u64, builder: &mut TreeBuilder) -> Result<bool, StoreError> {
        // Compare and set under one lock, as PostgresTiles does with FOR UPDATE.
        let mut state = self.state.write().expect("tiles lock");
        if state.size != from {
            return Ok(false);
        }
        Self::store(&mut state, builder);
        Ok(true)
    }

    async fn leaf_index(&self, position: Position) -> Result<Option<u64>, StoreError> {
        let state = self.state.read().expect("tiles lock");
        if position == 0
            || position > state.position
            || state.holes.binary_search(&position).is_ok()
        {
            return Ok(None);
        }
        let below = state.holes.partition_point(|h| *h < position) as u64;
        Ok(Some(position - 1 - below))
    }

    async fn size_at(&self, position: Position) -> Result<Option<u64>, StoreError> {
        let state = self.state.read().expect("tiles lock");
        if position > state.position {
            return Ok(None);
        }
        let below = state.holes.partition_point(|h| *h <= position) as u64;
        Ok(Some(position - below))
    }
}

/// How long [`maintain`] lets events gather once it has caught up.
pub const SAVE_PAUSE: std::time::Duration = std::time::Duration::from_millis(50);

/// Keeps `tiles` up with `store` until `stop`: follows the ledger from
/// where the stored tree ends and stores each batch of leaves in one go.
/// A node that finds the tree extended by another waits a second and
/// catches up from the stored tree; a failure is logged and retried. At
/// the head it saves at most once per [`SAVE_PAUSE`].
pub async fn maintain(
    store: std::sync::Arc<dyn crate::EventStore>,
    tiles: std::sync::Arc<dyn TreeTiles>,
    stop: tokio_util::sync::CancellationToken,
) {
    use futures::StreamExt;
    const BATCH: usize = 1_000;
    loop {
        let run = async {
            let mut builder = tiles.load().await?;
            let mut events = Box::pin(
                store
                    .subscribe_all(builder.position() + 1)
                    .into_stream()
                    .ready_chunks(BATCH),
            );
            while let Some(batch) = events.next().await {
                let from = builder.size();
                let caught_up = batch.len() < BATCH;
                for event in batch {
                    let event = event?;
                    if event.global_position > builder.position() {
                        builder.push(event.global_position, &event.hash);
                    }
                }
                if !tiles.save(from, &mut builder).await? {
                    return Ok::<bool, StoreError>(false);
                }
                // A short batch is not always the head: catching up reads
                // pages smaller than a batch. Pause only at the head.
                if caught_up && builder.position() >= store.head_position().await? {
                    // At the head: gather what arrives for a moment, so
                    // that a busy ledger costs one read and one save per
                    // pause, not one per commit.
                    tokio::time::sleep(SAVE_PAUSE).await;
                }
            }
            Ok(true)
        };
        let pause = tokio::select! {
            outcome = run => match outcome {
                Ok(true) => return,
                Ok(false) => std::time::Duration::from_secs(1),
                Err(e) => {
                    tracing::warn!(error = %e, "extending the ledger's tree failed; trying again");
                    std::time::Duration::from_secs(1)
                }
            },
            () = stop.cancelled() => return,
        };
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = stop.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::MerkleBuilder;

    fn event_hash(i: u64) -> Hash {
        Sha256::digest(i.to_be_bytes()).into()
    }

    /// A tree of `n` leaves at positions 1, 3, 4, 5, … (one hole).
    fn built(n: u64) -> (MemoryTiles, Vec<(Position, Hash)>) {
        let tiles = MemoryTiles::default();
        let mut builder = TreeBuilder::new();
        let mut leaves = Vec::new();
        for i in 0..n {
            let position = if i == 0 { 1 } else { i + 2 };
            builder.push(position, &event_hash(i));
            leaves.push((position, event_hash(i)));
            if i % 97 == 0 {
                tiles.apply(&mut builder);
            }
        }
        tiles.apply(&mut builder);
        (tiles, leaves)
    }

    fn head(leaves: &[(Position, Hash)]) -> Hash {
        let mut m = MerkleBuilder::new();
        for (p, h) in leaves {
            m.push(*p, h);
        }
        m.root()
    }

    #[tokio::test]
    async fn roots_from_tiles_equal_the_digest_tree_head_at_every_size() {
        let (tiles, leaves) = built(70_000);
        for size in [
            0u64, 1, 2, 3, 255, 256, 257, 511, 65_535, 65_536, 65_537, 70_000,
        ] {
            let root = tree_root(&tiles, size).await.unwrap();
            assert_eq!(root, head(&leaves[..size as usize]), "size {size}");
        }
    }

    #[tokio::test]
    async fn every_proof_verifies_and_a_changed_hash_breaks_it() {
        let (tiles, leaves) = built(1_100);
        for size in [1u64, 2, 5, 256, 257, 1_000, 1_100] {
            let root = tree_root(&tiles, size).await.unwrap();
            for index in [0, size / 3, size / 2, size - 1] {
                let proof = inclusion_proof(&tiles, index, size).await.unwrap();
                let (p, h) = leaves[index as usize];
                assert!(verify_inclusion(index, size, &leaf(p, &h), &proof, &root));
                assert!(!verify_inclusion(
                    index,
                    size,
                    &leaf(p + 1, &h),
                    &proof,
                    &root
                ));
                if let Some(first) = proof.first() {
                    let mut bad = proof.clone();
                    bad[0] = node_hash(first, first);
                    assert!(!verify_inclusion(index, size, &leaf(p, &h), &bad, &root));
                }
            }
            for from in [1u64, size / 2, size] {
                if from == 0 {
                    continue;
                }
                let old = tree_root(&tiles, from).await.unwrap();
                let proof = consistency_proof(&tiles, from, size).await.unwrap();
                assert!(
                    verify_consistency(from, size, &proof, &old, &root),
                    "{from}→{size}"
                );
                let other = node_hash(&old, &old);
                assert!(from == size || !verify_consistency(from, size, &proof, &other, &root));
            }
        }
    }

    #[tokio::test]
    async fn a_resumed_builder_goes_on_as_if_it_never_stopped() {
        let (tiles, leaves) = built(1_000);
        let edges = tiles
            .read_tiles(
                &TreeBuilder::edge_tiles(1_000)
                    .iter()
                    .map(|(t, _)| *t)
                    .collect::<Vec<_>>(),
            )
            .await
            .unwrap();
        let last = leaves.last().unwrap().0;
        let mut resumed = TreeBuilder::resume(1_000, last, &edges).unwrap();
        let mut all = leaves.clone();
        for i in 1_000..1_300 {
            resumed.push(last + 1 + i - 1_000, &event_hash(i));
            all.push((last + 1 + i - 1_000, event_hash(i)));
        }
        tiles.apply(&mut resumed);
        assert_eq!(tree_root(&tiles, 1_300).await.unwrap(), head(&all));
        assert!(TreeBuilder::resume(1_001, last, &edges).is_err());
    }
}
