//! The result cache: what a deterministic tool gave for the same tenant,
//! tool, instruction and input, and what a model answered at temperature 0
//! to the same prompt, reused instead of run or asked again. The ledger is
//! its memory: every entry points at the event that recorded the result,
//! a reuse is recorded with that position (so the audit shows where each
//! output came from), and a restarted process fills the cache from the
//! ledger's recent events. Workflows with a data subject never take part:
//! their results are sealed under their subject's key.
//!
//! Bounded by entries (least recently used go first) and by age.

use std::collections::BTreeSet;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use agentledger_domain::names::AgentRole;
use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};

/// Largest value kept (bytes): a larger result is recorded but not
/// cached, so that the cache's memory is bounded by `max_entries` times
/// this.
pub const MAX_VALUE_BYTES: usize = 64 * 1024;

/// How the cache behaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheConfig {
    /// Off by default: every tool runs and every model is asked.
    pub enabled: bool,
    pub max_entries: usize,
    /// Results older than this are not reused.
    pub max_age: Duration,
    /// Tools never reused, by name.
    pub tools_off: BTreeSet<String>,
    /// Roles whose model answers are never reused.
    pub roles_off: BTreeSet<AgentRole>,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            max_entries: 10_000,
            max_age: Duration::from_secs(24 * 3600),
            tools_off: BTreeSet::new(),
            roles_off: BTreeSet::new(),
        }
    }
}

/// What kind of result an entry holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Tool,
    Model,
}

/// A cached result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The event that recorded it.
    pub position: u64,
    /// The tool's output, or the model's raw answer.
    pub value: String,
    pub recorded_at: DateTime<Utc>,
    /// What producing it took (ms), when known: the time a reuse saves.
    pub cost_ms: u64,
}

/// Hits, misses and time saved, by kind.
#[derive(Debug, Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    saved_ms: AtomicU64,
}

/// Figures for `/metrics` and the bench.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub entries: usize,
    pub tool_hits: u64,
    pub tool_misses: u64,
    pub model_hits: u64,
    pub model_misses: u64,
    pub saved_ms: u64,
}

/// The cache. Cheap to share behind an `Arc`.
pub struct ResultCache {
    config: CacheConfig,
    entries: Mutex<lru::LruCache<[u8; 32], Entry>>,
    tools: Counters,
    models: Counters,
}

impl ResultCache {
    pub fn new(config: CacheConfig) -> Self {
        let capacity = NonZeroUsize::new(config.max_entries.max(1)).expect("at least one");
        Self {
            config,
            entries: Mutex::new(lru::LruCache::new(capacity)),
            tools: Counters::default(),
            models: Counters::default(),
        }
    }

    pub fn config(&self) -> &CacheConfig {
        &self.config
    }

    /// Whether `tool`'s results may be reused.
    pub fn serves_tool(&self, tool: &str) -> bool {
        self.config.enabled && !self.config.tools_off.contains(tool)
    }

    /// Whether `role`'s model answers may be reused.
    pub fn serves_role(&self, role: AgentRole) -> bool {
        self.config.enabled && !self.config.roles_off.contains(&role)
    }

    fn counters(&self, kind: Kind) -> &Counters {
        match kind {
            Kind::Tool => &self.tools,
            Kind::Model => &self.models,
        }
    }

    /// The entry under `key` if it is young enough at `now`; counts a hit
    /// (with the time it saves) or a miss.
    pub fn get(&self, kind: Kind, key: &[u8; 32], now: DateTime<Utc>) -> Option<Entry> {
        let counters = self.counters(kind);
        let mut entries = self.entries.lock().expect("cache lock");
        let fresh = entries.get(key).filter(|e| self.young(e, now)).cloned();
        match &fresh {
            Some(entry) => {
                counters.hits.fetch_add(1, Ordering::Relaxed);
                counters
                    .saved_ms
                    .fetch_add(entry.cost_ms, Ordering::Relaxed);
            }
            None => {
                entries.pop(key);
                counters.misses.fetch_add(1, Ordering::Relaxed);
            }
        }
        fresh
    }

    fn young(&self, entry: &Entry, now: DateTime<Utc>) -> bool {
        chrono::Duration::from_std(self.config.max_age)
            .is_ok_and(|age| entry.recorded_at + age >= now)
    }

    /// Keeps `entry` under `key`; an entry from an earlier event stays (the
    /// first recording is the one reuses point to). Values over
    /// [`MAX_VALUE_BYTES`] are not kept.
    pub fn put(&self, key: [u8; 32], entry: Entry) {
        if entry.value.len() > MAX_VALUE_BYTES {
            return;
        }
        let mut entries = self.entries.lock().expect("cache lock");
        match entries.get(&key) {
            Some(old) if old.position <= entry.position => {}
            _ => {
                entries.put(key, entry);
            }
        }
    }

