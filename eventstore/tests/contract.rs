//! The event store contract, written once and run against every
//! implementation: in memory, in memory writing through to the embedded
//! SQLite ledger (`serve --data-dir`), and on a real PostgreSQL database.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use agentledger_eventstore::testing::TestDatabase;
use agentledger_eventstore::*;
use futures::FutureExt;
use serde_json::{json, Value};

/// A store under test; `open` gives another handle on the same data (for
/// PostgreSQL a separate store with its own writer, as a second process has).
enum Backend {
    Memory(InMemoryEventStore),
    /// The store and the directory its file lives in (removed on drop).
    Embedded {
        store: InMemoryEventStore,
        _dir: tempfile::TempDir,
    },
    Postgres(TestDatabase),
}

impl Backend {
    async fn open(&self) -> Arc<dyn EventStore> {
        match self {
            Self::Memory(store) | Self::Embedded { store, .. } => Arc::new(store.clone()),
            Self::Postgres(db) => Arc::new(db.store().await),
        }
    }
}

macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::Memory(Default::default())).await;
                }
            )*
        }
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::embedded()).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::Postgres(super::TestDatabase::create().await)).await;
                }
            )*
        }
    };
}

contract!(
    appended_events_read_back_in_order_with_a_verifying_chain,
    numbers_in_any_notation_verify_after_storage_and_resends_are_recognised,
    append_with_stale_version_conflicts_and_writes_nothing,
    racing_exact_appenders_one_wins_and_the_stream_has_no_hole,
    resent_batch_is_stored_once,
    same_event_id_with_other_content_is_refused,
    bad_input_is_refused_and_writes_nothing,
    read_all_is_inclusive_and_head_tracks_the_last_position,
    pages_end_at_their_byte_bound_and_subscribers_of_large_events_see_them_all,
    subscribe_all_delivers_events_appended_during_catch_up_once,
    subscribe_stream_delivers_only_its_stream_across_the_seam,
    a_stream_read_by_the_caller_after_subscribing_goes_on_without_gap_or_repeat,
    subscriber_that_fell_behind_the_live_buffer_still_sees_everything_once,
    concurrent_writers_and_a_tailing_reader_agree_on_one_gap_free_order,
);

/// A fresh data directory's store. One process owns a directory, so a
/// second handle is a clone, as for memory; reopening is tested in the
/// crate (`embedded`) and end to end (`tests/serve.rs`).
fn embedded() -> Backend {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedLedger::open(dir.path())
        .unwrap()
        .event_store(Limits::default())
        .unwrap()
        .store;
    Backend::Embedded { store, _dir: dir }
}

fn stream(name: &str) -> StreamId {
    StreamId::new(name).unwrap()
}

fn event(kind: &str, payload: Value) -> NewEvent {
    NewEvent::new(kind, payload, Metadata::new(Actor::system()))
}

fn events(n: usize, tag: &str) -> Vec<NewEvent> {
    (0..n)
        .map(|i| event("Tested", json!({"tag": tag, "i": i})))
        .collect()
}

