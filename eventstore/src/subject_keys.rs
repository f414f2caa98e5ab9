//! Data-subject keys for crypto-shredding, kept apart from the events
//! (`subject_keys`, migration V4). One AES-256 key per subject, named by a
//! random key id; events name the key id only, never the subject. Forgetting
//! a subject deletes its key and vacuums the table, so the dead row does not
//! linger in the table's pages (WAL archives and backups still hold it until
//! they expire: docs/audit.md).

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;
use deadpool_postgres::Pool;
use uuid::Uuid;

use crate::StoreError;

/// Longest subject id, in bytes.
pub const MAX_SUBJECT_ID_BYTES: usize = 256;

/// What forgetting a subject did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forgotten {
    /// The destroyed key's id (`None`: the subject had no key).
    pub key_id: Option<Uuid>,
    /// Whether the key table was vacuumed after the delete.
    pub vacuumed: bool,
}

/// Where subject keys are kept. Subject ids are compared after
/// [`normalize_subject`] (NFC, trimmed): `김민수` typed on any keyboard is
/// one subject.
#[async_trait]
pub trait SubjectKeys: Send + Sync + 'static {
    /// The subject's key, created on first use.
    async fn key_for(&self, subject: &str) -> Result<(Uuid, [u8; 32]), StoreError>;
    /// The id of the subject's key, if it has one (nothing is created).
    async fn find(&self, subject: &str) -> Result<Option<Uuid>, StoreError>;
    /// The keys among `ids` that still exist.
    async fn secrets(&self, ids: &[Uuid]) -> Result<HashMap<Uuid, [u8; 32]>, StoreError>;
    /// Destroys the subject's key: whatever it sealed cannot be read again.
    async fn forget(&self, subject: &str) -> Result<Forgotten, StoreError>;
}

/// Where tenant and subject meet in a filed id (a control character, which
/// subject ids may not hold).
const TENANT_SEPARATOR: char = '\u{1f}';

/// The id a tenant's subject is filed under: the subject itself in the
/// default tenant (as before tenants existed), else `tenant ‖ U+001F ‖
/// subject`, so that two tenants' subjects of one name have two keys and
/// forgetting one leaves the other.
pub fn filed_subject(tenant: &str, subject: &str) -> Result<String, StoreError> {
    let subject = normalize_subject(subject)?;
    Ok(if tenant == "default" {
        subject
    } else {
        format!("{tenant}{TENANT_SEPARATOR}{subject}")
    })
}

/// A filed id as the store takes it: NFC, trimmed, not empty, at most
/// twice [`MAX_SUBJECT_ID_BYTES`] (tenant and subject), no NUL.
pub(crate) fn normalize_filed(filed: &str) -> Result<String, StoreError> {
    use unicode_normalization::UnicodeNormalization;
    let filed: String = filed.trim().nfc().collect();
    if filed.is_empty() || filed.len() > 2 * MAX_SUBJECT_ID_BYTES || filed.contains('\0') {
        return Err(StoreError::BadInput(
            "a subject id is 1 to 256 bytes of text".into(),
        ));
    }
    Ok(filed)
}

/// The subject id as keys are filed under: Unicode NFC, trimmed. Refuses
/// empty, oversized or control-character-carrying ids.
pub fn normalize_subject(subject: &str) -> Result<String, StoreError> {
    use unicode_normalization::UnicodeNormalization;
    let subject: String = subject.trim().nfc().collect();
    if subject.is_empty() {
        return Err(StoreError::BadInput("the subject id is empty".into()));
    }
    if subject.len() > MAX_SUBJECT_ID_BYTES {
        return Err(StoreError::BadInput(format!(
            "the subject id is longer than {MAX_SUBJECT_ID_BYTES} bytes"
        )));
    }
    if subject.chars().any(char::is_control) {
        return Err(StoreError::BadInput(
            "the subject id contains a control character".into(),
        ));
    }
    Ok(subject)
}

pub(crate) fn new_key() -> [u8; 32] {
    use aes_gcm::aead::rand_core::RngCore;
    let mut key = [0u8; 32];
    aes_gcm::aead::OsRng.fill_bytes(&mut key);
    key
}

fn key_of(bytes: Vec<u8>) -> Result<[u8; 32], StoreError> {
    <[u8; 32]>::try_from(bytes).map_err(|_| StoreError::Corrupt {
        position: 0,
        reason: "subject_keys: a key is not 32 bytes".into(),
    })
}

/// Subject keys in PostgreSQL.
#[derive(Clone)]
pub struct PostgresSubjectKeys {
    pool: Pool,
}

impl PostgresSubjectKeys {
    pub fn new(pool: Pool) -> Self {
        Self { pool }
    }
}

