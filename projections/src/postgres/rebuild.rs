//! Rebuilding a projection: replay `$all` from position 0 into fresh tables
//! (`<table>_rebuild`) while the live ones keep serving, then swap them in
//! one transaction. The swap locks the checkpoint row (so the live runner
//! cannot commit meanwhile), brings the fresh tables up to the live
//! checkpoint, renames, and moves the lease token so that the live runner
//! starts again from the swapped tables. Needs the owner role (DDL).

use std::sync::Arc;
use std::time::Instant;

use agentledger_eventstore::{EventStore, RecordedEvent};
use tokio_postgres::{Client, Transaction};

use super::project::{projection, Projection};
use super::ProjectionError;
use crate::model::Fact;

/// Events read per page while rebuilding.
const PAGE: usize = 10_000;

/// What a rebuild did.
#[derive(Debug, Clone)]
pub struct RebuildReport {
    pub name: String,
    /// Events replayed (of every stream).
    pub events: u64,
    /// The position the swapped tables were built up to.
    pub position: u64,
    pub seconds: f64,
}

/// Rebuilds projection `name` from position 0 with `admin` (the owner role)
/// and, when `swap`, swaps the result in; otherwise leaves the fresh tables
/// as `<table>_rebuild` (to compare them with the live ones). `progress` is
/// called after every page with (position reached, head position).
pub async fn rebuild(
    admin: &mut Client,
    store: Arc<dyn EventStore>,
    name: &str,
    swap: bool,
    mut progress: impl FnMut(u64, u64),
) -> Result<RebuildReport, ProjectionError> {
    let started = Instant::now();
    let mut projection =
        projection(name, store.clone()).ok_or_else(|| ProjectionError::Unknown(name.into()))?;
    // Fresh tables without indexes (only the keys upserts need): loading
    // is faster, and the indexes are built once, before the swap.
    for table in projection.tables() {
        let (key, needed) = projection.key(table);
        admin
            .batch_execute(&format!(
                "DROP TABLE IF EXISTS {table}_rebuild;
                 CREATE TABLE {table}_rebuild (LIKE {table} INCLUDING DEFAULTS INCLUDING CONSTRAINTS);
                 GRANT SELECT, INSERT, UPDATE, DELETE ON {table}_rebuild TO agentledger_service;"
            ))
            .await?;
        if needed {
            add_key(admin, table, key).await?;
        }
    }
    let mut position = 0;
    let mut events = 0;
    loop {
        let head = store.head_position().await?;
        if position >= head {
            break;
        }
        let page = store.read_all(position + 1, PAGE).await?;
        let Some(last) = page.last() else { break };
        let last = last.global_position;
        let tx = admin.transaction().await?;
        apply_page(&mut *projection, &tx, &page).await?;
        tx.commit().await?;
        events += page.len() as u64;
        position = last;
        progress(position, head);
    }
    let mut renames = Vec::new();
    for table in projection.tables() {
        let (key, needed) = projection.key(table);
        if !needed {
            add_key(admin, table, key).await?;
        }
        renames.push(format!(
            "ALTER TABLE {table} RENAME CONSTRAINT {table}_rebuild_pkey TO {table}_pkey;"
        ));
        // The live table's secondary indexes, as the migration made them.
        let indexes = admin
            .query(
                "SELECT indexname, indexdef FROM pg_indexes
                  WHERE schemaname = current_schema() AND tablename = $1
                    AND indexname <> $1 || '_pkey'",
                &[table],
            )
            .await?;
        for index in indexes {
            let (name, definition): (String, String) = (index.get(0), index.get(1));
            let at = definition
                .find(" ON ")
                .ok_or_else(|| ProjectionError::Corrupt(format!("index {name}: {definition}")))?;
            let using = definition[at..]
                .find(" USING ")
                .map(|u| at + u)
                .ok_or_else(|| ProjectionError::Corrupt(format!("index {name}: {definition}")))?;
            let create = format!(
                "{} {name}_rebuild ON {}_rebuild{}",
                if definition.starts_with("CREATE UNIQUE") {
                    "CREATE UNIQUE INDEX"
                } else {
                    "CREATE INDEX"
                },
                definition[at + 4..using].trim(),
                &definition[using..]
            );
            admin.batch_execute(&create).await?;
            renames.push(format!("ALTER INDEX {name}_rebuild RENAME TO {name};"));
        }
    }
    if swap {
        let tx = admin.transaction().await?;
        // Holding the checkpoint row: the live runner cannot commit a batch
        // until the swap is done.
        let live: i64 = tx
            .query_opt(
                "SELECT position FROM projection_checkpoints WHERE name = $1 FOR UPDATE",
                &[&name],
            )
            .await?
            .map_or(0, |r| r.get(0));
        while position < live as u64 {
            let page = store
                .read_all(position + 1, PAGE.min((live as u64 - position) as usize))
                .await?;
            let Some(last) = page.last() else { break };
            let last = last.global_position.min(live as u64);
            let page: Vec<_> = page
                .into_iter()
                .filter(|e| e.global_position <= last)
                .collect();
            apply_page(&mut *projection, &tx, &page).await?;
            events += page.len() as u64;
            position = last;
        }
        for table in projection.tables() {
            tx.batch_execute(&format!(
                "ALTER TABLE {table} RENAME TO {table}_old;
                 ALTER TABLE {table}_rebuild RENAME TO {table};
                 DROP TABLE {table}_old;"
            ))
            .await?;
        }
        // The swapped tables' keys and indexes take the usual names.
        tx.batch_execute(&renames.join("\n")).await?;
        tx.execute(
            "INSERT INTO projection_checkpoints (name, position, lease_token)
             VALUES ($1, $2, gen_random_uuid())
             ON CONFLICT (name) DO UPDATE SET position = EXCLUDED.position,
                 lease_token = EXCLUDED.lease_token",
            &[&name, &(position as i64)],
        )
        .await?;
        tx.commit().await?;
    }
    Ok(RebuildReport {
        name: name.to_string(),
        events,
        position,
        seconds: started.elapsed().as_secs_f64(),
    })
}

