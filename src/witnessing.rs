//! `serve`'s side of witnessing: pushes a signed checkpoint of the ledger's
//! tree to each configured witness (C2SP `tlog-witness`) when the tree has
//! grown by `every_events` or `interval` has passed, with a consistency
//! proof from the size the witness last cosigned, and keeps what each
//! witness said for `/ready` and `/metrics`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentledger_api::{WitnessReport, WitnessStatus};
use agentledger_eventstore::checkpoint::signed_checkpoint;
use agentledger_eventstore::signing::LedgerKeys;
use agentledger_eventstore::tlog::{self, TreeTiles};
use base64::Engine;
use tokio_util::sync::CancellationToken;

/// Where and how often to push.
#[derive(Debug, Clone)]
pub struct Witnessing {
    pub urls: Vec<String>,
    /// Their verifier keys: cosignatures that verify under one are kept
    /// for `/checkpoint/cosigned`.
    pub keys: Vec<String>,
    pub interval: Duration,
    pub every_events: u64,
}

/// Pushes until `stop`.
pub async fn push(
    config: Witnessing,
    tree: Arc<dyn TreeTiles>,
    keys: Arc<dyn LedgerKeys>,
    origin: String,
    status: WitnessStatus,
    stop: CancellationToken,
) {
    let http = match reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
    {
        Ok(http) => http,
        Err(e) => {
            tracing::error!(error = %e, "no HTTP client for the witnesses");
            return;
        }
    };
    // The size each witness holds for us, as far as we know (0 at first;
    // a 409 tells the real one).
    let mut known: HashMap<String, u64> = HashMap::new();
    let mut pushed: Option<(u64, Instant)> = None;
    loop {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            () = stop.cancelled() => return,
        }
        let Ok(size) = tree.tree_size().await else {
            continue;
        };
        let due = match pushed {
            None => true,
            Some((last, at)) => {
                size >= last + config.every_events.max(1) || at.elapsed() >= config.interval
            }
        };
        if !due || size == 0 {
            continue;
        }
        let note = match checkpoint(&*tree, &*keys, &origin, size).await {
            Ok(note) => note,
            Err(e) => {
                tracing::warn!(error = %e, "signing a checkpoint for the witnesses failed");
                continue;
            }
        };
        for url in &config.urls {
            let held = known.entry(url.clone()).or_insert(0);
            let mut report = push_one(&http, url, &*tree, held, size, &note).await;
            if let Some((_, lines)) = &report.cosigned {
                let body = agentledger_eventstore::checkpoint::note_body(&note).unwrap_or_default();
                let verified: Vec<String> = lines
                    .iter()
                    .filter(|line| {
                        config.keys.iter().any(|key| {
                            agentledger_eventstore::checkpoint::verify_cosignature(body, line, key)
                                .is_ok()
                        })
                    })
                    .map(|line| format!("{}\n", line.trim_end()))
                    .collect();
                report.cosigned = if verified.is_empty() {
                    if !config.keys.is_empty() {
                        report.unreachable = Some(
                            "it cosigned, but no cosignature it sent verifies under [witness] keys"
                                .into(),
                        );
                    }
                    None
                } else {
                    Some((note.clone(), verified))
                };
            }
            if let Some(refused) = &report.refused {
                tracing::error!(witness = %url, %refused, "a witness REFUSED this ledger's checkpoint");
            } else if let Some(unreachable) = &report.unreachable {
                tracing::warn!(witness = %url, %unreachable, "a witness could not be reached");
            }
            status
                .lock()
                .expect("witness status lock")
                .insert(url.clone(), report);
        }
        pushed = Some((size, Instant::now()));
    }
}

/// At most 4 KiB of a witness's answer (a cosignature line is ~150 bytes).
async fn bounded_text(mut response: reqwest::Response) -> String {
    let mut body = Vec::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        body.extend_from_slice(&chunk);
        if body.len() > 4096 {
            body.truncate(4096);
            break;
        }
    }
    String::from_utf8_lossy(&body).into_owned()
}

async fn checkpoint(
    tree: &dyn TreeTiles,
    keys: &dyn LedgerKeys,
    origin: &str,
    size: u64,
) -> Result<String, agentledger_eventstore::StoreError> {
    let root = tlog::tree_root(tree, size).await?;
    let (_, key) = keys.active().await?;
    Ok(signed_checkpoint(origin, size, &root, &key))
}

/// One witness: at most two tries (the second from the size a 409 gave).
async fn push_one(
    http: &reqwest::Client,
    url: &str,
    tree: &dyn TreeTiles,
    held: &mut u64,
    size: u64,
    note: &str,
) -> WitnessReport {
    let b64 = base64::engine::general_purpose::STANDARD;
    let refused = |why: String| WitnessReport {
        refused: Some(why),
        ..WitnessReport::default()
    };
    for _ in 0..2 {
        if *held > size {
            // Another node pushed a larger tree, or this node's tree is
            // behind: not a fork by itself (a fork fails a proof, 422).
            let held_size = *held;
            *held = 0;
            return WitnessReport {
                unreachable: Some(format!(
                    "it holds a tree of {held_size} leaves and this node's has {size}: this node \
                     is behind (or the ledger lost events: check with `agentledger verify`)"
                )),
                ..WitnessReport::default()
            };
        }
        let proof = match tlog::consistency_proof(tree, *held, size).await {
            Ok(proof) => proof,
            Err(e) => {
                return WitnessReport {
                    unreachable: Some(format!("no consistency proof from {held}: {e}")),
                    ..WitnessReport::default()
                }
            }
        };
        let mut body = format!("old {held}\n");
        for hash in &proof {
            body.push_str(&b64.encode(hash));
            body.push('\n');
        }
        body.push('\n');
        body.push_str(note);
        let sent = http
            .post(format!("{}/add-checkpoint", url.trim_end_matches('/')))
            .body(body)
            .send()
            .await;
        let response = match sent {
            Ok(response) => response,
            Err(e) => {
                return WitnessReport {
                    unreachable: Some(e.to_string()),
                    ..WitnessReport::default()
                }
            }
        };
        let code = response.status().as_u16();
        let text = bounded_text(response).await;
        match code {
            200 => {
                *held = size;
                // The signature lines, checked by the caller.
                let lines = text
                    .lines()
                    .filter(|l| l.starts_with('\u{2014}'))
                    .map(String::from)
                    .collect();
                return WitnessReport {
                    cosigned_size: size,
                    cosigned: Some((note.to_string(), lines)),
                    ..WitnessReport::default()
                };
            }
            409 => match text.trim().parse() {
                Ok(theirs) => *held = theirs,
                Err(_) => return refused(format!("409 without a size: {}", text.trim())),
            },
            // The witness's proof check failed: it holds another history.
            422 => return refused(format!("{code}: {}", text.trim())),
            // Unknown log or key, a malformed request, too many requests:
            // a configuration problem to fix, not a fork.
            _ => {
                return WitnessReport {
                    unreachable: Some(format!("{code}: {}", text.trim())),
                    ..WitnessReport::default()
                }
            }
        }
    }
    WitnessReport {
        unreachable: Some("it answered 409 twice".into()),
        ..WitnessReport::default()
    }
}
