//! Signed ledger digests (design §8): the tree head of [`crate::digest`] at
//! a position, signed with the deployment's Ed25519 key. A reviewer keeps
//! digests (and the public key) outside the system; later,
//! [`check_digest`] proves that the history up to that position is unchanged.
//!
//! The key lives in the database (`ledger_keys`, migration V4), one active
//! key per deployment, created on first use under an advisory lock so that
//! several nodes starting at once agree on one. Rotation retires the active
//! key (its secret half is wiped) and keeps its public half for verifying
//! the digests it signed.
//!
//! The signed message is fixed bytes, not JSON, so that no encoding choice
//! can change what a signature means:
//! `"agentledger-digest-1\n" ‖ position (u64 BE) ‖ events (u64 BE) ‖ root (32) ‖ signed_at (µs since the epoch, i64 BE)`.

use std::sync::Mutex;

use async_trait::async_trait;
use chrono::{DateTime, SubsecRound, Utc};
use deadpool_postgres::Pool;
/// An Ed25519 signing key (the ledger key's secret half).
pub use ed25519_dalek::SigningKey;
use ed25519_dalek::{Signature, Signer as _, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::digest::check_ledger;
use crate::{EventStore, Position, StoreError};

/// The `format` of a digest this build writes and reads.
pub const DIGEST_FORMAT: &str = "agentledger-digest-1";

/// One signing key of the deployment, public half only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerKey {
    /// `ed25519:` and the first 16 hex digits of SHA-256(public key).
    pub key_id: String,
    pub algorithm: String,
    /// 32 bytes, hex.
    pub public_key: String,
    pub created_at: DateTime<Utc>,
    /// Set once rotated away: it no longer signs, it still verifies.
    pub retired_at: Option<DateTime<Utc>>,
}

/// A signed statement: "the ledger up to `position` has tree head `root`".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedDigest {
    pub format: String,
    /// The last position covered (every event with a position ≤ it).
    pub position: Position,
    /// How many events that is (positions can have holes).
    pub events: u64,
    /// The RFC 6962 tree head, hex.
    pub root: String,
    pub signed_at: DateTime<Utc>,
    pub key_id: String,
    /// The signing key's public half, hex (compare it with a copy kept apart).
    pub public_key: String,
    /// Ed25519 over [`SignedDigest::message`], hex.
    pub signature: String,
}

/// Why a digest does not hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    #[error("not a digest this build reads: {0}")]
    Malformed(String),
    #[error("the ledger itself is broken at position {position}: {reason}")]
    Broken { position: Position, reason: String },
    #[error("the signature does not match the digest and its public key")]
    BadSignature,
    #[error("signed by key {key_id}, which {why}")]
    UntrustedKey { key_id: String, why: String },
    #[error(
        "the ledger up to position {position} has changed: the digest covers {signed_events} events with head {signed_root}, the ledger now has {events} events with head {root}"
    )]
    Changed {
        position: Position,
        signed_events: u64,
        signed_root: String,
        events: u64,
        root: String,
    },
}

fn key_id_of(public: &VerifyingKey) -> String {
    let hash = Sha256::digest(public.as_bytes());
    format!("ed25519:{}", hex::encode(&hash[..8]))
}

fn message(position: Position, events: u64, root: &[u8; 32], signed_at: DateTime<Utc>) -> Vec<u8> {
    let mut m = Vec::with_capacity(DIGEST_FORMAT.len() + 1 + 8 + 8 + 32 + 8);
    m.extend_from_slice(DIGEST_FORMAT.as_bytes());
    m.push(b'\n');
    m.extend_from_slice(&position.to_be_bytes());
    m.extend_from_slice(&events.to_be_bytes());
    m.extend_from_slice(root);
    m.extend_from_slice(&signed_at.timestamp_micros().to_be_bytes());
    m
}

fn hex32(what: &str, text: &str) -> Result<[u8; 32], DigestError> {
    hex::decode(text)
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .ok_or_else(|| DigestError::Malformed(format!("{what} is not 32 bytes of hex")))
}

