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

/// What a verified checkpoint says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    pub origin: String,
    pub size: u64,
    pub root: Hash,
}

/// Checks `note` (a signed checkpoint) against the verifier key `vkey`
/// (`name+hex key id+base64(0x01 ‖ key)`): a signature line by that key
/// must verify over the body, and the body must be a checkpoint whose
/// origin is the key's name.
pub fn verify_checkpoint(note: &str, vkey: &str) -> Result<Checked, String> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut parts = vkey.splitn(3, '+');
    let (Some(name), Some(id_hex), Some(key_b64)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(format!("{vkey:?} is not a note verifier key (name+id+key)"));
    };
    let key = b64
        .decode(key_b64)
        .map_err(|e| format!("the verifier key's key is not base64: {e}"))?;
    let public: [u8; 32] = match key.split_first() {
        Some((&ALG_ED25519, rest)) => rest
            .try_into()
            .map_err(|_| "the verifier key is not an Ed25519 key".to_string())?,
        _ => return Err("the verifier key is not an Ed25519 key".into()),
    };
    let public = VerifyingKey::from_bytes(&public).map_err(|e| e.to_string())?;
    let id = key_id(name, &public);
    if hex::encode(id) != id_hex {
        return Err("the verifier key's id does not match its key".into());
    }
    let Some(body) = note_body(note) else {
        return Err("the checkpoint has no signature lines".into());
    };
    let signatures = &note[body.len() + 1..];
    let prefix = format!("\u{2014} {name} ");
    let signed = signatures
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .any(|blob| {
            let Ok(blob) = b64.decode(blob) else {
                return false;
            };
            blob.len() == 68
                && blob[..4] == id
                && ed25519_dalek::Signature::from_slice(&blob[4..])
                    .is_ok_and(|sig| public.verify_strict(body.as_bytes(), &sig).is_ok())
        });
    if !signed {
        return Err(format!(
            "the checkpoint carries no valid signature by {name}"
        ));
    }
    let mut lines = body.lines();
    let (Some(origin), Some(size), Some(root)) = (lines.next(), lines.next(), lines.next()) else {
        return Err("the checkpoint's body is not origin, size and root".into());
    };
    if origin != name {
        return Err(format!(
            "the checkpoint is for {origin:?}, the key for {name:?}"
        ));
    }
    let size: u64 = size
        .parse()
        .map_err(|_| format!("the checkpoint's size {size:?} is not a number"))?;
    let root: Hash = b64
        .decode(root)
        .ok()
        .and_then(|r| r.try_into().ok())
        .ok_or("the checkpoint's root is not 32 bytes of base64")?;
    Ok(Checked {
        origin: origin.to_string(),
        size,
        root,
    })
}

/// A witness's cosignature key type (C2SP `tlog-cosignature`).
const ALG_COSIGNATURE_V1: u8 = 0x04;

/// The key id of a witness's cosigning key `public` under `name`.
pub fn cosigner_key_id(name: &str, public: &VerifyingKey) -> [u8; 4] {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update([b'\n', ALG_COSIGNATURE_V1]);
    h.update(public.as_bytes());
    let digest = h.finalize();
    [digest[0], digest[1], digest[2], digest[3]]
}

/// A witness's verifier key: `name+hex key id+base64(0x04 ‖ key)`.
pub fn cosigner_verifier_key(name: &str, public: &VerifyingKey) -> String {
    let mut key = vec![ALG_COSIGNATURE_V1];
    key.extend_from_slice(public.as_bytes());
    format!(
        "{name}+{}+{}",
        hex::encode(cosigner_key_id(name, public)),
        base64::engine::general_purpose::STANDARD.encode(key)
    )
}

/// The cosignature line (C2SP `tlog-cosignature`, `cosignature/v1`) of the
/// checkpoint `body` by witness `name`, at `timestamp` (Unix seconds).
pub fn cosign(name: &str, key: &SigningKey, body: &str, timestamp: u64) -> String {
    let message = format!("cosignature/v1\ntime {timestamp}\n{body}");
    let signature = key.sign(message.as_bytes());
    let mut blob = cosigner_key_id(name, &key.verifying_key()).to_vec();
    blob.extend_from_slice(&timestamp.to_be_bytes());
    blob.extend_from_slice(&signature.to_bytes());
    format!(
        "\u{2014} {name} {}\n",
        base64::engine::general_purpose::STANDARD.encode(blob)
    )
}

