//! `agentledger witness`: a C2SP `tlog-witness`. Logs push their signed
//! checkpoints to `POST /add-checkpoint` with a consistency proof from the
//! last checkpoint this witness cosigned for them; it cosigns a checkpoint
//! only when the proof shows the new tree extends that one, so a log that
//! rewrote its history (a restored backup with other events, a fork shown
//! to someone else) is refused, and the log's operators hear of it.
//!
//! Request body: `old <size>\n`, one base64 proof hash per line, a blank
//! line, then the checkpoint note. Answers: 200 with the cosignature line;
//! 409 with the size this witness holds (`text/x.tlog.size`) when `old`
//! is not it; 403 when no known key signed the checkpoint; 404 for an
//! unknown origin; 422 when the proof fails (a fork); 400 for anything
//! malformed. The state (per origin, the size and root last cosigned) is
//! a JSON file written atomically before each answer.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use agentledger_eventstore::checkpoint::{
    cosign, cosigner_verifier_key, note_body, verify_checkpoint,
};
use agentledger_eventstore::signing::SigningKey;
use agentledger_eventstore::tlog::{verify_consistency, Hash};
use anyhow::Context;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

#[derive(clap::Args)]
pub struct WitnessArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8090")]
    listen: std::net::SocketAddr,
    /// A log this witness follows: its origin and its note verifier key
    /// (`ORIGIN=NAME+ID+KEY`, as `ledgerKeys` gives it); repeat per log.
    #[arg(long = "log", required = true, value_parser = parse_log)]
    logs: Vec<(String, String)>,
    /// Where the witness keeps what it cosigned (created when missing).
    #[arg(long)]
    state: PathBuf,
    /// The witness's Ed25519 key (32 bytes, created with mode 0600 when
    /// missing).
    #[arg(long)]
    key: PathBuf,
    /// The witness's name in its cosignatures.
    #[arg(long, default_value = "witness.localhost")]
    name: String,
}

fn parse_log(text: &str) -> Result<(String, String), String> {
    let (origin, vkey) = text.split_once('=').ok_or("expected ORIGIN=VERIFIER_KEY")?;
    if !vkey.starts_with(&format!("{origin}+")) {
        return Err(format!(
            "the verifier key of {origin} must be named {origin} (it names {:?})",
            vkey.split('+').next().unwrap_or_default()
        ));
    }
    Ok((origin.to_string(), vkey.to_string()))
}

/// What the witness last cosigned for a log.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Cosigned {
    size: u64,
    /// Base64.
    root: String,
}

struct Witness {
    name: String,
    key: SigningKey,
    logs: BTreeMap<String, String>,
    state_path: PathBuf,
    state: Mutex<BTreeMap<String, Cosigned>>,
}

