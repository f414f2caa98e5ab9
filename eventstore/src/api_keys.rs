//! API keys for applications and workers (`api_keys`, migration V5).
//!
//! A key reads `alk_<lookup>_<secret>`: `lookup` (12 hex digits) finds the
//! row, `secret` (32 random bytes, base64url) proves possession. Only
//! SHA-256 over the lookup and the secret is kept: with 256 random bits
//! there is nothing to guess, so a slow password hash would only cost CPU on
//! every request. The secret exists once, in what [`ApiKeys::create`]
//! returns.
//!
//! Roles and tenants are plain strings here: this crate does not know what
//! they allow (the API does).

use std::sync::Mutex;

use async_trait::async_trait;
use base64::Engine;
use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::StoreError;

/// What every key starts with, so that a leaked key is recognisable (secret
/// scanners match it) and a JWT is never mistaken for one.
pub const KEY_PREFIX: &str = "alk_";

/// Longest key name, in characters.
pub const MAX_NAME_CHARS: usize = 100;

/// A key as listed: everything but the secret.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ApiKey {
    pub key_id: Uuid,
    pub name: String,
    pub roles: Vec<String>,
    pub tenant: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub last_used_at: Option<DateTime<Utc>>,
}

impl ApiKey {
    /// Whether the key may be used at `now`: neither revoked nor expired.
    pub fn usable_at(&self, now: DateTime<Utc>) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|e| now < e)
    }
}

/// What to create.
#[derive(Debug, Clone)]
pub struct NewApiKey {
    pub name: String,
    pub roles: Vec<String>,
    pub tenant: String,
    pub expires_at: Option<DateTime<Utc>>,
}

/// A key's secret as presented by a caller, split into its parts.
#[derive(Clone, PartialEq, Eq)]
pub struct PresentedKey {
    lookup: String,
    secret: String,
}

impl std::fmt::Debug for PresentedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PresentedKey({KEY_PREFIX}{}_…)", self.lookup)
    }
}

impl PresentedKey {
    /// `text` when it has the shape of a key (`None`: not a key at all, e.g.
    /// a JWT).
    pub fn parse(text: &str) -> Option<Self> {
        let rest = text.strip_prefix(KEY_PREFIX)?;
        let (lookup, secret) = rest.split_once('_')?;
        let hex_lookup = lookup.len() == 12 && lookup.bytes().all(|b| b.is_ascii_hexdigit());
        let b64_secret = secret.len() == 43
            && secret
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        (hex_lookup && b64_secret).then(|| Self {
            lookup: lookup.to_ascii_lowercase(),
            secret: secret.to_string(),
        })
    }

    /// The part that finds the row.
    pub fn lookup(&self) -> &str {
        &self.lookup
    }

    /// The hash the store keeps of this key (to cache a lookup under,
    /// without keeping the secret itself).
    pub fn fingerprint(&self) -> [u8; 32] {
        secret_hash(&self.lookup, &self.secret)
    }
}

/// What the store keeps of a secret. Domain-separated, and salted by the
/// lookup, so that equal secrets under different lookups hash apart.
fn secret_hash(lookup: &str, secret: &str) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(b"agentledger-api-key-1\n");
    hasher.update(lookup.as_bytes());
    hasher.update(b"\n");
    hasher.update(secret.as_bytes());
    hasher.finalize().into()
}

/// Equality in time independent of where the inputs differ.
fn same_hash(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

fn new_secret() -> (String, String) {
    use aes_gcm::aead::rand_core::RngCore;
    let mut lookup = [0u8; 6];
    let mut secret = [0u8; 32];
    aes_gcm::aead::OsRng.fill_bytes(&mut lookup);
    aes_gcm::aead::OsRng.fill_bytes(&mut secret);
    (
        hex::encode(lookup),
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret),
    )
}

fn check_new(key: &NewApiKey) -> Result<(), StoreError> {
    let chars = key.name.chars().count();
    if chars == 0 || chars > MAX_NAME_CHARS || key.name.trim() != key.name {
        return Err(StoreError::BadInput(format!(
            "a key name has 1 to {MAX_NAME_CHARS} characters, without leading or trailing spaces"
        )));
    }
    if key.name.parse::<Uuid>().is_ok() {
        return Err(StoreError::BadInput(
            "a key name may not look like a key id (a UUID): revoke takes either".into(),
        ));
    }
    if key.name.chars().any(char::is_control) {
        return Err(StoreError::BadInput(
            "a key name has no control characters".into(),
        ));
    }
    if key.roles.is_empty() {
        return Err(StoreError::BadInput("a key needs at least one role".into()));
    }
    if key.tenant.is_empty() || key.tenant.len() > 100 || key.tenant.chars().any(char::is_control) {
        return Err(StoreError::BadInput(
            "a tenant has 1 to 100 bytes, without control characters".into(),
        ));
    }
    Ok(())
}

