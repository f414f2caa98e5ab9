//! Throwaway PostgreSQL databases for tests (feature `testing`).
//!
//! `DATABASE_URL` names the server and a database to connect to for
//! `CREATE DATABASE` (default `postgres://postgres@127.0.0.1:5432/postgres`,
//! a superuser). Each [`TestDatabase`] is a fresh, migrated database that is
//! dropped when the value is dropped, so tests run in parallel.

use tokio_postgres::Client;

use crate::{PostgresEventStore, PostgresOptions};

/// The server tests use when `DATABASE_URL` is unset.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// The role the migrations grant INSERT and SELECT on events to.
pub const SERVICE_ROLE: &str = "agentledger_service";

/// A fresh, migrated database, dropped on drop.
pub struct TestDatabase {
    name: String,
    admin_url: String,
}

impl TestDatabase {
    /// Creates and migrates a database named `agentledger_t_[<run>_]<random>`,
    /// where `<run>` is `AGENTLEDGER_TEST_RUN` when set.
    ///
    /// # Panics
    /// When the server cannot be reached: tests that need PostgreSQL fail loudly.
    pub async fn create() -> Self {
        let server =
            std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_DATABASE_URL.to_string());
        Self::create_on(&server).await
    }

    /// [`TestDatabase::create`] on the server `server` names (a superuser's
    /// connection string), whatever `DATABASE_URL` says.
    ///
    /// # Panics
    /// When the server cannot be reached.
    pub async fn create_on(server: &str) -> Self {
        // ops/test.sh sets a run id so that it can drop what a killed test left behind.
        let run = std::env::var("AGENTLEDGER_TEST_RUN")
            .map(|r| format!("{r}_"))
            .unwrap_or_default();
        let name = format!("agentledger_t_{run}{}", uuid::Uuid::new_v4().simple());
        let admin = connect(server).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name} on {server}: {e}"));
        let db = Self {
            admin_url: with_database(server, &name, None),
            name,
        };
        crate::migrate::run(&db.admin_url)
            .await
            .expect("migrations apply to a fresh database");
        db
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Connection string for the owner (a superuser).
    pub fn admin_url(&self) -> &str {
        &self.admin_url
    }

    /// Connection string for the service's least-privileged role.
    pub fn service_url(&self) -> String {
        with_database(&self.admin_url, &self.name, Some(SERVICE_ROLE))
    }

    /// The deployment's signing keys as `serve` holds them: public halves
    /// read by the service role of `store`, signing with the owner role.
    pub fn ledger_keys(&self, store: &PostgresEventStore) -> crate::signing::PostgresLedgerKeys {
        let owner = crate::postgres::pool(&self.admin_url, 2).expect("the owner's pool");
        crate::signing::PostgresLedgerKeys::with_signer(store.pool().clone(), owner)
    }

    /// A connection as the owner.
    pub async fn admin_client(&self) -> Client {
        connect(&self.admin_url).await
    }

    /// A store connected as the service role, with default options.
    pub async fn store(&self) -> PostgresEventStore {
        self.store_with(PostgresOptions::default()).await
    }

    /// A store connected as the service role.
    pub async fn store_with(&self, options: PostgresOptions) -> PostgresEventStore {
        PostgresEventStore::connect(&self.service_url(), options)
            .await
            .expect("connect to the test database")
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let (server, name) = (self.admin_url.clone(), self.name.clone());
        // Drop runs inside the test's runtime, which cannot be blocked on; a
        // short-lived thread with its own runtime does the clean-up.
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async {
                let admin = connect(&with_database(&server, "postgres", None)).await;
                if let Err(e) = admin
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await
                {
                    eprintln!("could not drop test database {name}: {e}");
                }
            });
        });
        let _ = cleanup.join();
    }
}

/// Connects and drives the connection in the background.
pub async fn connect(url: &str) -> Client {
    let parsed =
        crate::postgres::DatabaseUrl::parse(url).unwrap_or_else(|e| panic!("database URL: {e}"));
    let (client, connection) = parsed
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect to {:?}: {e}", parsed.config()));
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// `url` with another database (and optionally user).
///
/// # Panics
/// When `url` is not a valid connection string.
pub fn with_database(url: &str, database: &str, user: Option<&str>) -> String {
    crate::postgres::connection_string(url, database, user)
        .unwrap_or_else(|e| panic!("DATABASE_URL {url:?}: {e}"))
}