impl SignedDigest {
    /// Checks the format and that the signature is the public key's over
    /// this digest's fields. Says nothing yet about the ledger, nor about
    /// whether the public key is the deployment's: see [`check_digest`].
    pub fn check_signature(&self) -> Result<(), DigestError> {
        if self.format != DIGEST_FORMAT {
            return Err(DigestError::Malformed(format!(
                "format {:?}, expected {DIGEST_FORMAT:?}",
                self.format
            )));
        }
        let public = VerifyingKey::from_bytes(&hex32("public_key", &self.public_key)?)
            .map_err(|_| DigestError::Malformed("public_key is not an Ed25519 key".into()))?;
        if key_id_of(&public) != self.key_id {
            return Err(DigestError::Malformed(format!(
                "key_id {} does not name public_key",
                self.key_id
            )));
        }
        let signature = hex::decode(&self.signature)
            .ok()
            .and_then(|b| <[u8; 64]>::try_from(b).ok())
            .map(|b| Signature::from_bytes(&b))
            .ok_or_else(|| DigestError::Malformed("signature is not 64 bytes of hex".into()))?;
        let root = hex32("root", &self.root)?;
        // Strict: refuses small-order keys and non-canonical signatures.
        public
            .verify_strict(
                &message(self.position, self.events, &root, self.signed_at),
                &signature,
            )
            .map_err(|_| DigestError::BadSignature)
    }
}

/// Where the deployment's signing keys are kept.
#[async_trait]
pub trait LedgerKeys: Send + Sync {
    /// The active key, created when there is none.
    async fn active(&self) -> Result<(String, SigningKey), StoreError>;
    /// Every key ever used, active first, then newest first.
    async fn public_keys(&self) -> Result<Vec<LedgerKey>, StoreError>;
    /// Retires the active key (wiping its secret half) and creates a new one.
    async fn rotate(&self) -> Result<LedgerKey, StoreError>;
}

/// A new Ed25519 key from the operating system's random source.
pub fn new_signing_key() -> SigningKey {
    generate()
}

pub(crate) fn generate() -> SigningKey {
    use aes_gcm::aead::rand_core::RngCore;
    let mut seed = [0u8; 32];
    aes_gcm::aead::OsRng.fill_bytes(&mut seed);
    SigningKey::from_bytes(&seed)
}

pub(crate) fn public_of(key: &SigningKey, created_at: DateTime<Utc>) -> LedgerKey {
    let public = key.verifying_key();
    LedgerKey {
        key_id: key_id_of(&public),
        algorithm: "ed25519".into(),
        public_key: hex::encode(public.as_bytes()),
        created_at,
        retired_at: None,
    }
}

/// Signs the tree head at `at` (default: the head position) with the active key.
pub async fn sign_ledger(
    store: &dyn EventStore,
    keys: &dyn LedgerKeys,
    at: Option<Position>,
) -> Result<SignedDigest, StoreError> {
    let head = store.head_position().await?;
    let position = match at {
        Some(p) if p > head => {
            return Err(StoreError::BadInput(format!(
                "position {p} is beyond the ledger's head {head}"
            )))
        }
        Some(p) => p,
        None => head,
    };
    // Sign only what verifies: a head over altered events would vouch for them.
    let check = check_ledger(store, position, |_, _| {}).await?;
    if let Some(broken) = check.verification.first_broken_position {
        return Err(StoreError::Corrupt {
            position: broken,
            reason: format!(
                "the ledger does not verify ({}); refusing to sign it",
                check.verification.reason.unwrap_or_default()
            ),
        });
    }
    let (root, events) = (check.root, check.events);
    let (key_id, key) = keys.active().await?;
    // Microseconds: what the signed message and Postgres keep.
    let signed_at = Utc::now().trunc_subsecs(6);
    let signature = key.sign(&message(position, events, &root, signed_at));
    Ok(SignedDigest {
        format: DIGEST_FORMAT.into(),
        position,
        events,
        root: hex::encode(root),
        signed_at,
        key_id,
        public_key: hex::encode(key.verifying_key().as_bytes()),
        signature: hex::encode(signature.to_bytes()),
    })
}