    pub fn stats(&self) -> CacheStats {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CacheStats {
            entries: self.entries.lock().expect("cache lock").len(),
            tool_hits: load(&self.tools.hits),
            tool_misses: load(&self.tools.misses),
            model_hits: load(&self.models.hits),
            model_misses: load(&self.models.misses),
            saved_ms: load(&self.tools.saved_ms) + load(&self.models.saved_ms),
        }
    }
}

/// The key of `tool`'s result for `instruction` and `input` in `tenant`;
/// `served_by` tells a built-in from an external tool of the same name.
pub fn tool_key(
    tenant: &str,
    tool: &str,
    served_by: &str,
    instruction: &str,
    input: &str,
) -> [u8; 32] {
    digest(&["tool", tenant, tool, served_by, instruction, input])
}

/// The key of a model's answer to the prompt hashed `prompt_sha256`, under
/// the policy fingerprinted `policy` (endpoint, model, limits, prompt
/// template) with the decision schema hashed `schema_sha256`.
pub fn model_key(tenant: &str, policy: &str, schema_sha256: &str, prompt_sha256: &str) -> [u8; 32] {
    digest(&["model", tenant, policy, schema_sha256, prompt_sha256])
}

/// SHA-256 over `parts`, each preceded by its length (no two lists of
/// parts hash alike).
fn digest(parts: &[&str]) -> [u8; 32] {
    let mut hash = Sha256::new();
    for part in parts {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part.as_bytes());
    }
    hash.finalize().into()
}

/// A key as events carry it (hex); `None` for text that is not one.
pub fn parse_key(hex_key: &str) -> Option<[u8; 32]> {
    let bytes = hex::decode(hex_key).ok()?;
    bytes.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(position: u64, at: DateTime<Utc>) -> Entry {
        Entry {
            position,
            value: format!("out-{position}"),
            recorded_at: at,
            cost_ms: 5,
        }
    }

    #[test]
    fn entries_are_bounded_by_count_and_age_and_the_first_recording_stays() {
        let now = Utc::now();
        let cache = ResultCache::new(CacheConfig {
            enabled: true,
            max_entries: 2,
            max_age: Duration::from_secs(60),
            ..CacheConfig::default()
        });
        let (a, b, c) = (
            tool_key("t", "calc", "builtin", "2+2", ""),
            tool_key("t", "calc", "builtin", "2+3", ""),
            tool_key("t", "calc", "builtin", "2+4", ""),
        );
        cache.put(a, entry(10, now));
        cache.put(a, entry(20, now));
        assert_eq!(cache.get(Kind::Tool, &a, now).unwrap().position, 10);
        cache.put(b, entry(11, now));
        // `a` was used last: `b` goes when `c` comes.
        cache.get(Kind::Tool, &a, now);
        cache.put(c, entry(12, now));
        assert!(cache.get(Kind::Tool, &b, now).is_none());
        assert!(cache.get(Kind::Tool, &a, now).is_some());
        let later = now + chrono::Duration::seconds(61);
        assert!(cache.get(Kind::Tool, &c, later).is_none(), "too old");
        let stats = cache.stats();
        assert_eq!((stats.tool_hits, stats.tool_misses), (3, 2));
        assert_eq!(stats.saved_ms, 15);
    }

    #[test]
    fn keys_separate_tenants_tools_and_fields() {
        let key = tool_key("a", "t", "builtin", "x", "y");
        assert_ne!(key, tool_key("b", "t", "builtin", "x", "y"));
        assert_ne!(key, tool_key("a", "t", "external", "x", "y"));
        assert_ne!(tool_key("a", "t", "builtin", "xy", ""), key);
        assert_ne!(key, model_key("a", "t", "builtin", "x"));
        let mut big = Entry {
            position: 1,
            value: "x".repeat(MAX_VALUE_BYTES + 1),
            recorded_at: Utc::now(),
            cost_ms: 0,
        };
        let cache = ResultCache::new(CacheConfig {
            enabled: true,
            ..CacheConfig::default()
        });
        cache.put(key, big.clone());
        assert_eq!(cache.stats().entries, 0, "too large to keep");
        big.value.truncate(MAX_VALUE_BYTES);
        cache.put(key, big);
        assert_eq!(cache.stats().entries, 1);
        assert_eq!(parse_key(&hex::encode(key)), Some(key));
        assert_eq!(parse_key("zz"), None);
    }

    #[test]
    fn roles_and_tools_can_be_left_out() {
        let cache = ResultCache::new(CacheConfig {
            enabled: true,
            tools_off: BTreeSet::from(["fetch".to_string()]),
            roles_off: BTreeSet::from([AgentRole::Ethics]),
            ..CacheConfig::default()
        });
        assert!(cache.serves_tool("calculate") && !cache.serves_tool("fetch"));
        assert!(cache.serves_role(AgentRole::Analyst) && !cache.serves_role(AgentRole::Ethics));
        let off = ResultCache::new(CacheConfig::default());
        assert!(!off.serves_tool("calculate") && !off.serves_role(AgentRole::Analyst));
    }
}
