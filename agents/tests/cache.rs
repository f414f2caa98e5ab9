//! The result cache on real PostgreSQL: a deterministic tool's result is
//! reused for the same tenant, tool, instruction and input, and the event
//! names the position it came from; other tenants and tools left out of the
//! cache run again; a new runtime fills its cache from the ledger.

mod common;

use std::sync::Arc;

use agentledger_agents::cache::CacheConfig;
use agentledger_agents::{
    PostgresWorkQueue, Runtime, RuntimeConfig, Submission, SystemClock, ToolRegistry,
};
use agentledger_domain::workflow::{CacheRef, WorkflowEvent, WorkflowState};
use agentledger_eventstore::testing::TestDatabase;
use agentledger_eventstore::EventStore;
use common::*;

const REQUEST: &str = "1. Extract the figures from the text: 12, 7.5 and 30\n2. Sort them in descending order\n3. Compute their total";

fn cached(tools_off: &[&str]) -> RuntimeConfig {
    RuntimeConfig {
        cache: CacheConfig {
            enabled: true,
            tools_off: tools_off.iter().map(|t| t.to_string()).collect(),
            ..CacheConfig::default()
        },
        ..RuntimeConfig::default()
    }
}

async fn run_one(runtime: &Runtime, store: &dyn EventStore, tenant: &str) -> Followed {
    let id = runtime
        .submit(Submission {
            request: REQUEST.into(),
            tenant: Some(tenant.into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut seen = settle(store, &[id]).await;
    let followed = seen.remove(&id).unwrap();
    assert_eq!(followed.workflow.state, WorkflowState::Completed);
    assert_each_decision_once(id, &followed);
    followed
}

/// Each subtask's output, its cache reference, and the event's position.
fn results(followed: &Followed) -> Vec<(String, Option<CacheRef>, u64)> {
    followed
        .decoded
        .iter()
        .zip(&followed.events)
        .filter_map(|(e, r)| match e {
            WorkflowEvent::SubtaskSucceeded { output, cache, .. } => Some((
                output.as_str().to_string(),
                cache.clone(),
                r.global_position,
            )),
            _ => None,
        })
        .collect()
}

fn start(
    db_store: Arc<dyn EventStore>,
    queue: Arc<PostgresWorkQueue>,
    config: RuntimeConfig,
) -> Running {
    Running::start(
        db_store,
        queue,
        ToolRegistry::default(),
        Arc::new(SystemClock),
        config,
    )
}

#[tokio::test]
async fn a_deterministic_result_is_reused_and_says_where_it_came_from() {
    let db = TestDatabase::create().await;
    let store = Arc::new(db.store().await);
    let queue = Arc::new(PostgresWorkQueue::new(store.pool().clone()));
    let running = start(store.clone(), queue.clone(), cached(&["sort_lines"]));
    let runtime = running.runtime.clone();

    let first = results(&run_one(&runtime, &*store, "acme").await);
    assert_eq!(first.len(), 3);
    for (_, cache, _) in &first {
        let cache = cache.as_ref();
        // sort_lines is left out of the cache; the others are fresh.
        assert!(cache.is_none_or(|c| c.reused_from.is_none()), "{cache:?}");
    }
    let second = results(&run_one(&runtime, &*store, "acme").await);
    let mut reused = 0;
    for ((out1, cache1, pos1), (out2, cache2, _)) in first.iter().zip(&second) {
        assert_eq!(out1, out2, "the same result");
        match (cache1, cache2) {
            (Some(c1), Some(c2)) => {
                assert_eq!(c1.key, c2.key);
                assert_eq!(c2.reused_from, Some(*pos1), "names the first recording");
                reused += 1;
            }
            (None, None) => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(reused, 2, "extract_numbers and calculate; not sort_lines");
    // Another tenant computes its own.
    let other = results(&run_one(&runtime, &*store, "globex").await);
    for ((_, cache1, _), (_, cache2, _)) in first.iter().zip(&other) {
        if let (Some(c1), Some(c2)) = (cache1, cache2) {
            assert_ne!(c1.key, c2.key);
            assert_eq!(c2.reused_from, None);
        }
    }
    let stats = runtime.cache_stats();
    assert_eq!(stats.tool_hits, 2);
    assert_eq!(stats.tool_misses, 4, "acme's first run and globex's");
    running.stop().await;

    // A new runtime (a restarted process) fills its cache from the ledger.
    let restarted = start(store.clone(), queue, cached(&[]));
    let runtime = restarted.runtime.clone();
    let third = results(&run_one(&runtime, &*store, "acme").await);
    for ((_, cache1, pos1), (_, cache3, _)) in first.iter().zip(&third) {
        if let Some(c1) = cache1 {
            assert_eq!(
                cache3.as_ref().and_then(|c| c.reused_from),
                Some(*pos1),
                "{}",
                c1.key
            );
        }
    }
    restarted.stop().await;
}

#[tokio::test]
async fn with_the_cache_off_nothing_is_keyed_or_reused() {
    let db = TestDatabase::create().await;
    let store = Arc::new(db.store().await);
    let queue = Arc::new(PostgresWorkQueue::new(store.pool().clone()));
    let running = start(store.clone(), queue, RuntimeConfig::default());
    let runtime = running.runtime.clone();
    for _ in 0..2 {
        let outputs = results(&run_one(&runtime, &*store, "acme").await);
        assert!(outputs.iter().all(|(_, cache, _)| cache.is_none()));
    }
    assert_eq!(runtime.cache_stats(), Default::default());
    running.stop().await;
}