/// Proves `digest` against the ledger as it is now: the signature holds, the
/// key is `trusted` (a public key kept apart, hex) or, without one, a key of
/// this deployment, every chain up to its position recomputes from content,
/// and the tree head over them is the signed one. `progress` as in
/// [`check_ledger`].
pub async fn check_digest(
    store: &dyn EventStore,
    keys: &dyn LedgerKeys,
    digest: &SignedDigest,
    trusted: Option<&str>,
    progress: impl FnMut(Position, Position),
) -> Result<Result<(), DigestError>, StoreError> {
    if let Err(e) = digest.check_signature() {
        return Ok(Err(e));
    }
    let untrusted = |why: &str| {
        Ok(Err(DigestError::UntrustedKey {
            key_id: digest.key_id.clone(),
            why: why.into(),
        }))
    };
    let same_key = |public: &str| public.trim().eq_ignore_ascii_case(&digest.public_key);
    match trusted {
        Some(public) if !same_key(public) => {
            return untrusted("is not the trusted public key given");
        }
        Some(_) => {}
        None => {
            let known = keys.public_keys().await?;
            // A retired key's secret is wiped, but may survive in backups:
            // what it "signed" after its retirement is not trusted. The
            // margin covers a rotation racing a signature.
            let margin = chrono::Duration::seconds(5);
            match known.iter().find(|k| k.key_id == digest.key_id) {
                None => return untrusted("this deployment never had"),
                Some(k) if !same_key(&k.public_key) => {
                    return untrusted("this deployment knows with another public key")
                }
                Some(k) if digest.signed_at + margin < k.created_at => {
                    return untrusted("was created after the digest's signed_at")
                }
                Some(k) if k.retired_at.is_some_and(|r| digest.signed_at > r + margin) => {
                    return untrusted("was retired before the digest's signed_at")
                }
                Some(_) => {}
            }
        }
    }
    let head = store.head_position().await?;
    if digest.position > head {
        return Ok(Err(DigestError::Changed {
            position: digest.position,
            signed_events: digest.events,
            signed_root: digest.root.clone(),
            events: ledger_len(store, head).await?,
            root: format!("(none: the ledger ends at position {head})"),
        }));
    }
    let check = check_ledger(store, digest.position, progress).await?;
    if let Some(position) = check.verification.first_broken_position {
        return Ok(Err(DigestError::Broken {
            position,
            reason: check.verification.reason.unwrap_or_default(),
        }));
    }
    let (root, events) = (hex::encode(check.root), check.events);
    if !root.eq_ignore_ascii_case(&digest.root) || events != digest.events {
        return Ok(Err(DigestError::Changed {
            position: digest.position,
            signed_events: digest.events,
            signed_root: digest.root.clone(),
            events,
            root,
        }));
    }
    Ok(Ok(()))
}

/// How many events the ledger holds up to `head` (for a digest beyond it).
async fn ledger_len(store: &dyn EventStore, head: Position) -> Result<u64, StoreError> {
    crate::scan(store, head, 0u64, |n, _| *n += 1, |_, _| {}).await
}

/// The keys in PostgreSQL (`ledger_keys`).
///
/// The public halves are read with the service's pool; the secret half is
/// read, and keys are created and rotated, with the owner's (`signer`): the
/// service role may read public keys only (migration V6).
#[derive(Clone)]
pub struct PostgresLedgerKeys {
    pool: Pool,
    signer: Pool,
}

/// Serialises key creation across nodes: `hashtext('agentledger_ledger_keys')`.
const KEY_LOCK: &str = "SELECT pg_advisory_xact_lock(hashtext('agentledger_ledger_keys'))";

impl PostgresLedgerKeys {
    /// Keys read and signed with one pool (the owner role's: tools, tests).
    pub fn new(pool: Pool) -> Self {
        Self {
            signer: pool.clone(),
            pool,
        }
    }

    /// Public keys read with the service's `pool`, signing with the owner's
    /// `signer`.
    pub fn with_signer(pool: Pool, signer: Pool) -> Self {
        Self { pool, signer }
    }

    async fn insert(
        tx: &deadpool_postgres::Transaction<'_>,
    ) -> Result<(LedgerKey, SigningKey), StoreError> {
        let key = generate();
        let row = tx
            .query_one(
                "INSERT INTO ledger_keys (key_id, algorithm, public_key, secret_key)
                 VALUES ($1, 'ed25519', $2, $3) RETURNING created_at",
                &[
                    &key_id_of(&key.verifying_key()),
                    &key.verifying_key().as_bytes().as_slice(),
                    &key.to_bytes().as_slice(),
                ],
            )
            .await?;
        Ok((public_of(&key, row.get(0)), key))
    }
}

#[async_trait]
impl LedgerKeys for PostgresLedgerKeys {
    async fn active(&self) -> Result<(String, SigningKey), StoreError> {
        let read = "SELECT key_id, secret_key FROM ledger_keys WHERE retired_at IS NULL";
        let parse = |row: tokio_postgres::Row| -> Result<(String, SigningKey), StoreError> {
            let secret: Vec<u8> = row.get(1);
            let secret = <[u8; 32]>::try_from(secret).map_err(|_| StoreError::Corrupt {
                position: 0,
                reason: "ledger_keys: a secret key is not 32 bytes".into(),
            })?;
            Ok((row.get(0), SigningKey::from_bytes(&secret)))
        };
        let mut client = self.signer.get().await?;
        if let Some(row) = client.query_opt(read, &[]).await? {
            return parse(row);
        }
        let tx = client.transaction().await?;
        tx.execute(KEY_LOCK, &[]).await?;
        let found = tx.query_opt(read, &[]).await?;
        let (id, key) = match found {
            Some(row) => parse(row)?,
            None => {
                let (public, key) = Self::insert(&tx).await?;
                tracing::info!(key_id = %public.key_id, "created the ledger signing key");
                (public.key_id, key)
            }
        };
        tx.commit().await?;
        Ok((id, key))
    }