/// Where API keys are kept.
#[async_trait]
pub trait ApiKeys: Send + Sync + 'static {
    /// Creates a key; returns it and its secret (`alk_…`), which is not
    /// kept. A taken name is `BadInput`.
    async fn create(&self, key: NewApiKey) -> Result<(ApiKey, String), StoreError>;
    /// Every key, oldest first.
    async fn list(&self) -> Result<Vec<ApiKey>, StoreError>;
    /// Revokes the key named or numbered `name_or_id`; `None` when there is
    /// none. Revoking a revoked key returns it unchanged.
    async fn revoke(&self, name_or_id: &str) -> Result<Option<ApiKey>, StoreError>;
    /// The key `presented` proves, whatever its state (revoked or expired
    /// keys are returned: the caller decides); `None` when no key matches.
    async fn authenticate(&self, presented: &PresentedKey) -> Result<Option<ApiKey>, StoreError>;
    /// Notes that the key was used at `at`.
    async fn touch(&self, key_id: Uuid, at: DateTime<Utc>) -> Result<(), StoreError>;
}

const COLUMNS: &str =
    "key_id, name, roles, tenant, created_at, expires_at, revoked_at, last_used_at";

fn key_of(row: &tokio_postgres::Row) -> ApiKey {
    ApiKey {
        key_id: row.get(0),
        name: row.get(1),
        roles: row.get(2),
        tenant: row.get(3),
        created_at: row.get(4),
        expires_at: row.get(5),
        revoked_at: row.get(6),
        last_used_at: row.get(7),
    }
}

/// API keys in PostgreSQL. Creating and revoking need the owner role.
#[derive(Clone)]
pub struct PostgresApiKeys {
    pool: Pool,
}

impl PostgresApiKeys {
    pub fn new(pool: Pool) -> Self {
        Self { pool }
    }
}

#[async_trait]
impl ApiKeys for PostgresApiKeys {
    async fn create(&self, key: NewApiKey) -> Result<(ApiKey, String), StoreError> {
        check_new(&key)?;
        let client = self.pool.get().await?;
        // A lookup collision (48 random bits) is retried with a new one.
        for _ in 0..3 {
            let (lookup, secret) = new_secret();
            let hash = secret_hash(&lookup, &secret);
            let row = client
                .query_opt(
                    &format!(
                        "INSERT INTO api_keys (key_id, name, lookup, secret_hash, roles, tenant, expires_at)
                         VALUES ($1, $2, $3, $4, $5, $6, $7)
                         ON CONFLICT (lookup) DO NOTHING
                         RETURNING {COLUMNS}"
                    ),
                    &[
                        &Uuid::now_v7(),
                        &key.name,
                        &lookup,
                        &hash.as_slice(),
                        &key.roles,
                        &key.tenant,
                        &key.expires_at,
                    ],
                )
                .await
                .map_err(|e| match e.as_db_error() {
                    Some(db) if db.constraint() == Some("api_keys_name_key") => {
                        StoreError::BadInput(format!("a key named {:?} exists", key.name))
                    }
                    _ => e.into(),
                })?;
            if let Some(row) = row {
                return Ok((key_of(&row), format!("{KEY_PREFIX}{lookup}_{secret}")));
            }
        }
        Err(StoreError::Contended { attempts: 3 })
    }

    async fn list(&self) -> Result<Vec<ApiKey>, StoreError> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                &format!("SELECT {COLUMNS} FROM api_keys ORDER BY created_at, key_id"),
                &[],
            )
            .await?;
        Ok(rows.iter().map(key_of).collect())
    }

    async fn revoke(&self, name_or_id: &str) -> Result<Option<ApiKey>, StoreError> {
        let client = self.pool.get().await?;
        let id = name_or_id.parse::<Uuid>().ok();
        let row = client
            .query_opt(
                &format!(
                    "UPDATE api_keys SET revoked_at = coalesce(revoked_at, now())
                     WHERE name = $1 OR key_id = $2 RETURNING {COLUMNS}"
                ),
                &[&name_or_id, &id],
            )
            .await?;
        Ok(row.as_ref().map(key_of))
    }

    async fn authenticate(&self, presented: &PresentedKey) -> Result<Option<ApiKey>, StoreError> {
        let client = self.pool.get().await?;
        let row = client
            .query_opt(
                &format!("SELECT {COLUMNS}, secret_hash FROM api_keys WHERE lookup = $1"),
                &[&presented.lookup],
            )
            .await?;
        Ok(row
            .filter(|row| same_hash(row.get::<_, &[u8]>(8), &presented.fingerprint()))
            .as_ref()
            .map(key_of))
    }

    async fn touch(&self, key_id: Uuid, at: DateTime<Utc>) -> Result<(), StoreError> {
        let client = self.pool.get().await?;
        client
            .execute(
                "UPDATE api_keys SET last_used_at = $2
                 WHERE key_id = $1 AND (last_used_at IS NULL OR last_used_at < $2)",
                &[&key_id, &at],
            )
            .await?;
        Ok(())
    }
}