#[async_trait]
impl SubjectKeys for PostgresSubjectKeys {
    async fn key_for(&self, subject: &str) -> Result<(Uuid, [u8; 32]), StoreError> {
        let subject = normalize_filed(subject)?;
        let client = self.pool.get().await?;
        // Concurrent first uses race on the unique subject id: one insert
        // wins, every caller reads the winner's key. A forget between the
        // two statements leaves nothing to read: insert again.
        for _ in 0..3 {
            client
                .execute(
                    "INSERT INTO subject_keys (key_id, subject_id, secret) VALUES ($1, $2, $3)
                     ON CONFLICT (subject_id) DO NOTHING",
                    &[&Uuid::new_v4(), &subject, &new_key().as_slice()],
                )
                .await?;
            if let Some(row) = client
                .query_opt(
                    "SELECT key_id, secret FROM subject_keys WHERE subject_id = $1",
                    &[&subject],
                )
                .await?
            {
                return Ok((row.get(0), key_of(row.get(1))?));
            }
        }
        Err(StoreError::Contended { attempts: 3 })
    }

    async fn find(&self, subject: &str) -> Result<Option<Uuid>, StoreError> {
        let subject = normalize_filed(subject)?;
        let client = self.pool.get().await?;
        Ok(client
            .query_opt(
                "SELECT key_id FROM subject_keys WHERE subject_id = $1",
                &[&subject],
            )
            .await?
            .map(|row| row.get(0)))
    }

    async fn secrets(&self, ids: &[Uuid]) -> Result<HashMap<Uuid, [u8; 32]>, StoreError> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT key_id, secret FROM subject_keys WHERE key_id = ANY($1)",
                &[&ids],
            )
            .await?;
        rows.into_iter()
            .map(|row| Ok((row.get(0), key_of(row.get(1))?)))
            .collect()
    }

    async fn forget(&self, subject: &str) -> Result<Forgotten, StoreError> {
        let subject = normalize_filed(subject)?;
        let client = self.pool.get().await?;
        let key_id: Option<Uuid> = client
            .query_opt(
                "DELETE FROM subject_keys WHERE subject_id = $1 RETURNING key_id",
                &[&subject],
            )
            .await?
            .map(|row| row.get(0));
        // PostgreSQL 15 skips (with a warning) a VACUUM by a role that does
        // not own the table: ask first, so the answer is true.
        let may_vacuum: bool = client
            .query_one(
                "SELECT pg_has_role(current_user, c.relowner, 'USAGE')
                     OR (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
                 FROM pg_class c WHERE c.oid = 'subject_keys'::regclass",
                &[],
            )
            .await?
            .get(0);
        // The key is gone for every reader once the DELETE commits; the
        // vacuum removes the dead row version from the table's pages (not
        // while an older snapshot, e.g. a running pg_dump, can still see it;
        // autovacuum, set to act on any dead row here, retries).
        let vacuumed = may_vacuum
            && match client.batch_execute("VACUUM subject_keys").await {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(error = %e, "VACUUM subject_keys failed; autovacuum will remove the dead row");
                    false
                }
            };
        if !may_vacuum {
            tracing::warn!(
                "subject_keys is not owned by this role: the deleted key stays in a dead row until autovacuum"
            );
        }
        Ok(Forgotten { key_id, vacuumed })
    }
}

/// Subject keys in process memory (dev mode).
#[derive(Default)]
pub struct InMemorySubjectKeys {
    keys: Mutex<HashMap<String, (Uuid, [u8; 32])>>,
}

#[async_trait]
impl SubjectKeys for InMemorySubjectKeys {
    async fn key_for(&self, subject: &str) -> Result<(Uuid, [u8; 32]), StoreError> {
        let subject = normalize_filed(subject)?;
        let mut keys = self.keys.lock().expect("not poisoned");
        Ok(*keys
            .entry(subject)
            .or_insert_with(|| (Uuid::new_v4(), new_key())))
    }

    async fn find(&self, subject: &str) -> Result<Option<Uuid>, StoreError> {
        let subject = normalize_filed(subject)?;
        let keys = self.keys.lock().expect("not poisoned");
        Ok(keys.get(&subject).map(|(id, _)| *id))
    }

    async fn secrets(&self, ids: &[Uuid]) -> Result<HashMap<Uuid, [u8; 32]>, StoreError> {
        let keys = self.keys.lock().expect("not poisoned");
        Ok(keys
            .values()
            .filter(|(id, _)| ids.contains(id))
            .copied()
            .collect())
    }

    async fn forget(&self, subject: &str) -> Result<Forgotten, StoreError> {
        let subject = normalize_filed(subject)?;
        let removed = self.keys.lock().expect("not poisoned").remove(&subject);
        Ok(Forgotten {
            key_id: removed.map(|(id, _)| id),
            vacuumed: true,
        })
    }
}