    async fn public_keys(&self) -> Result<Vec<LedgerKey>, StoreError> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT key_id, algorithm, public_key, created_at, retired_at FROM ledger_keys
                 ORDER BY retired_at IS NOT NULL, created_at DESC",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|row| LedgerKey {
                key_id: row.get(0),
                algorithm: row.get(1),
                public_key: hex::encode(row.get::<_, Vec<u8>>(2)),
                created_at: row.get(3),
                retired_at: row.get(4),
            })
            .collect())
    }

    async fn rotate(&self) -> Result<LedgerKey, StoreError> {
        let mut client = self.signer.get().await?;
        let tx = client.transaction().await?;
        tx.execute(KEY_LOCK, &[]).await?;
        tx.execute(
            "UPDATE ledger_keys SET retired_at = now(), secret_key = NULL WHERE retired_at IS NULL",
            &[],
        )
        .await?;
        let (public, _) = Self::insert(&tx).await?;
        tx.commit().await?;
        tracing::info!(key_id = %public.key_id, "rotated the ledger signing key");
        Ok(public)
    }
}

/// Keys held in process memory (dev mode): a new deployment key per process.
#[derive(Default)]
pub struct InMemoryLedgerKeys {
    keys: Mutex<Vec<(LedgerKey, Option<SigningKey>)>>,
}

#[async_trait]
impl LedgerKeys for InMemoryLedgerKeys {
    async fn active(&self) -> Result<(String, SigningKey), StoreError> {
        let mut keys = self.keys.lock().expect("not poisoned");
        if let Some((public, Some(key))) = keys.last() {
            return Ok((public.key_id.clone(), key.clone()));
        }
        let key = generate();
        let public = public_of(&key, Utc::now().trunc_subsecs(6));
        keys.push((public.clone(), Some(key.clone())));
        Ok((public.key_id, key))
    }

    async fn public_keys(&self) -> Result<Vec<LedgerKey>, StoreError> {
        let keys = self.keys.lock().expect("not poisoned");
        Ok(keys
            .iter()
            .rev()
            .map(|(public, _)| public.clone())
            .collect())
    }

    async fn rotate(&self) -> Result<LedgerKey, StoreError> {
        let mut keys = self.keys.lock().expect("not poisoned");
        let now = Utc::now().trunc_subsecs(6);
        for (public, secret) in keys.iter_mut().filter(|(p, _)| p.retired_at.is_none()) {
            public.retired_at = Some(now);
            *secret = None;
        }
        let key = generate();
        let public = public_of(&key, now);
        keys.push((public.clone(), Some(key)));
        Ok(public)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Actor, ExpectedVersion, InMemoryEventStore, Metadata, NewEvent, StreamId};

    async fn ledger(n: usize) -> InMemoryEventStore {
        let store = InMemoryEventStore::default();
        for i in 0..n {
            let stream = StreamId::new(format!("s-{}", i % 3)).unwrap();
            let event = NewEvent::new(
                "Noted",
                serde_json::json!({"i": i, "text": "기록"}),
                Metadata::new(Actor::system()),
            );
            store
                .append(&stream, ExpectedVersion::Any, vec![event])
                .await
                .unwrap();
        }
        store
    }