async fn add_key(admin: &Client, table: &str, key: &str) -> Result<(), ProjectionError> {
    admin
        .batch_execute(&format!(
            "ALTER TABLE {table}_rebuild ADD CONSTRAINT {table}_rebuild_pkey PRIMARY KEY ({key})"
        ))
        .await?;
    Ok(())
}

async fn apply_page(
    projection: &mut dyn Projection,
    tx: &Transaction<'_>,
    page: &[RecordedEvent],
) -> Result<(), ProjectionError> {
    let facts: Vec<Fact> = page
        .iter()
        .filter_map(|e| Fact::decode(e).transpose())
        .collect::<Result<_, _>>()
        .map_err(|e| ProjectionError::Corrupt(e.to_string()))?;
    projection.apply(tx, "_rebuild", &facts).await
}

/// Rows that differ between the live tables of `name` and its
/// `_rebuild` tables (both directions, every column); 0 when they are equal.
pub async fn differences(admin: &Client, name: &str) -> Result<i64, ProjectionError> {
    let projection = projection(
        name,
        Arc::new(agentledger_eventstore::InMemoryEventStore::default()),
    )
    .ok_or_else(|| ProjectionError::Unknown(name.into()))?;
    let mut total = 0;
    for table in projection.tables() {
        let row = admin
            .query_one(
                &format!(
                    "SELECT (SELECT count(*) FROM (TABLE {table} EXCEPT ALL TABLE {table}_rebuild) a)
                          + (SELECT count(*) FROM (TABLE {table}_rebuild EXCEPT ALL TABLE {table}) b)"
                ),
                &[],
            )
            .await?;
        total += row.get::<_, i64>(0);
    }
    Ok(total)
}
