//! The ledger's tree in PostgreSQL (`ledger_tiles`, `ledger_tree`,
//! `ledger_tree_holes`, migration V10).

use std::collections::HashMap;

use async_trait::async_trait;
use deadpool_postgres::Pool;

use crate::tlog::{decode_tile, encode_tile, Hash, TileId, TileReader, TreeBuilder, TreeTiles};
use crate::{Position, StoreError};

/// The tree's tiles in the database of `pool`.
#[derive(Clone)]
pub struct PostgresTiles {
    pool: Pool,
}

impl PostgresTiles {
    /// Tiles read and written with `pool` (the service role may do both).
    pub fn new(pool: Pool) -> Self {
        Self { pool }
    }
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[async_trait]
impl TileReader for PostgresTiles {
    async fn tree_size(&self) -> Result<u64, StoreError> {
        let client = self.pool.get().await?;
        let row = client
            .query_one("SELECT size FROM ledger_tree", &[])
            .await?;
        Ok(row.get::<_, i64>(0) as u64)
    }

    async fn read_tiles(&self, tiles: &[TileId]) -> Result<HashMap<TileId, Vec<Hash>>, StoreError> {
        let client = self.pool.get().await?;
        read_tiles_with(&client, tiles).await
    }
}

async fn read_tiles_with(
    client: &impl deadpool_postgres::GenericClient,
    tiles: &[TileId],
) -> Result<HashMap<TileId, Vec<Hash>>, StoreError> {
    let levels: Vec<i16> = tiles.iter().map(|t| i16::from(t.level)).collect();
    let indexes: Vec<i64> = tiles.iter().map(|t| to_i64(t.index)).collect();
    let rows = client
        .query(
            "SELECT t.level, t.idx, t.hashes FROM ledger_tiles t
             JOIN unnest($1::smallint[], $2::bigint[]) AS w(level, idx)
               ON t.level = w.level AND t.idx = w.idx",
            &[&levels, &indexes],
        )
        .await?;
    rows.iter()
        .map(|row| {
            let tile = TileId {
                level: row.get::<_, i16>(0) as u8,
                index: row.get::<_, i64>(1) as u64,
            };
            Ok((tile, decode_tile(row.get(2))?))
        })
        .collect()
}

#[async_trait]
impl TreeTiles for PostgresTiles {
    async fn load(&self) -> Result<TreeBuilder, StoreError> {
        // One snapshot: the size and its edge tiles as one node saved them
        // (another node's save in between would have grown the tiles).
        let mut client = self.pool.get().await?;
        let tx = client
            .build_transaction()
            .isolation_level(deadpool_postgres::tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await?;
        let row = tx
            .query_one("SELECT size, position FROM ledger_tree", &[])
            .await?;
        let (size, position) = (
            row.get::<_, i64>(0) as u64,
            row.get::<_, i64>(1) as Position,
        );
        let edges: Vec<TileId> = TreeBuilder::edge_tiles(size)
            .into_iter()
            .map(|(t, _)| t)
            .collect();
        let tiles = read_tiles_with(&tx, &edges).await?;
        tx.commit().await?;
        TreeBuilder::resume(size, position, &tiles)
    }

    async fn save(&self, from: u64, builder: &mut TreeBuilder) -> Result<bool, StoreError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let stored: i64 = tx
            .query_one("SELECT size FROM ledger_tree FOR UPDATE", &[])
            .await?
            .get(0);
        if stored as u64 != from {
            return Ok(false);
        }
        let (changed, holes) = builder.take_changes();
        let (mut levels, mut indexes, mut hashes) = (Vec::new(), Vec::new(), Vec::new());
        for (tile, content) in &changed {
            levels.push(i16::from(tile.level));
            indexes.push(to_i64(tile.index));
            hashes.push(encode_tile(content));
        }
        tx.execute(
            "INSERT INTO ledger_tiles (level, idx, hashes)
             SELECT * FROM unnest($1::smallint[], $2::bigint[], $3::bytea[])
             ON CONFLICT (level, idx) DO UPDATE SET hashes = excluded.hashes",
            &[&levels, &indexes, &hashes],
        )
        .await?;
        if !holes.is_empty() {
            let holes: Vec<i64> = holes.iter().map(|p| to_i64(*p)).collect();
            tx.execute(
                "INSERT INTO ledger_tree_holes (position) SELECT unnest($1::bigint[])
                 ON CONFLICT DO NOTHING",
                &[&holes],
            )
            .await?;
        }
        tx.execute(
            "UPDATE ledger_tree SET size = $1, position = $2",
            &[&to_i64(builder.size()), &to_i64(builder.position())],
        )
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn leaf_index(&self, position: Position) -> Result<Option<u64>, StoreError> {
        let client = self.pool.get().await?;
        let row = client
            .query_one(
                "SELECT $1 <= t.position AND $1 > 0
                        AND NOT EXISTS (SELECT 1 FROM ledger_tree_holes WHERE position = $1),
                        (SELECT count(*) FROM ledger_tree_holes WHERE position < $1)
                 FROM ledger_tree t",
                &[&to_i64(position)],
            )
            .await?;
        Ok(row
            .get::<_, bool>(0)
            .then(|| position - 1 - row.get::<_, i64>(1) as u64))
    }

    async fn size_at(&self, position: Position) -> Result<Option<u64>, StoreError> {
        let client = self.pool.get().await?;
        let row = client
            .query_one(
                "SELECT $1 <= t.position,
                        (SELECT count(*) FROM ledger_tree_holes WHERE position <= $1)
                 FROM ledger_tree t",
                &[&to_i64(position)],
            )
            .await?;
        Ok(row
            .get::<_, bool>(0)
            .then(|| position - row.get::<_, i64>(1) as u64))
    }
}