/// Checks that `vkey` is a witness's verifier key (`name+keyid+base64`,
/// type `cosignature/v1`): its name and public key.
pub fn parse_cosigner_key(vkey: &str) -> Result<(String, VerifyingKey), String> {
    let mut parts = vkey.splitn(3, '+');
    let (Some(name), Some(id), Some(key)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(format!("{vkey:?} is not NAME+KEYID+KEY"));
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(key)
        .map_err(|_| format!("{vkey:?}: the key is not base64"))?;
    let (Some(&ALG_COSIGNATURE_V1), Ok(public)) = (
        bytes.first(),
        <[u8; 32]>::try_from(&bytes[1.min(bytes.len())..]),
    ) else {
        return Err(format!("{vkey:?} is not a cosignature/v1 Ed25519 key"));
    };
    let public = VerifyingKey::from_bytes(&public)
        .map_err(|_| format!("{vkey:?}: not an Ed25519 public key"))?;
    if hex::encode(cosigner_key_id(name, &public)) != id {
        return Err(format!(
            "{vkey:?}: the key id does not match its name and key"
        ));
    }
    Ok((name.to_string(), public))
}

/// Checks one cosignature line (`— name base64(keyid ‖ time ‖ signature)`)
/// of the checkpoint `body` under the witness's verifier key `vkey`;
/// returns when it was made (Unix seconds).
pub fn verify_cosignature(body: &str, line: &str, vkey: &str) -> Result<u64, String> {
    let (name, public) = parse_cosigner_key(vkey)?;
    let rest = line
        .trim_end_matches('\n')
        .strip_prefix("\u{2014} ")
        .ok_or("not a signature line")?;
    let (signer, blob) = rest.split_once(' ').ok_or("not a signature line")?;
    if signer != name {
        return Err(format!("signed by {signer}, not {name}"));
    }
    let blob = base64::engine::general_purpose::STANDARD
        .decode(blob)
        .map_err(|_| "the signature is not base64")?;
    if blob.len() != 4 + 8 + 64 || blob[..4] != cosigner_key_id(&name, &public) {
        return Err(format!("not a cosignature by {vkey}"));
    }
    let timestamp = u64::from_be_bytes(blob[4..12].try_into().expect("8 bytes"));
    let signature = ed25519_dalek::Signature::from_bytes(&blob[12..].try_into().expect("64 bytes"));
    let message = format!("cosignature/v1\ntime {timestamp}\n{body}");
    public
        .verify_strict(message.as_bytes(), &signature)
        .map_err(|_| format!("the cosignature by {name} does not verify"))?;
    Ok(timestamp)
}

/// The body of a signed note (everything up to and with the line before
/// the blank line), or `None` when it has no signature block.
pub fn note_body(note: &str) -> Option<&str> {
    note.find("\n\n").map(|split| &note[..split + 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cosignature_verifies_under_its_witness_key_and_for_its_body_only() {
        let witness = SigningKey::from_bytes(&[7u8; 32]);
        let vkey = cosigner_verifier_key("witness.example", &witness.verifying_key());
        let body = "example.com/ledger\n9\nBQUF\n";
        let line = cosign("witness.example", &witness, body, 1_700_000_000);
        assert_eq!(verify_cosignature(body, &line, &vkey), Ok(1_700_000_000));
        assert!(verify_cosignature("example.com/ledger\n10\nBQUF\n", &line, &vkey).is_err());
        let other = cosigner_verifier_key(
            "witness.example",
            &SigningKey::from_bytes(&[8u8; 32]).verifying_key(),
        );
        assert!(verify_cosignature(body, &line, &other).is_err());
        assert!(parse_cosigner_key("witness.example+00000000+AAAA").is_err());
        // A note key (type 0x01) is not a witness key.
        let note_key = verifier_key("witness.example", &witness.verifying_key());
        assert!(parse_cosigner_key(&note_key).is_err());
        // Base64 has '+' in it: the key is all that follows the second '+'.
        let plus = (0u8..=255)
            .map(|seed| SigningKey::from_bytes(&[seed; 32]).verifying_key())
            .find(|k| cosigner_verifier_key("w", k).matches('+').count() > 2)
            .expect("some key encodes with a '+'");
        let vkey = cosigner_verifier_key("w", &plus);
        assert_eq!(
            parse_cosigner_key(&vkey).map(|(n, k)| (n, k == plus)),
            Ok(("w".into(), true))
        );
    }

    #[test]
    fn a_checkpoint_verifies_under_its_key_and_nothing_else() {
        let key = SigningKey::from_bytes(&[3u8; 32]);
        let note = signed_checkpoint("example.com/ledger", 9, &[5u8; 32], &key);
        let vkey = verifier_key("example.com/ledger", &key.verifying_key());
        assert_eq!(
            verify_checkpoint(&note, &vkey).unwrap(),
            Checked {
                origin: "example.com/ledger".into(),
                size: 9,
                root: [5u8; 32]
            }
        );
        let other = verifier_key(
            "example.com/ledger",
            &SigningKey::from_bytes(&[4u8; 32]).verifying_key(),
        );
        assert!(verify_checkpoint(&note, &other).is_err());
        assert!(verify_checkpoint(&note.replace("\n9\n", "\n10\n"), &vkey).is_err());
        let renamed = verifier_key("example.com/other", &key.verifying_key());
        assert!(verify_checkpoint(&note, &renamed).is_err());
    }
}