async fn appended_events_read_back_in_order_with_a_verifying_chain(backend: Backend) {
    let store = backend.open().await;
    let s = stream("workflow-a");
    let mut metadata = Metadata::new(Actor::agent("sena", "1.0.0"));
    metadata.correlation_id = Some(uuid::Uuid::now_v7());
    let batch = vec![
        NewEvent::new(
            "WorkflowSubmitted",
            json!({"request": "보고서를 요약해 주세요. 그다음 단어 수를 세세요.", "n": 1e2, "f": 0.1}),
            metadata.clone(),
        ),
        NewEvent::new(
            "AnalysisProduced",
            json!({"nested": {"b": [1, 2.5, null], "a": "é\"\n"}}),
            metadata,
        ),
    ];
    let first = store
        .append(&s, ExpectedVersion::NoStream, batch.clone())
        .await
        .unwrap();
    assert_eq!(
        (
            first.stream_version,
            first.first_position,
            first.last_position
        ),
        (1, 1, 2)
    );
    assert!(!first.deduplicated);
    let second = store
        .append(&s, ExpectedVersion::Exact(1), events(1, "third"))
        .await
        .unwrap();
    assert_eq!((second.stream_version, second.first_position), (2, 3));

    let read = store.read_stream(&s, 0, 100).await.unwrap();
    assert_eq!(
        read.iter().map(|e| e.stream_version).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    assert_eq!(read[0].event_id, batch[0].event_id);
    assert_eq!(read[0].payload["request"], batch[0].payload["request"]);
    assert_eq!(read[0].metadata().unwrap(), batch[0].metadata);
    assert_eq!(read[0].prev_hash, chain::GENESIS_HASH);
    assert_eq!(read[1].prev_hash, read[0].hash);
    assert_eq!(read[2].prev_hash, read[1].hash);
    assert_eq!(
        read[0].recorded_at.timestamp_subsec_nanos() % 1_000,
        0,
        "microsecond precision"
    );
    let verification = store.verify_stream(&s).await.unwrap();
    assert_eq!(
        verification,
        Verification {
            ok: true,
            checked_events: 3,
            first_broken_position: None,
            reason: None
        }
    );
    assert_eq!(store.read_stream(&s, 2, 100).await.unwrap().len(), 1);
    assert!(store
        .read_stream(&stream("nothing-here"), 0, 10)
        .await
        .unwrap()
        .is_empty());
}

async fn numbers_in_any_notation_verify_after_storage_and_resends_are_recognised(backend: Backend) {
    let store = backend.open().await;
    let s = stream("workflow-numbers");
    // Numbers that jsonb prints in another notation than serde_json does.
    let payload = json!({
        "big": 1e16, "bigger": 1.5e17, "negative": -9.2e18, "near_u64_max": 1.8e19, "huge": 1e300,
        "tiny": 1.5e-7, "negative_zero": -0.0, "u64": 12345678901234567890u64, "i64": i64::MIN,
        "fraction": 0.1, "hundred": 1e2,
    });
    let batch = vec![event("Numbers", payload)];
    store
        .append(&s, ExpectedVersion::NoStream, batch.clone())
        .await
        .unwrap();
    assert!(store.verify_stream(&s).await.unwrap().ok);
    let resent = store.append(&s, ExpectedVersion::Any, batch).await.unwrap();
    assert!(
        resent.deduplicated,
        "the stored numbers compare equal to the sent ones"
    );
}

async fn append_with_stale_version_conflicts_and_writes_nothing(backend: Backend) {
    let store = backend.open().await;
    let s = stream("workflow-stale");
    store
        .append(&s, ExpectedVersion::NoStream, events(2, "a"))
        .await
        .unwrap();
    let stale = store
        .append(&s, ExpectedVersion::Exact(0), events(1, "b"))
        .await;
    assert!(
        matches!(
            &stale,
            Err(StoreError::Conflict {
                expected: ExpectedVersion::Exact(0),
                actual: Some(1),
                ..
            })
        ),
        "{stale:?}"
    );
    let exists = store
        .append(&s, ExpectedVersion::NoStream, events(1, "c"))
        .await;
    assert!(
        matches!(
            exists,
            Err(StoreError::Conflict {
                actual: Some(1),
                ..
            })
        ),
        "{exists:?}"
    );
    let missing = store
        .append(
            &stream("workflow-missing"),
            ExpectedVersion::Exact(0),
            events(1, "d"),
        )
        .await;
    assert!(
        matches!(missing, Err(StoreError::Conflict { actual: None, .. })),
        "{missing:?}"
    );
    assert_eq!(store.head_position().await.unwrap(), 2);
    assert_eq!(store.read_all(1, 100).await.unwrap().len(), 2);
    let any = store
        .append(&s, ExpectedVersion::Any, events(1, "e"))
        .await
        .unwrap();
    assert_eq!((any.stream_version, any.last_position), (2, 3));
}

async fn racing_exact_appenders_one_wins_and_the_stream_has_no_hole(backend: Backend) {
    let (a, b) = (backend.open().await, backend.open().await);
    let s = stream("workflow-race");
    for round in 0..20u64 {
        let expected = match round {
            0 => ExpectedVersion::NoStream,
            n => ExpectedVersion::Exact(n - 1),
        };
        let (first, second) = tokio::join!(
            a.append(&s, expected, events(1, "a")),
            b.append(&s, expected, events(1, "b"))
        );
        let outcomes = [first, second];
        assert_eq!(
            outcomes.iter().filter(|r| r.is_ok()).count(),
            1,
            "round {round}: {outcomes:?}"
        );
        assert!(outcomes
            .iter()
            .any(|r| matches!(r, Err(StoreError::Conflict { .. }))));
    }
    let read = a.read_stream(&s, 0, 100).await.unwrap();
    assert_eq!(
        read.iter().map(|e| e.stream_version).collect::<Vec<_>>(),
        (0..20).collect::<Vec<_>>()
    );
    assert!(a.verify_stream(&s).await.unwrap().ok);
}

async fn resent_batch_is_stored_once(backend: Backend) {
    let store = backend.open().await;
    let s = stream("workflow-idem");
    let batch = events(3, "once");
    let first = store
        .append(&s, ExpectedVersion::NoStream, batch.clone())
        .await
        .unwrap();
    // Same ids, same content, and an expected version that no longer holds.
    let again = store
        .append(&s, ExpectedVersion::NoStream, batch.clone())
        .await
        .unwrap();
    assert!(again.deduplicated);
    assert_eq!(
        (
            again.first_position,
            again.last_position,
            again.stream_version
        ),
        (
            first.first_position,
            first.last_position,
            first.stream_version
        )
    );
    // Concurrent resends from two handles also leave one copy.
    let other = backend.open().await;
    let (x, y) = tokio::join!(
        store.append(&s, ExpectedVersion::Any, batch.clone()),
        other.append(&s, ExpectedVersion::Any, batch.clone())
    );
    assert!(x.unwrap().deduplicated && y.unwrap().deduplicated);
    assert_eq!(store.read_stream(&s, 0, 100).await.unwrap().len(), 3);
    assert_eq!(store.head_position().await.unwrap(), 3);
}

async fn same_event_id_with_other_content_is_refused(backend: Backend) {
    let store = backend.open().await;
    let s = stream("workflow-mismatch");
    let original = events(1, "original");
    store
        .append(&s, ExpectedVersion::Any, original.clone())
        .await
        .unwrap();
    let mut changed = original.clone();
    changed[0].payload = json!({"tag": "changed"});
    let refused = store.append(&s, ExpectedVersion::Any, changed).await;
    assert!(
        matches!(refused, Err(StoreError::IdempotencyMismatch { .. })),
        "{refused:?}"
    );
    // A batch mixing a stored id with a new one is refused as a whole.
    let mut mixed = original.clone();
    mixed.extend(events(1, "new"));
    let refused = store.append(&s, ExpectedVersion::Any, mixed).await;
    assert!(
        matches!(refused, Err(StoreError::IdempotencyMismatch { .. })),
        "{refused:?}"
    );
    assert_eq!(store.head_position().await.unwrap(), 1);
}

async fn bad_input_is_refused_and_writes_nothing(backend: Backend) {
    let store = backend.open().await;
    for bad in [
        "",
        "$all",
        "has space",
        "슬래시/없음",
        &"x".repeat(MAX_STREAM_ID_LEN + 1),
    ] {
        assert!(
            matches!(StreamId::new(bad), Err(StoreError::BadInput(_))),
            "{bad:?} accepted"
        );
    }
    let s = stream("workflow-bad");
    let huge = "가".repeat(Limits::default().max_payload_bytes / 3 + 1);
    let mut duplicate = events(1, "dup");
    duplicate.push(duplicate[0].clone());
    let mut zero_schema = events(1, "schema");
    zero_schema[0].schema_version = 0;
    let cases: Vec<(&str, Vec<NewEvent>)> = vec![
        (
            "oversized payload",
            vec![event("Big", json!({ "text": huge }))],
        ),
        ("array payload", vec![event("Arr", json!([1, 2]))]),
        ("string payload", vec![event("Str", json!("text"))]),
        (
            "NUL in payload",
            vec![event("Nul", json!({"text": "a\u{0}b"}))],
        ),
        ("NUL in a key", vec![event("Nul", json!({"a\u{0}": 1}))]),
        ("empty event type", vec![event("", json!({}))]),
        ("event type with space", vec![event("Two words", json!({}))]),
        ("no events", vec![]),
        ("duplicate ids", duplicate),
        ("schema version 0", zero_schema),
        (
            "too many events",
            events(Limits::default().max_events_per_append + 1, "many"),
        ),
    ];
    for (what, batch) in cases {
        let outcome = store.append(&s, ExpectedVersion::Any, batch).await;
        assert!(
            matches!(outcome, Err(StoreError::BadInput(_))),
            "{what}: {outcome:?}"
        );
    }
    // A valid event in a batch with a bad one does not get written either.
    let mut mixed = events(1, "good");
    mixed.push(event("Bad", json!(null)));
    assert!(matches!(
        store.append(&s, ExpectedVersion::Any, mixed).await,
        Err(StoreError::BadInput(_))
    ));
    assert_eq!(store.head_position().await.unwrap(), 0);
    assert!(store.read_all(1, 10).await.unwrap().is_empty());
}

async fn read_all_is_inclusive_and_head_tracks_the_last_position(backend: Backend) {
    let store = backend.open().await;
    assert_eq!(store.head_position().await.unwrap(), 0);
    for (i, name) in ["s-1", "s-2", "s-1"].iter().enumerate() {
        store
            .append(
                &stream(name),
                ExpectedVersion::Any,
                events(2, &i.to_string()),
            )
            .await
            .unwrap();
    }
    assert_eq!(store.head_position().await.unwrap(), 6);
    let positions =
        |events: Vec<RecordedEvent>| events.iter().map(|e| e.global_position).collect::<Vec<_>>();
    assert_eq!(
        positions(store.read_all(0, 100).await.unwrap()),
        vec![1, 2, 3, 4, 5, 6]
    );
    assert_eq!(positions(store.read_all(4, 2).await.unwrap()), vec![4, 5]);
    assert!(store.read_all(7, 10).await.unwrap().is_empty());
}

async fn pages_end_at_their_byte_bound_and_subscribers_of_large_events_see_them_all(
    backend: Backend,
) {
    let store = backend.open().await;
    // 24 events of ~100 KB each (Korean text: 3 bytes a character), in two
    // streams: 2.4 MB, more than two catch-up pages by bytes, far fewer
    // than one by count.
    let text = "감사 기록 ".repeat(7_500);
    for round in 0..6 {
        for name in ["big-a", "big-b"] {
            let batch = (0..2)
                .map(|i| event("Large", json!({"round": round, "i": i, "text": text})))
                .collect();
            store
                .append(&stream(name), ExpectedVersion::Any, batch)
                .await
                .unwrap();
        }
    }
    let weight = store.read_all(1, 1).await.unwrap()[0].document_bytes();
    assert!(weight > 100_000, "{weight}");

    let page = store
        .read_page(ReadFrom::All(1), 500, weight * 5 / 2)
        .await
        .unwrap();
    let positions: Vec<_> = page.events.iter().map(|e| e.global_position).collect();
    assert_eq!(
        positions,
        vec![1, 2, 3],
        "ends with the event past the bound"
    );
    assert!(page.cut);
    let page = store
        .read_page(ReadFrom::Stream(&stream("big-b"), 1), 500, weight * 5 / 2)
        .await
        .unwrap();
    let versions: Vec<_> = page.events.iter().map(|e| e.stream_version).collect();
    assert_eq!(versions, vec![1, 2, 3]);
    assert!(page.cut);
    let one = store.read_page(ReadFrom::All(5), 500, 10).await.unwrap();
    assert_eq!(one.events.len(), 1, "one event at least, whatever its size");
    assert!(one.cut);
    let whole = store
        .read_page(ReadFrom::All(1), 500, usize::MAX)
        .await
        .unwrap();
    assert_eq!((whole.events.len(), whole.cut), (24, false));
    let short = store
        .read_page(ReadFrom::All(1), 4, usize::MAX)
        .await
        .unwrap();
    assert_eq!((short.events.len(), short.cut), (4, false));

    // Nothing is appended while they catch up: a page cut by bytes is not
    // mistaken for the end.
    let mut all = store.subscribe_all(1);
    for expected in 1..=24 {
        assert_eq!(all.next().await.unwrap().unwrap().global_position, expected);
    }
    let mut one_stream = store.subscribe_stream(stream("big-a"), 0);
    for expected in 0..12 {
        assert_eq!(
            one_stream.next().await.unwrap().unwrap().stream_version,
            expected
        );
    }
    assert!(all.next().now_or_never().is_none());
}

async fn subscribe_all_delivers_events_appended_during_catch_up_once(backend: Backend) {
    let store = backend.open().await;
    let writer = backend.open().await;
    // More than two catch-up pages before subscribing.
    let before = subscription::CATCH_UP_PAGE * 2 + 17;
    for chunk in 0..before.div_ceil(100) {
        let n = 100.min(before - chunk * 100);
        writer
            .append(&stream("seam-a"), ExpectedVersion::Any, events(n, "before"))
            .await
            .unwrap();
    }
    let mut sub = store.subscribe_all(1);
    // Take part of the catch-up, then append while the rest is still being read.
    let mut seen = Vec::new();
    for _ in 0..subscription::CATCH_UP_PAGE / 2 {
        seen.push(sub.next().await.unwrap().unwrap().global_position);
    }
    let during = 300;
    for _ in 0..3 {
        writer
            .append(
                &stream("seam-b"),
                ExpectedVersion::Any,
                events(during / 3, "during"),
            )
            .await
            .unwrap();
    }
    let total = (before + during) as u64;
    while seen.len() < total as usize {
        seen.push(sub.next().await.unwrap().unwrap().global_position);
    }
    assert_eq!(seen, (1..=total).collect::<Vec<_>>());
    // And live after the seam.
    writer
        .append(&stream("seam-c"), ExpectedVersion::Any, events(1, "after"))
        .await
        .unwrap();
    assert_eq!(
        sub.next().await.unwrap().unwrap().global_position,
        total + 1
    );
    assert!(
        sub.next().now_or_never().is_none(),
        "nothing more was appended"
    );
}

async fn subscribe_stream_delivers_only_its_stream_across_the_seam(backend: Backend) {
    let store = backend.open().await;
    let (mine, other) = (stream("workflow-mine"), stream("workflow-other"));
    store
        .append(&mine, ExpectedVersion::Any, events(3, "mine"))
        .await
        .unwrap();
    store
        .append(&other, ExpectedVersion::Any, events(3, "other"))
        .await
        .unwrap();
    let mut sub = store.subscribe_stream(mine.clone(), 1);
    let first = sub.next().await.unwrap().unwrap();
    assert_eq!(
        (first.stream_id.as_str(), first.stream_version),
        ("workflow-mine", 1)
    );
    store
        .append(&other, ExpectedVersion::Any, events(2, "other"))
        .await
        .unwrap();
    store
        .append(&mine, ExpectedVersion::Any, events(2, "mine"))
        .await
        .unwrap();
    let mut versions = vec![first.stream_version];
    while versions.len() < 4 {
        let e = sub.next().await.unwrap().unwrap();
        assert_eq!(e.stream_id, mine);
        versions.push(e.stream_version);
    }
    assert_eq!(versions, vec![1, 2, 3, 4]);
    assert!(sub.next().now_or_never().is_none());
}

/// The progress subscription opens its stream subscription, reads the
/// stream itself, and tells the subscription how far it read: the events
/// committed after the read (one of them while the caller was still busy
/// with what it read) arrive live, each once, in order.
async fn a_stream_read_by_the_caller_after_subscribing_goes_on_without_gap_or_repeat(
    backend: Backend,
) {
    let store = backend.open().await;
    let mine = stream("workflow-read-by-caller");
    store
        .append(&mine, ExpectedVersion::Any, events(3, "before"))
        .await
        .unwrap();
    let mut sub = store.subscribe_stream(mine.clone(), 0);
    let read = store.read_stream(&mine, 0, 100).await.unwrap();
    assert_eq!(read.len(), 3);
    store
        .append(&mine, ExpectedVersion::Any, events(1, "between"))
        .await
        .unwrap();
    sub.read_by_caller(read.len() as u64);
    store
        .append(&mine, ExpectedVersion::Any, events(2, "after"))
        .await
        .unwrap();
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let e = sub.next().await.unwrap().unwrap();
        seen.push((
            e.stream_version,
            e.payload["tag"].as_str().unwrap().to_string(),
        ));
    }
    assert_eq!(
        seen,
        vec![
            (3, "between".to_string()),
            (4, "after".to_string()),
            (5, "after".to_string())
        ]
    );
    assert!(sub.next().now_or_never().is_none(), "nothing twice");
}

