//! Applies the SQL migrations in `migrations/` (event store and read models).
//!
//! refinery takes no lock of its own, and several processes may start at
//! once, so the run holds a session advisory lock on a dedicated connection.

mod embedded {
    refinery::embed_migrations!("../migrations");
}

/// Advisory lock key serialising migrations (any constant unique to agentledger).
const MIGRATION_LOCK: i64 = 0x6167_6c65_6467_0001;

/// Errors while migrating.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// Connecting or locking failed.
    #[error("database: {0}")]
    Database(#[from] tokio_postgres::Error),
    /// A migration failed; it was rolled back.
    #[error("migration: {0}")]
    Migration(#[from] refinery::Error),
    /// The database URL could not be used.
    #[error("{0}")]
    Url(#[from] crate::StoreError),
}

/// Applies every pending migration to the database at `database_url` (the
/// owner role) and returns the names of those applied.
pub async fn run(database_url: &str) -> Result<Vec<String>, MigrateError> {
    let url = crate::postgres::DatabaseUrl::parse(database_url)?;
    let (mut client, connection) = url.connect().await?;
    let driver = tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "migration connection closed with an error");
        }
    });
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    let report = embedded::migrations::runner().run_async(&mut client).await;
    // The lock goes with the session anyway; unlocking early lets a waiting process proceed.
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await;
    drop(client);
    let _ = driver.await;
    Ok(report?
        .applied_migrations()
        .iter()
        .map(|m| m.to_string())
        .collect())
}
