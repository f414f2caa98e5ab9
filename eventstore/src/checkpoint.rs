//! The ledger's tree head as a C2SP `tlog-checkpoint`, signed as a C2SP
//! `signed-note` with the deployment's Ed25519 key, so that tools written
//! elsewhere (transparency-log verifiers, witnesses) can check it.
//!
//! A checkpoint reads `<origin>\n<tree size>\n<base64 root>\n`, then a
//! blank line and one signature line per key:
//! `— <key name> <base64(key id ‖ signature)>` (U+2014 and a space). The
//! key id is the first four bytes of SHA-256(name ‖ 0x0A ‖ 0x01 ‖ public
//! key); the verifier key, which a checker is given out of band, is
//! `<name>+<hex key id>+<base64(0x01 ‖ public key)>`. The key name is the
//! origin.

use base64::Engine;
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

use crate::tlog::Hash;
use crate::StoreError;

/// Ed25519 in a note's key id and verifier key.
const ALG_ED25519: u8 = 0x01;

/// The origin line must be text without a newline or a `+` (which ends the
/// name in a verifier key) and not empty.
pub fn check_origin(origin: &str) -> Result<(), StoreError> {
    if origin.is_empty()
        || origin.len() > 200
        || origin.contains(['\n', '+', ' ', '\u{2014}'])
        || origin.chars().any(char::is_control)
    {
        return Err(StoreError::BadInput(format!(
            "the checkpoint origin {origin:?} must be 1–200 characters without spaces, '+' or \
             control characters (a schema-less URL such as example.com/ledger)"
        )));
    }
    Ok(())
}

/// The note key id of `public` under `name`.
pub fn key_id(name: &str, public: &VerifyingKey) -> [u8; 4] {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update([b'\n', ALG_ED25519]);
    h.update(public.as_bytes());
    let digest = h.finalize();
    [digest[0], digest[1], digest[2], digest[3]]
}

/// The verifier key a checker of our checkpoints is given.
pub fn verifier_key(name: &str, public: &VerifyingKey) -> String {
    let mut key = vec![ALG_ED25519];
    key.extend_from_slice(public.as_bytes());
    format!(
        "{name}+{}+{}",
        hex::encode(key_id(name, public)),
        base64::engine::general_purpose::STANDARD.encode(key)
    )
}

/// The checkpoint of a tree of `size` leaves with head `root`, signed by
/// `key` under the name `origin`.
pub fn signed_checkpoint(origin: &str, size: u64, root: &Hash, key: &SigningKey) -> String {
    let b64 = base64::engine::general_purpose::STANDARD;
    let body = format!("{origin}\n{size}\n{}\n", b64.encode(root));
    let signature = key.sign(body.as_bytes());
    let mut blob = key_id(origin, &key.verifying_key()).to_vec();
    blob.extend_from_slice(&signature.to_bytes());
    format!("{body}\n\u{2014} {origin} {}\n", b64.encode(blob))
}