async fn subscriber_that_fell_behind_the_live_buffer_still_sees_everything_once(backend: Backend) {
    let store = backend.open().await;
    let mut sub = store.subscribe_all(1);
    let first = store
        .append(&stream("lag"), ExpectedVersion::Any, events(1, "first"))
        .await
        .unwrap();
    assert_eq!(
        sub.next().await.unwrap().unwrap().global_position,
        first.last_position
    );
    // Now stop consuming while far more than the live buffer is appended.
    let total = LIVE_BUFFER + 600;
    for _ in 0..total / 200 {
        store
            .append(&stream("lag"), ExpectedVersion::Any, events(200, "burst"))
            .await
            .unwrap();
    }
    let expected: Vec<u64> = store
        .read_all(first.last_position + 1, usize::MAX)
        .await
        .unwrap()
        .iter()
        .map(|e| e.global_position)
        .collect();
    assert_eq!(expected.len(), total / 200 * 200);
    for position in expected {
        assert_eq!(sub.next().await.unwrap().unwrap().global_position, position);
    }
    assert!(sub.next().now_or_never().is_none());
}

async fn concurrent_writers_and_a_tailing_reader_agree_on_one_gap_free_order(backend: Backend) {
    const WRITERS: usize = 16;
    const EVENTS_PER_WRITER: usize = 2_000;
    const STREAMS: usize = 24;
    let total = (WRITERS * EVENTS_PER_WRITER) as u64;

    let reader = backend.open().await;
    let tail = tokio::spawn(async move {
        let mut sub = reader.subscribe_all(0);
        let mut seen = Vec::with_capacity(total as usize);
        while (seen.len() as u64) < total {
            let event = sub.next().await.expect("store alive").expect("read");
            seen.push((event.global_position, event.event_id));
        }
        (seen, sub)
    });

    // Four handles (four "processes" on PostgreSQL), four writers on each.
    let mut handles = Vec::new();
    for _ in 0..4 {
        handles.push(backend.open().await);
    }
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let store = handles[w % handles.len()].clone();
            tokio::spawn(async move {
                let mut written = 0;
                let mut i = 0usize;
                // What this writer last saw of each stream: often stale, which
                // makes exact-version appends conflict and retry.
                let mut known: Vec<Option<u64>> = vec![None; STREAMS];
                while written < EVENTS_PER_WRITER {
                    // Overlapping streams; batches of 1 to 4 events; every third with an exact version.
                    let k = (w * 7 + i) % STREAMS;
                    let s = stream(&format!("load-{k}"));
                    let n = (1 + (w + i) % 4).min(EVENTS_PER_WRITER - written);
                    let expected = match (i % 3, known[k]) {
                        (0, Some(v)) => ExpectedVersion::Exact(v),
                        (0, None) => ExpectedVersion::NoStream,
                        _ => ExpectedVersion::Any,
                    };
                    match store
                        .append(&s, expected, events(n, &format!("w{w}-{i}")))
                        .await
                    {
                        Ok(result) => {
                            written += n;
                            known[k] = Some(result.stream_version);
                            i += 1;
                        }
                        // Retry the same slot with what the conflict reported.
                        Err(StoreError::Conflict { actual, .. }) => known[k] = actual,
                        Err(e) => panic!("writer {w}: {e}"),
                    }
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
    let (seen, mut sub) = tail.await.unwrap();

    assert!(
        seen.windows(2).all(|w| w[0].0 < w[1].0),
        "positions strictly increase"
    );
    assert!(
        sub.next().now_or_never().is_none(),
        "nothing beyond what was written"
    );
    let store = backend.open().await;
    let read_back = store.read_all(1, usize::MAX).await.unwrap();
    assert_eq!(
        read_back
            .iter()
            .map(|e| (e.global_position, e.event_id))
            .collect::<Vec<_>>(),
        seen,
        "the tailing reader saw exactly what $all reads back, in the same order"
    );
    assert_eq!(
        seen.iter().map(|(_, id)| *id).collect::<HashSet<_>>().len(),
        total as usize
    );

    let mut per_stream: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for e in &read_back {
        per_stream
            .entry(e.stream_id.as_str())
            .or_default()
            .push(e.stream_version);
    }
    for (name, versions) in per_stream {
        assert_eq!(
            versions,
            (0..versions.len() as u64).collect::<Vec<_>>(),
            "{name} has a hole"
        );
        assert!(
            store.verify_stream(&stream(name)).await.unwrap().ok,
            "{name} verifies"
        );
    }
}