/// API keys in memory (dev mode and tests).
#[derive(Default)]
pub struct InMemoryApiKeys {
    keys: Mutex<Vec<(ApiKey, String, [u8; 32])>>,
}

#[async_trait]
impl ApiKeys for InMemoryApiKeys {
    async fn create(&self, key: NewApiKey) -> Result<(ApiKey, String), StoreError> {
        check_new(&key)?;
        let mut keys = self.keys.lock().expect("api keys lock");
        if keys.iter().any(|(k, _, _)| k.name == key.name) {
            return Err(StoreError::BadInput(format!(
                "a key named {:?} exists",
                key.name
            )));
        }
        let (lookup, secret) = new_secret();
        let record = ApiKey {
            key_id: Uuid::now_v7(),
            name: key.name,
            roles: key.roles,
            tenant: key.tenant,
            created_at: Utc::now(),
            expires_at: key.expires_at,
            revoked_at: None,
            last_used_at: None,
        };
        let hash = secret_hash(&lookup, &secret);
        keys.push((record.clone(), lookup.clone(), hash));
        Ok((record, format!("{KEY_PREFIX}{lookup}_{secret}")))
    }

    async fn list(&self) -> Result<Vec<ApiKey>, StoreError> {
        let keys = self.keys.lock().expect("api keys lock");
        Ok(keys.iter().map(|(k, _, _)| k.clone()).collect())
    }

    async fn revoke(&self, name_or_id: &str) -> Result<Option<ApiKey>, StoreError> {
        let mut keys = self.keys.lock().expect("api keys lock");
        Ok(keys
            .iter_mut()
            .find(|(k, _, _)| k.name == name_or_id || k.key_id.to_string() == name_or_id)
            .map(|(k, _, _)| {
                k.revoked_at.get_or_insert_with(Utc::now);
                k.clone()
            }))
    }

    async fn authenticate(&self, presented: &PresentedKey) -> Result<Option<ApiKey>, StoreError> {
        let keys = self.keys.lock().expect("api keys lock");
        Ok(keys
            .iter()
            .find(|(_, lookup, hash)| {
                *lookup == presented.lookup && same_hash(hash, &presented.fingerprint())
            })
            .map(|(k, _, _)| k.clone()))
    }

    async fn touch(&self, key_id: Uuid, at: DateTime<Utc>) -> Result<(), StoreError> {
        let mut keys = self.keys.lock().expect("api keys lock");
        if let Some((k, _, _)) = keys.iter_mut().find(|(k, _, _)| k.key_id == key_id) {
            k.last_used_at = Some(k.last_used_at.map_or(at, |t| t.max(at)));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_key(name: &str) -> NewApiKey {
        NewApiKey {
            name: name.into(),
            roles: vec!["viewer".into()],
            tenant: "default".into(),
            expires_at: None,
        }
    }

    #[tokio::test]
    async fn a_created_key_authenticates_and_a_changed_secret_does_not() {
        let keys = InMemoryApiKeys::default();
        let (created, secret) = keys.create(new_key("ci")).await.unwrap();
        let presented = PresentedKey::parse(&secret).expect("a key's shape");
        let found = keys.authenticate(&presented).await.unwrap().unwrap();
        assert_eq!(found.key_id, created.key_id);
        // One character of the secret changed.
        let mut forged = secret.clone();
        let last = forged.pop().unwrap();
        forged.push(if last == 'A' { 'B' } else { 'A' });
        let forged = PresentedKey::parse(&forged).unwrap();
        assert_eq!(keys.authenticate(&forged).await.unwrap(), None);
    }

    #[test]
    fn only_the_key_shape_parses_and_debug_hides_the_secret() {
        assert!(PresentedKey::parse("eyJhbGciOiJIUzI1NiJ9.e30.x").is_none());
        assert!(PresentedKey::parse("alk_0123456789ab_short").is_none());
        let secret = format!("alk_0123456789ab_{}", "a".repeat(43));
        let presented = PresentedKey::parse(&secret).unwrap();
        assert!(!format!("{presented:?}").contains("aaaa"));
    }

    #[tokio::test]
    async fn names_are_unique_and_revocation_is_idempotent() {
        let keys = InMemoryApiKeys::default();
        keys.create(new_key("ci")).await.unwrap();
        assert!(matches!(
            keys.create(new_key("ci")).await,
            Err(StoreError::BadInput(_))
        ));
        let first = keys.revoke("ci").await.unwrap().unwrap();
        let again = keys.revoke("ci").await.unwrap().unwrap();
        assert_eq!(first.revoked_at, again.revoked_at);
        assert!(!again.usable_at(Utc::now()));
        assert_eq!(keys.revoke("nobody").await.unwrap(), None);
    }
}