pub async fn run(args: WitnessArgs) -> anyhow::Result<()> {
    agentledger_eventstore::checkpoint::check_origin(&args.name)
        .map_err(|e| anyhow::anyhow!("--name: {e}"))?;
    let key = load_or_create_key(&args.key)?;
    let state: BTreeMap<String, Cosigned> = match std::fs::read_to_string(&args.state) {
        Ok(text) => serde_json::from_str(&text)
            .with_context(|| format!("{} is not a witness state", args.state.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", args.state.display())),
    };
    eprintln!(
        "witness {}: verifier key {}",
        args.name,
        cosigner_verifier_key(&args.name, &key.verifying_key())
    );
    let witness = Arc::new(Witness {
        name: args.name,
        key,
        logs: args.logs.into_iter().collect(),
        state_path: args.state,
        state: Mutex::new(state),
    });
    let router = axum::Router::new()
        .route("/add-checkpoint", axum::routing::post(add_checkpoint))
        .layer(axum::extract::DefaultBodyLimit::max(64 << 10))
        .with_state(witness);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    // Tests and scripts that pass port 0 read the chosen address here.
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, router)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}

fn load_or_create_key(path: &Path) -> anyhow::Result<SigningKey> {
    match std::fs::read(path) {
        Ok(bytes) => {
            let seed: [u8; 32] = bytes
                .try_into()
                .map_err(|_| anyhow::anyhow!("{} is not a 32-byte key", path.display()))?;
            Ok(SigningKey::from_bytes(&seed))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = agentledger_eventstore::signing::new_signing_key();
            // Written whole or not at all: a temporary file, then a rename.
            let mut temporary = path.as_os_str().to_owned();
            temporary.push(".partial");
            let temporary = PathBuf::from(temporary);
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create(true).truncate(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            use std::io::Write;
            let mut file = options
                .open(&temporary)
                .with_context(|| format!("creating {}", temporary.display()))?;
            file.write_all(&key.to_bytes())?;
            file.sync_all()?;
            std::fs::rename(&temporary, path)
                .with_context(|| format!("creating {}", path.display()))?;
            Ok(key)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn answer(status: StatusCode, text: impl Into<String>) -> Response {
    (status, text.into()).into_response()
}

async fn add_checkpoint(State(witness): State<Arc<Witness>>, body: String) -> Response {
    match witness.add(&body).await {
        Ok(cosignature) => answer(StatusCode::OK, cosignature),
        Err(refusal) => refusal,
    }
}

impl Witness {
    async fn add(&self, body: &str) -> Result<String, Response> {
        let bad = |why: &str| answer(StatusCode::BAD_REQUEST, format!("{why}\n"));
        let b64 = base64::engine::general_purpose::STANDARD;
        let (head, note) = body.split_once("\n\n").ok_or_else(|| {
            bad("expected the old size and proof, a blank line, then the checkpoint")
        })?;
        let mut lines = head.lines();
        let old: u64 = lines
            .next()
            .and_then(|l| l.strip_prefix("old "))
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| bad("the first line must be `old <size>`"))?;
        let proof: Vec<Hash> = lines
            .map(|l| b64.decode(l).ok().and_then(|h| h.try_into().ok()))
            .collect::<Option<_>>()
            .ok_or_else(|| bad("a proof line is not a base64 hash"))?;
        let origin = note.lines().next().unwrap_or_default();
        let vkey = self
            .logs
            .get(origin)
            .ok_or_else(|| answer(StatusCode::NOT_FOUND, format!("unknown log {origin:?}\n")))?;
        let checkpoint = verify_checkpoint(note, vkey)
            .map_err(|e| answer(StatusCode::FORBIDDEN, format!("{e}\n")))?;
        let mut state = self.state.lock().await;
        let held = state.get(origin).cloned();
        let held_size = held.as_ref().map_or(0, |c| c.size);
        if old != held_size {
            return Err((
                StatusCode::CONFLICT,
                [(axum::http::header::CONTENT_TYPE, "text/x.tlog.size")],
                format!("{held_size}\n"),
            )
                .into_response());
        }
        if checkpoint.size < old {
            return Err(bad("the checkpoint is smaller than the old size"));
        }
        if held.is_none() && !proof.is_empty() {
            return Err(bad(
                "nothing is cosigned for this log yet: the proof must be empty",
            ));
        }
        if let Some(held) = &held {
            let held_root: Hash = b64
                .decode(&held.root)
                .ok()
                .and_then(|r| r.try_into().ok())
                .ok_or_else(|| answer(StatusCode::INTERNAL_SERVER_ERROR, "corrupt state\n"))?;
            if !verify_consistency(old, checkpoint.size, &proof, &held_root, &checkpoint.root) {
                tracing::warn!(
                    origin,
                    cosigned = held.size,
                    offered = checkpoint.size,
                    "REFUSED a checkpoint that does not extend the one cosigned: the log's history differs"
                );
                return Err(answer(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    format!(
                        "the checkpoint of {} leaves does not extend the one of {} leaves this \
                         witness cosigned: the consistency proof fails (a rewritten or forked history)\n",
                        checkpoint.size, held.size
                    ),
                ));
            }
        }
        let updated = Cosigned {
            size: checkpoint.size,
            root: b64.encode(checkpoint.root),
        };
        let mut next = state.clone();
        next.insert(origin.to_string(), updated);
        save_state(&self.state_path, &next)
            .map_err(|e| answer(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}\n")))?;
        *state = next;
        let body = note_body(note).expect("a verified checkpoint has a body");
        let now = chrono::Utc::now().timestamp().max(0) as u64;
        Ok(cosign(&self.name, &self.key, body, now))
    }
}

/// Writes `state` to a temporary file, syncs it and renames it over
/// `path`: a crash leaves the old state or the new one, never half.
fn save_state(path: &Path, state: &BTreeMap<String, Cosigned>) -> anyhow::Result<()> {
    use std::io::Write;
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".partial");
    let temporary = PathBuf::from(temporary);
    let mut file = std::fs::File::create(&temporary)
        .with_context(|| format!("creating {}", temporary.display()))?;
    file.write_all(serde_json::to_string_pretty(state)?.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&temporary, path).with_context(|| format!("replacing {}", path.display()))?;
    // The rename itself must reach the disk before the cosignature leaves:
    // a witness that forgets what it cosigned could cosign a fork of it.
    let directory = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    std::fs::File::open(directory)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", directory.display()))
}