    #[tokio::test]
    async fn a_digest_verifies_and_any_changed_field_breaks_it() {
        let store = ledger(10).await;
        let keys = InMemoryLedgerKeys::default();
        let digest = sign_ledger(&store, &keys, Some(7)).await.unwrap();
        assert_eq!((digest.position, digest.events), (7, 7));
        assert_eq!(
            check_digest(&store, &keys, &digest, None, |_, _| {})
                .await
                .unwrap(),
            Ok(())
        );
        // Through JSON and back, as a reviewer keeps it.
        let kept: SignedDigest =
            serde_json::from_str(&serde_json::to_string(&digest).unwrap()).unwrap();
        assert_eq!(kept.check_signature(), Ok(()));

        let mut other = digest.clone();
        other.position = 8;
        assert_eq!(other.check_signature(), Err(DigestError::BadSignature));
        let mut other = digest.clone();
        other.signed_at += chrono::Duration::microseconds(1);
        assert_eq!(other.check_signature(), Err(DigestError::BadSignature));
        let mut other = digest.clone();
        other.root = hex::encode([0u8; 32]);
        assert_eq!(other.check_signature(), Err(DigestError::BadSignature));
        // Re-signed with another key: the signature holds, the key is not ours.
        let forger = InMemoryLedgerKeys::default();
        let forged = sign_ledger(&store, &forger, Some(7)).await.unwrap();
        assert!(matches!(
            check_digest(&store, &keys, &forged, None, |_, _| {})
                .await
                .unwrap(),
            Err(DigestError::UntrustedKey { .. })
        ));
        assert!(matches!(
            check_digest(
                &store,
                &forger,
                &digest,
                Some(&forged.public_key),
                |_, _| {}
            )
            .await
            .unwrap(),
            Err(DigestError::UntrustedKey { .. })
        ));
    }

    #[tokio::test]
    async fn rotation_keeps_old_digests_verifiable() {
        let store = ledger(4).await;
        let keys = InMemoryLedgerKeys::default();
        let before = sign_ledger(&store, &keys, None).await.unwrap();
        let new = keys.rotate().await.unwrap();
        let after = sign_ledger(&store, &keys, None).await.unwrap();
        assert_ne!(before.key_id, after.key_id);
        assert_eq!(after.key_id, new.key_id);
        let listed = keys.public_keys().await.unwrap();
        assert_eq!(listed.len(), 2);
        assert!(listed[0].retired_at.is_none() && listed[1].retired_at.is_some());
        assert_eq!(
            check_digest(&store, &keys, &before, None, |_, _| {})
                .await
                .unwrap(),
            Ok(())
        );
        assert_eq!(
            check_digest(&store, &keys, &after, None, |_, _| {})
                .await
                .unwrap(),
            Ok(())
        );
    }

    #[tokio::test]
    async fn a_digest_beyond_the_ledger_or_after_its_keys_retirement_fails() {
        let store = ledger(6).await;
        let keys = InMemoryLedgerKeys::default();
        let digest = sign_ledger(&store, &keys, None).await.unwrap();
        let longer = ledger(8).await;
        let shorter = ledger(4).await;
        // Checked against a ledger that is now shorter: the same events
        // cannot be there (signed by a key this deployment lists).
        assert!(matches!(
            check_digest(
                &shorter,
                &keys,
                &digest,
                Some(&digest.public_key),
                |_, _| {}
            )
            .await
            .unwrap(),
            Err(DigestError::Changed { events: 4, .. })
        ));
        assert!(matches!(
            check_digest(&longer, &keys, &digest, Some(&digest.public_key), |_, _| {})
                .await
                .unwrap(),
            Err(DigestError::Changed { .. })
        ));
        // Uppercase hex is the same digest.
        let mut upper = digest.clone();
        upper.root = upper.root.to_uppercase();
        upper.public_key = upper.public_key.to_uppercase();
        assert_eq!(
            check_digest(&store, &keys, &upper, None, |_, _| {})
                .await
                .unwrap(),
            Ok(())
        );
        // Signed "after" the key was retired (by someone who kept its
        // secret from before the rotation): not trusted.
        let (_, old_secret) = keys.active().await.unwrap();
        keys.rotate().await.unwrap();
        let retired = keys.public_keys().await.unwrap()[1].retired_at.unwrap();
        let mut late = digest.clone();
        late.signed_at = retired + chrono::Duration::seconds(60);
        let root = hex32("root", &late.root).unwrap();
        late.signature = hex::encode(
            old_secret
                .sign(&message(late.position, late.events, &root, late.signed_at))
                .to_bytes(),
        );
        assert_eq!(late.check_signature(), Ok(()), "a valid signature");
        assert!(matches!(
            check_digest(&store, &keys, &late, None, |_, _| {})
                .await
                .unwrap(),
            Err(DigestError::UntrustedKey { .. })
        ));
        assert_eq!(
            check_digest(&store, &keys, &digest, None, |_, _| {})
                .await
                .unwrap(),
            Ok(()),
            "what it signed before its retirement still verifies"
        );
    }

    #[tokio::test]
    async fn a_position_beyond_the_head_is_refused() {
        let store = ledger(2).await;
        let keys = InMemoryLedgerKeys::default();
        assert!(matches!(
            sign_ledger(&store, &keys, Some(3)).await,
            Err(StoreError::BadInput(_))
        ));
    }
}
