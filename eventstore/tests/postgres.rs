//! Guarantees only the PostgreSQL store has to prove: tamper detection on
//! stored rows, immutability, the least-privileged role, and the scripted
//! interleaving behind the gap-safe global order.

use std::sync::Arc;
use std::time::Duration;

use agentledger_eventstore::testing::{connect, TestDatabase};
use agentledger_eventstore::*;
use futures::FutureExt;
use serde_json::json;
use tokio::sync::Notify;

fn stream(name: &str) -> StreamId {
    StreamId::new(name).unwrap()
}

fn events(n: usize) -> Vec<NewEvent> {
    (0..n)
        .map(|i| {
            let mut metadata = Metadata::new(Actor::agent("lubit", "1"));
            metadata.correlation_id = Some(uuid::Uuid::now_v7());
            NewEvent::new(
                format!("Step{i}"),
                json!({"i": i, "text": "검토 완료", "score": 0.75}),
                metadata,
            )
        })
        .collect()
}

/// Seeds one stream of five events and returns the database and the positions.
async fn seeded() -> (TestDatabase, PostgresEventStore, StreamId, Vec<u64>) {
    let db = TestDatabase::create().await;
    let store = db.store().await;
    let s = stream("workflow-tamper");
    store
        .append(&stream("workflow-other"), ExpectedVersion::Any, events(2))
        .await
        .unwrap();
    store
        .append(&s, ExpectedVersion::NoStream, events(5))
        .await
        .unwrap();
    let positions = store
        .read_stream(&s, 0, 10)
        .await
        .unwrap()
        .iter()
        .map(|e| e.global_position)
        .collect();
    assert!(
        store.verify_stream(&s).await.unwrap().ok,
        "the untouched stream verifies after the jsonb round trip"
    );
    (db, store, s, positions)
}

/// Runs `sql` as the superuser with the immutability triggers disabled.
async fn tamper(db: &TestDatabase, sql: &str) {
    let admin = db.admin_client().await;
    admin
        .batch_execute(&format!(
            "ALTER TABLE events DISABLE TRIGGER USER; {sql}; ALTER TABLE events ENABLE TRIGGER USER;"
        ))
        .await
        .unwrap();
}

async fn assert_broken_at(store: &PostgresEventStore, s: &StreamId, position: u64) {
    let verification = store.verify_stream(s).await.unwrap();
    assert!(!verification.ok, "tampering went unnoticed");
    assert_eq!(
        verification.first_broken_position,
        Some(position),
        "{verification:?}"
    );
    assert!(verification.reason.is_some());
}

#[tokio::test]
async fn one_changed_byte_of_a_payload_is_found_at_its_position() {
    let (db, store, s, positions) = seeded().await;
    // 0.75 → 0.76: one byte of the stored document.
    tamper(&db, &format!("UPDATE events SET payload = jsonb_set(payload, '{{score}}', '0.76') WHERE global_position = {}", positions[2])).await;
    assert_broken_at(&store, &s, positions[2]).await;
}

#[tokio::test]
async fn a_changed_metadata_field_is_found_at_its_position() {
    let (db, store, s, positions) = seeded().await;
    tamper(&db, &format!("UPDATE events SET metadata = jsonb_set(metadata, '{{actor,name}}', '\"rune\"') WHERE global_position = {}", positions[3])).await;
    assert_broken_at(&store, &s, positions[3]).await;
}

#[tokio::test]
async fn a_changed_event_type_is_found_at_its_position() {
    let (db, store, s, positions) = seeded().await;
    tamper(
        &db,
        &format!(
            "UPDATE events SET event_type = 'Step9' WHERE global_position = {}",
            positions[1]
        ),
    )
    .await;
    assert_broken_at(&store, &s, positions[1]).await;
}

#[tokio::test]
async fn two_swapped_events_are_found_at_the_first_of_them() {
    let (db, store, s, positions) = seeded().await;
    // Versions 1 and 3 trade places (position and version), as a reordering would.
    let (a, b) = (positions[1], positions[3]);
    tamper(
        &db,
        &format!(
            "UPDATE events SET global_position = 1000000, stream_version = 1000000 WHERE global_position = {a};
             UPDATE events SET global_position = {a}, stream_version = 1 WHERE global_position = {b};
             UPDATE events SET global_position = {b}, stream_version = 3 WHERE global_position = 1000000"
        ),
    )
    .await;
    assert_broken_at(&store, &s, a).await;
}

#[tokio::test]
async fn a_deleted_event_in_the_middle_is_found() {
    let (db, store, s, positions) = seeded().await;
    tamper(
        &db,
        &format!(
            "DELETE FROM events WHERE global_position = {}",
            positions[2]
        ),
    )
    .await;
    // The next event now stands where version 2 was expected.
    assert_broken_at(&store, &s, positions[3]).await;
}

#[tokio::test]
async fn the_triggers_refuse_update_delete_and_truncate_even_for_the_owner() {
    let (db, store, s, positions) = seeded().await;
    let admin = db.admin_client().await;
    for sql in [
        format!(
            "UPDATE events SET event_type = 'X' WHERE global_position = {}",
            positions[0]
        ),
        format!(
            "DELETE FROM events WHERE global_position = {}",
            positions[0]
        ),
        "TRUNCATE events".to_string(),
    ] {
        let error = admin.batch_execute(&sql).await.expect_err(&sql);
        assert_eq!(
            error.code(),
            Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
            "{sql}: {error}"
        );
    }
    assert_eq!(store.read_stream(&s, 0, 10).await.unwrap().len(), 5);
}

#[tokio::test]
async fn the_service_role_can_append_and_read_but_not_change_or_delete() {
    let db = TestDatabase::create().await;
    let store = db.store().await; // connected as the service role
    store
        .append(&stream("workflow-role"), ExpectedVersion::Any, events(1))
        .await
        .unwrap();
    let service = connect(&db.service_url()).await;
    let who: String = service
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(who, testing::SERVICE_ROLE);
    for sql in [
        "UPDATE events SET event_type = 'X'",
        "DELETE FROM events",
        "TRUNCATE events",
        "ALTER TABLE events DISABLE TRIGGER USER",
    ] {
        let error = service.batch_execute(sql).await.expect_err(sql);
        let code = error.code().cloned();
        assert!(
            code == Some(tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE)
                || code == Some(tokio_postgres::error::SqlState::WRONG_OBJECT_TYPE)
                || error.to_string().contains("must be owner"),
            "{sql}: {error}"
        );
    }
    assert_eq!(store.head_position().await.unwrap(), 1);
}

#[tokio::test]
async fn migrations_are_idempotent_and_safe_to_run_concurrently() {
    let db = TestDatabase::create().await;
    let (a, b) = tokio::join!(migrate::run(db.admin_url()), migrate::run(db.admin_url()));
    assert!(
        a.unwrap().is_empty() && b.unwrap().is_empty(),
        "already applied"
    );
}

/// Waits until some session of `db` is queued for an advisory lock:
/// observable state, polled because PostgreSQL offers no event for it.
async fn until_a_session_waits_for_an_advisory_lock(db: &TestDatabase) {
    let admin = db.admin_client().await;
    for _ in 0..2_000 {
        let waiting: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted \
                 AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if waiting > 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("no session ever queued for an advisory lock");
}

/// A commit hook that holds every append between its insert and its
/// commit: `inserted` is signalled when the rows are in, and the commit
/// waits for `release`.
fn held_commit() -> (postgres::CommitHook, Arc<Notify>, Arc<Notify>) {
    let (inserted, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let hook: postgres::CommitHook = {
        let (inserted, release) = (inserted.clone(), release.clone());
        Arc::new(move || {
            let (inserted, release) = (inserted.clone(), release.clone());
            async move {
                inserted.notify_one();
                release.notified().await;
            }
            .boxed()
        })
    };
    (hook, inserted, release)
}

/// The scripted interleaving behind the gap-safe order: process A holds an
/// uncommitted append; process B appends later, takes a higher position and
/// commits first. A reader must not see B's event while A's lower position
/// can still commit, then must see both, in position order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_commit_stays_invisible_until_the_earlier_append_commits() {
    let db = TestDatabase::create().await;
    let (hook, inserted, release) = held_commit();
    let a = db
        .store_with(PostgresOptions {
            before_commit: Some(hook),
            ..Default::default()
        })
        .await;
    let b = db.store().await;
    let reader = db.store().await;
    let mut sub = reader.subscribe_all(1);

    let a_append = tokio::spawn(async move {
        a.append(&stream("stream-a"), ExpectedVersion::Any, events(2))
            .await
    });
    inserted.notified().await; // A's rows are in, uncommitted.

    let b_result = b
        .append(&stream("stream-b"), ExpectedVersion::Any, events(1))
        .await
        .unwrap();
    assert!(!a_append.is_finished());
    assert!(
        b_result.first_position > 2,
        "B took a position after A's two"
    );
    let raw: i64 = db
        .admin_client()
        .await
        .query_one("SELECT count(*) FROM events", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(raw, 1, "B's event is committed");
    assert_eq!(
        reader.head_position().await.unwrap(),
        0,
        "but nothing is readable while A can still commit"
    );
    assert!(reader.read_all(1, 10).await.unwrap().is_empty());
    assert!(
        sub.next().now_or_never().is_none(),
        "the subscriber saw an event past an unsettled position"
    );

    release.notify_one();
    let a_result = a_append.await.unwrap().unwrap();
    assert_eq!((a_result.first_position, a_result.last_position), (1, 2));
    let mut seen = Vec::new();
    for _ in 0..3 {
        let e = sub.next().await.unwrap().unwrap();
        seen.push((e.global_position, e.stream_id.to_string()));
    }
    assert_eq!(
        seen,
        vec![
            (1, "stream-a".to_string()),
            (2, "stream-a".to_string()),
            (b_result.first_position, "stream-b".to_string())
        ]
    );
    assert_eq!(
        reader.head_position().await.unwrap(),
        b_result.first_position
    );
}

/// The same interleaving seen from the process that commits first: its
/// tailer knows its own events without reading them, and they must still
/// reach its subscribers only after another process's lower positions
/// settled, in position order. (Subscribers check positions too and read
/// the table when the feed jumps; this proves the whole, not the tailer.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_holds_back_its_own_commit_behind_another_ones_unsettled_append() {
    let db = TestDatabase::create().await;
    let (hook, inserted, release) = held_commit();
    let a = db
        .store_with(PostgresOptions {
            before_commit: Some(hook),
            ..Default::default()
        })
        .await;
    let b = db.store().await;
    let mut sub = b.subscribe_all(1);
    // A first event, so that B's subscriber is caught up and live.
    b.append(&stream("warm-up"), ExpectedVersion::Any, events(1))
        .await
        .unwrap();
    assert_eq!(sub.next().await.unwrap().unwrap().global_position, 1);

    let a_append = tokio::spawn(async move {
        a.append(&stream("stream-a"), ExpectedVersion::Any, events(2))
            .await
    });
    inserted.notified().await;
    let b_result = b
        .append(&stream("stream-b"), ExpectedVersion::Any, events(1))
        .await
        .unwrap();
    assert!(b_result.first_position > 3);
    // B's tailer has had its wake-up; give it the chance to misbehave.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        sub.next().now_or_never().is_none(),
        "B passed on its own event past A's unsettled positions"
    );
    release.notify_one();
    a_append.await.unwrap().unwrap();
    let mut seen = Vec::new();
    for _ in 0..3 {
        let e = sub.next().await.unwrap().unwrap();
        seen.push((e.global_position, e.stream_id.to_string()));
    }
    assert_eq!(
        seen,
        vec![
            (2, "stream-a".to_string()),
            (3, "stream-a".to_string()),
            (b_result.first_position, "stream-b".to_string())
        ]
    );
}

/// A process passes its own commits to its subscribers as the writer built
/// them: they must equal what reading them back returns, field for field,
/// whatever the documents hold (floats with and without fractions, big
/// integers, Korean text, nesting, nulls).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_passed_on_without_a_read_equal_the_stored_ones() {
    let db = TestDatabase::create().await;
    let store = db.store().await;
    let mut sub = store.subscribe_all(1);
    let documents = [
        json!({"score": 2.0, "half": 0.5, "tiny": 1e-7, "big": 1e300}),
        json!({"n": 12_345_678_901_234_u64, "neg": -3, "text": "한국어 요청을 분석합니다 ✓"}),
        json!({"nested": {"b": 1, "a": [1.5, null, true, "x"]}, "empty": {}, "list": []}),
    ];
    let mut written = 0;
    for (i, payload) in documents.iter().enumerate() {
        let mut metadata = Metadata::new(Actor::agent("sena", "1.0"));
        metadata.correlation_id = Some(uuid::Uuid::now_v7());
        let event = NewEvent::new(format!("Kind{i}"), payload.clone(), metadata);
        // Several appends in a row, and one of two events, so that groups
        // follow on from each other.
        let batch = if i == 2 {
            vec![event.clone(), events(1).remove(0)]
        } else {
            vec![event]
        };
        written += batch.len();
        store
            .append(&stream(&format!("docs-{i}")), ExpectedVersion::Any, batch)
            .await
            .unwrap();
    }
    let mut live = Vec::new();
    for _ in 0..written {
        live.push(sub.next().await.unwrap().unwrap());
    }
    let stored = store.read_all(1, 100).await.unwrap();
    assert_eq!(stored.len(), written);
    for (live, stored) in live.iter().zip(&stored) {
        assert_eq!(**live, *stored, "live and stored differ");
        assert_eq!(
            serde_json::to_string(&live.payload).unwrap(),
            serde_json::to_string(&stored.payload).unwrap()
        );
    }
    for i in 0..documents.len() {
        let verification = store
            .verify_stream(&stream(&format!("docs-{i}")))
            .await
            .unwrap();
        assert!(verification.ok, "docs-{i}: {:?}", verification.reason);
    }
}

/// The window between taking a position and marking it in flight: while a
/// writer is inside it (gate held, position taken, not yet marked), a reader
/// must wait at the gate instead of computing a mark that covers the
/// position, and then must see it as in flight until it commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mark_never_covers_a_position_taken_but_not_yet_marked() {
    let db = TestDatabase::create().await;
    let store = db.store().await;
    store
        .append(&stream("stream-before"), ExpectedVersion::Any, events(1))
        .await
        .unwrap();
    let safe_position = |url: String| async move {
        let reader = connect(&url).await;
        reader
            .query_one("SELECT events_safe_position()", &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    assert_eq!(safe_position(db.service_url()).await, 1);

    // A writer stopped inside the window, as events_reserve would be.
    let slow = db.admin_client().await;
    slow.batch_execute("BEGIN").await.unwrap();
    slow.execute("SELECT pg_advisory_lock($1)", &[&postgres::GATE_LOCK])
        .await
        .unwrap();
    let taken: i64 = slow
        .query_one("SELECT nextval('events_position_seq')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(taken, 2);

    let mark = tokio::spawn(safe_position(db.service_url()));
    until_a_session_waits_for_an_advisory_lock(&db).await;
    assert!(
        !mark.is_finished(),
        "the mark was computed while a writer was inside the window"
    );

    slow.execute("SELECT pg_advisory_xact_lock_shared($1)", &[&taken])
        .await
        .unwrap();
    slow.execute("SELECT pg_advisory_unlock($1)", &[&postgres::GATE_LOCK])
        .await
        .unwrap();
    assert_eq!(
        mark.await.unwrap(),
        taken - 1,
        "position {taken} can still commit"
    );

    slow.execute(
        "INSERT INTO events (global_position, stream_id, stream_version, event_id, event_type, schema_version, \
             payload, metadata, recorded_at, hash_version, prev_hash, hash) \
         VALUES ($1, 'stream-slow', 0, gen_random_uuid(), 'Slow', 1, '{}', '{}', now(), 1, $2, $2)",
        &[&taken, &vec![0u8; 32]],
    )
    .await
    .unwrap();
    assert_eq!(
        safe_position(db.service_url()).await,
        taken - 1,
        "still in flight until it commits"
    );
    slow.batch_execute("COMMIT").await.unwrap();
    assert_eq!(safe_position(db.service_url()).await, taken);
    let positions: Vec<u64> = store
        .read_all(1, 10)
        .await
        .unwrap()
        .iter()
        .map(|e| e.global_position)
        .collect();
    assert_eq!(positions, vec![1, 2]);
}

/// Positions taken by an append that failed are skipped by readers instead
/// of holding them up forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_append_leaves_a_hole_that_readers_pass() {
    let db = TestDatabase::create().await;
    let (a, b) = (db.store().await, db.store().await);
    let s = stream("workflow-hole");
    a.append(&s, ExpectedVersion::NoStream, events(1))
        .await
        .unwrap();
    // B believes the stream is new: its insert fails on the version key and
    // burns a position before the checked path reports the conflict.
    let conflict = b.append(&s, ExpectedVersion::NoStream, events(1)).await;
    assert!(
        matches!(
            conflict,
            Err(StoreError::Conflict {
                actual: Some(0),
                ..
            })
        ),
        "{conflict:?}"
    );
    let after = a
        .append(&s, ExpectedVersion::Exact(0), events(1))
        .await
        .unwrap();
    assert!(after.first_position > 2, "a position was burned: {after:?}");
    let positions: Vec<u64> = b
        .read_all(1, 10)
        .await
        .unwrap()
        .iter()
        .map(|e| e.global_position)
        .collect();
    assert_eq!(positions, vec![1, after.first_position]);
    assert_eq!(b.head_position().await.unwrap(), after.first_position);
    assert!(b.verify_stream(&s).await.unwrap().ok);
}

/// The gate is a session lock: a reader that fails while waiting for it or
/// while holding it must not leave it held by its (pooled) connection, or
/// every later append would wait forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_reader_leaves_no_gate_behind() {
    let db = TestDatabase::create().await;
    let store = db.store().await;
    let admin = db.admin_client().await;
    let reader = connect(&db.service_url()).await;
    let held_by_reader = || async {
        let sql =
            "SELECT count(*) FROM pg_locks WHERE pid = pg_backend_pid() AND locktype = 'advisory'";
        reader.query_one(sql, &[]).await.unwrap().get::<_, i64>(0)
    };

    // Cancelled while waiting for the gate.
    admin
        .execute("SELECT pg_advisory_lock($1)", &[&postgres::GATE_LOCK])
        .await
        .unwrap();
    reader
        .batch_execute("SET statement_timeout = '100ms'")
        .await
        .unwrap();
    let error = reader
        .query_one("SELECT events_safe_position()", &[])
        .await
        .expect_err("times out at the gate");
    assert_eq!(
        error.code(),
        Some(&tokio_postgres::error::SqlState::QUERY_CANCELED),
        "{error}"
    );
    admin
        .execute("SELECT pg_advisory_unlock($1)", &[&postgres::GATE_LOCK])
        .await
        .unwrap();
    reader
        .batch_execute("RESET statement_timeout")
        .await
        .unwrap();
    assert_eq!(held_by_reader().await, 0);

    // Failing while holding the gate: the sequence read is refused after the lock.
    admin
        .batch_execute("REVOKE SELECT ON SEQUENCE events_position_seq FROM agentledger_service")
        .await
        .unwrap();
    let error = reader
        .query_one("SELECT events_safe_position()", &[])
        .await
        .expect_err("permission denied");
    assert_eq!(
        error.code(),
        Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
        "{error}"
    );
    assert_eq!(held_by_reader().await, 0, "the failed reader kept the gate");
    admin
        .batch_execute("GRANT SELECT ON SEQUENCE events_position_seq TO agentledger_service")
        .await
        .unwrap();

    store
        .append(&stream("after-failures"), ExpectedVersion::Any, events(1))
        .await
        .unwrap();
    assert_eq!(
        reader
            .query_one("SELECT events_safe_position()", &[])
            .await
            .unwrap()
            .get::<_, i64>(0),
        1
    );
}

/// A ledger of 1,000 events over 40 streams, verified whole and signed,
/// then with one column of one event changed, every column in turn at
/// another place: `verify_ledger` names that event, `verify_stream` (the
/// workflow's check) fails, and the digest taken before fails naming it.
/// Moving an event's position is seen by the digest.
#[tokio::test]
async fn any_changed_column_in_a_thousand_events_is_found_by_the_chains_and_a_digest_taken_before()
{
    let db = TestDatabase::create().await;
    let store = db.store().await;
    for round in 0..5 {
        for s in 0..40 {
            let name = stream(&format!("workflow-{s}"));
            let expected = if round == 0 {
                ExpectedVersion::NoStream
            } else {
                ExpectedVersion::Exact(round * 5 - 1)
            };
            store.append(&name, expected, events(5)).await.unwrap();
        }
    }
    let mut pages = Vec::new();
    let clean = agentledger_eventstore::verify_ledger(&store, |p, head| pages.push((p, head)))
        .await
        .unwrap();
    assert!(clean.ok, "{clean:?}");
    assert_eq!(clean.checked_events, 1_000);
    assert_eq!(
        pages.last().map(|(p, h)| p == h),
        Some(true),
        "progress reaches the head"
    );
    // A signed digest taken before any change.
    let keys = db.ledger_keys(&store);
    let digest = signing::sign_ledger(&store, &keys, None).await.unwrap();
    assert_eq!(digest.events, 1_000);
    let check = |digest: signing::SignedDigest| {
        let (store, keys) = (store.clone(), keys.clone());
        async move {
            signing::check_digest(&store, &keys, &digest, None, |_, _| {})
                .await
                .unwrap()
        }
    };
    assert_eq!(check(digest.clone()).await, Ok(()));
    // Every column of a stored event, each changed at another place
    // (the first event, the last, and positions a fixed seed picks), then
    // put back from the value read before.
    let positions: Vec<u64> = store
        .read_all(1, 1_000)
        .await
        .unwrap()
        .iter()
        .map(|e| e.global_position)
        .collect();
    let changes = [
        ("payload", r#"payload || '{"x": 1}'"#, "jsonb"),
        ("metadata", r#"metadata || '{"x": 1}'"#, "jsonb"),
        ("event_type", "event_type || 'x'", "text"),
        ("schema_version", "schema_version + 1", "integer"),
        (
            "recorded_at",
            "recorded_at + interval '1 microsecond'",
            "timestamptz",
        ),
        ("event_id", "gen_random_uuid()", "uuid"),
        ("stream_version", "stream_version + 100000", "bigint"),
        (
            "prev_hash",
            "set_byte(prev_hash, 0, get_byte(prev_hash, 0) # 1)",
            "bytea",
        ),
        (
            "hash",
            "set_byte(hash, 31, get_byte(hash, 31) # 1)",
            "bytea",
        ),
        ("hash_version", "hash_version + 1", "smallint"),
        ("stream_id", "stream_id || 'x'", "text"),
    ];
    let mut seed = 0x9e37_79b9_u64;
    let mut pick = || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        positions[(seed >> 33) as usize % positions.len()]
    };
    let admin = db.admin_client().await;
    for (i, (column, change, kind)) in changes.into_iter().enumerate() {
        let target = match i {
            0 => positions[0],
            1 => positions[999],
            _ => pick(),
        };
        let original: String = admin
            .query_one(
                &format!("SELECT {column}::text FROM events WHERE global_position = {target}"),
                &[],
            )
            .await
            .unwrap()
            .get(0);
        let stream_before = store.read_all(target, 1).await.unwrap().remove(0).stream_id;
        tamper(
            &db,
            &format!("UPDATE events SET {column} = {change} WHERE global_position = {target}"),
        )
        .await;
        let ledger = agentledger_eventstore::verify_ledger(&store, |_, _| {})
            .await
            .unwrap();
        assert_eq!(
            ledger.first_broken_position,
            Some(target),
            "{column}: {ledger:?}"
        );
        // The workflow's own check: a changed version or stream moves the
        // event within (or out of) its stream, so the break shows at it or
        // at the event that no longer links.
        let own = store.verify_stream(&stream_before).await.unwrap();
        assert!(!own.ok, "{column}: verifyWorkflow missed it");
        if !matches!(column, "stream_version" | "stream_id") {
            assert_eq!(own.first_broken_position, Some(target), "{column}: {own:?}");
        }
        assert!(
            matches!(check(digest.clone()).await, Err(signing::DigestError::Broken { position, .. }) if position == target),
            "{column}: the digest taken before notices it"
        );
        // Put it back: the ledger verifies again, and so does the digest.
        let undo = original.replace('\'', "''");
        tamper(
            &db,
            &format!(
                "UPDATE events SET {column} = '{undo}'::{kind} WHERE global_position = {target}"
            ),
        )
        .await;
        assert!(
            agentledger_eventstore::verify_ledger(&store, |_, _| {})
                .await
                .unwrap()
                .ok,
            "{column}: restored"
        );
        assert_eq!(check(digest.clone()).await, Ok(()));
    }
    // The position itself is not in the chains (it is taken at insert):
    // moving an event to another position is for the digest to see.
    let last = positions[999];
    tamper(
        &db,
        &format!(
            "UPDATE events SET global_position = {} WHERE global_position = {last}",
            last + 5_000
        ),
    )
    .await;
    assert!(matches!(
        check(digest.clone()).await,
        Err(signing::DigestError::Changed { events: 999, .. })
    ));
}

/// 20 streams of 50 events: 1,000 in all.
async fn seed_twenty_streams(store: &PostgresEventStore) {
    for s in 0..20 {
        store
            .append(
                &stream(&format!("workflow-{s}")),
                ExpectedVersion::NoStream,
                events(50),
            )
            .await
            .unwrap();
    }
}

/// A tree head taken before a change tells: a changed byte anywhere, and
/// the deleted last event of a stream, which the chains alone cannot see.
#[tokio::test]
async fn a_tree_head_taken_before_notices_a_change_and_a_deleted_last_event() {
    use agentledger_eventstore::digest::ledger_root;
    let db = TestDatabase::create().await;
    let store = db.store().await;
    seed_twenty_streams(&store).await;
    let head = store.head_position().await.unwrap();
    let (before, covered) = ledger_root(&store, head).await.unwrap();
    assert_eq!(covered, 1_000);
    assert_eq!(
        ledger_root(&store, head).await.unwrap().0,
        before,
        "deterministic"
    );

    tamper(&db, "UPDATE events SET payload = jsonb_set(payload, '{score}', '0.76') WHERE global_position = 321").await;
    // The chain hash of 321 no longer matches its content; the head itself
    // covers stored hashes, so the changed content shows in verification,
    // and a rewritten hash would show in the head.
    assert!(
        !agentledger_eventstore::verify_ledger(&store, |_, _| {})
            .await
            .unwrap()
            .ok
    );
    tamper(&db, "UPDATE events SET payload = jsonb_set(payload, '{score}', '0.75') WHERE global_position = 321").await;
    tamper(
        &db,
        "UPDATE events SET hash = sha256(hash) WHERE global_position = 321",
    )
    .await;
    assert_ne!(
        ledger_root(&store, head).await.unwrap().0,
        before,
        "a rewritten hash changes the head"
    );

    // Removing the last event of a stream: every chain still verifies...
    let db2 = TestDatabase::create().await;
    let store2 = db2.store().await;
    seed_twenty_streams(&store2).await;
    let head2 = store2.head_position().await.unwrap();
    let (taken, _) = ledger_root(&store2, head2).await.unwrap();
    let keys = db2.ledger_keys(&store2);
    let signed = signing::sign_ledger(&store2, &keys, None).await.unwrap();
    assert_eq!(signed.root, hex::encode(taken));
    let last_of_first = store2
        .read_stream(&stream("workflow-0"), 49, 1)
        .await
        .unwrap()[0]
        .global_position;
    tamper(
        &db2,
        &format!("DELETE FROM events WHERE global_position = {last_of_first}"),
    )
    .await;
    assert!(
        agentledger_eventstore::verify_ledger(&store2, |_, _| {})
            .await
            .unwrap()
            .ok,
        "chains cannot see it"
    );
    // ...but the head taken before does not match any more, and neither
    // does a signed digest taken before.
    let (now, covered) = ledger_root(&store2, head2).await.unwrap();
    assert_eq!(covered, 999);
    assert_ne!(now, taken);
    assert!(matches!(
        signing::check_digest(&store2, &keys, &signed, None, |_, _| {})
            .await
            .unwrap(),
        Err(signing::DigestError::Changed {
            signed_events: 1_000,
            events: 999,
            ..
        })
    ));
}

/// Nodes starting at once agree on one signing key; rotation keeps the old
/// public key and digests signed with it still verify.
#[tokio::test]
async fn one_signing_key_per_deployment_and_rotation_keeps_the_old_one() {
    let db = TestDatabase::create().await;
    let store = db.store().await;
    seed_twenty_streams(&store).await;
    let nodes: Vec<_> = (0..4)
        .map(|_| {
            // Signing with the owner role, as serve does: the service
            // role may not read the secret half.
            let owner = agentledger_eventstore::postgres::pool(db.admin_url(), 2).unwrap();
            signing::PostgresLedgerKeys::with_signer(store.pool().clone(), owner)
        })
        .collect();
    let ids = futures::future::join_all(
        nodes
            .iter()
            .map(|n| async move { signing::LedgerKeys::active(n).await.unwrap().0 }),
    )
    .await;
    assert!(ids.windows(2).all(|w| w[0] == w[1]), "{ids:?}");
    let keys = &nodes[0];
    let old = signing::sign_ledger(&store, keys, Some(500)).await.unwrap();
    let new_key = signing::LedgerKeys::rotate(keys).await.unwrap();
    let new = signing::sign_ledger(&store, &nodes[1], None).await.unwrap();
    assert_eq!(new.key_id, new_key.key_id);
    assert_ne!(old.key_id, new.key_id);
    let listed = signing::LedgerKeys::public_keys(keys).await.unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0].key_id, new.key_id);
    assert!(listed[1].retired_at.is_some());
    for digest in [&old, &new] {
        assert_eq!(
            signing::check_digest(&store, keys, digest, None, |_, _| {})
                .await
                .unwrap(),
            Ok(())
        );
    }
    let admin = db.admin_client().await;
    let secrets: i64 = admin
        .query_one(
            "SELECT count(*) FROM ledger_keys WHERE secret_key IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(secrets, 1, "the retired key's secret half is wiped");
}

/// Subject keys: one per subject even when first asked for at once, found
/// by id, gone after forgetting (the service role may vacuum its table).
#[tokio::test]
async fn a_subject_key_is_created_once_and_forgetting_destroys_it() {
    use agentledger_eventstore::subject_keys::{PostgresSubjectKeys, SubjectKeys};
    let db = TestDatabase::create().await;
    let store = db.store().await; // the service role
    let keys = PostgresSubjectKeys::new(store.pool().clone());
    let firsts = futures::future::join_all(
        (0..6).map(|_| async { keys.key_for("고객-4711").await.unwrap() }),
    )
    .await;
    assert!(firsts.windows(2).all(|w| w[0] == w[1]));
    let (id, key) = firsts[0];
    let (other, _) = keys.key_for("customer-2").await.unwrap();
    assert_ne!(id, other);
    let found = keys
        .secrets(&[id, other, uuid::Uuid::now_v7()])
        .await
        .unwrap();
    assert_eq!(found.len(), 2);
    assert_eq!(found[&id], key);

    let forgotten = keys.forget("고객-4711").await.unwrap();
    assert_eq!(forgotten.key_id, Some(id));
    assert!(forgotten.vacuumed, "the service role owns subject_keys");
    assert!(keys.secrets(&[id]).await.unwrap().is_empty());
    assert_eq!(keys.secrets(&[other]).await.unwrap().len(), 1);
    assert_eq!(keys.forget("고객-4711").await.unwrap().key_id, None);
    // A later submission for the same subject gets a new key.
    assert_ne!(keys.key_for("고객-4711").await.unwrap().0, id);
    assert!(matches!(
        keys.key_for(" ").await,
        Err(StoreError::BadInput(_))
    ));
    // One subject however its name was typed: decomposed Hangul, spaces.
    use unicode_normalization::UnicodeNormalization;
    let decomposed: String = "김민수".nfd().collect();
    assert_ne!(decomposed, "김민수");
    let (composed_key, _) = keys.key_for(" 김민수").await.unwrap();
    assert_eq!(keys.find(&decomposed).await.unwrap(), Some(composed_key));
    assert_eq!(
        keys.forget(&decomposed).await.unwrap().key_id,
        Some(composed_key)
    );
    assert_eq!(keys.find("김민수").await.unwrap(), None);
}

#[tokio::test]
async fn the_service_role_appends_only_through_the_store_and_reads_no_signing_secret() {
    let db = TestDatabase::create().await;
    let store = db.store().await;
    seed_twenty_streams(&store).await;
    let owner = agentledger_eventstore::postgres::pool(db.admin_url(), 1).unwrap();
    signing::LedgerKeys::active(&signing::PostgresLedgerKeys::new(owner))
        .await
        .unwrap();
    let service = connect(&db.service_url()).await;
    let head: i64 = service
        .query_one("SELECT events_head_position()", &[])
        .await
        .unwrap()
        .get(0);
    for (what, sql) in [
        ("insert a row", "INSERT INTO events SELECT * FROM events LIMIT 1"),
        ("move the position sequence", "SELECT setval('events_position_seq', 1)"),
        ("take positions", "SELECT events_reserve(1)"),
        ("read the signing secret", "SELECT secret_key FROM ledger_keys"),
        ("create a signing key", "INSERT INTO ledger_keys (key_id, algorithm, public_key, secret_key) VALUES ('k', 'ed25519', '\\x00', '\\x00')"),
        ("retire the signing key", "UPDATE ledger_keys SET retired_at = now(), secret_key = NULL"),
    ] {
        let refused = service.batch_execute(sql).await.unwrap_err();
        assert_eq!(
            refused.code(),
            Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
            "the service role could {what}: {refused}"
        );
    }
    // What it may do: read public keys, and append through the store.
    service
        .batch_execute("SELECT key_id, public_key FROM ledger_keys")
        .await
        .unwrap();
    let appended = store
        .append(
            &StreamId::new("after-the-checks").unwrap(),
            ExpectedVersion::NoStream,
            events(1),
        )
        .await
        .unwrap();
    assert!(appended.first_position > head as u64);
}

/// A statement that runs past the store's `statement_timeout` is cancelled
/// by PostgreSQL with a clear error, and appends and reads on the same
/// store go on while it runs: one heavy read cannot hold the service.
#[tokio::test]
async fn a_heavy_read_is_cut_off_by_the_statement_timeout_and_writes_go_on() {
    let db = TestDatabase::create().await;
    let store = db
        .store_with(PostgresOptions {
            statement_timeout: Some(Duration::from_millis(300)),
            ..Default::default()
        })
        .await;
    let pooled = store.pool().get().await.unwrap();
    let setting: String = pooled
        .query_one("SHOW statement_timeout", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(setting, "300ms", "every pooled connection carries it");

    let heavy = tokio::spawn(async move {
        let started = std::time::Instant::now();
        let result = pooled.query_one("SELECT pg_sleep(30)", &[]).await;
        (result.map(|_| ()), started.elapsed())
    });
    // Meanwhile the store appends and reads as usual.
    let written = store
        .append(
            &stream("beside-the-heavy-read"),
            ExpectedVersion::NoStream,
            events(3),
        )
        .await
        .unwrap();
    assert_eq!(written.last_position - written.first_position, 2);
    assert_eq!(store.read_all(1, 10).await.unwrap().len(), 3);

    let (result, took) = heavy.await.unwrap();
    let error = result.expect_err("cancelled by the timeout");
    assert_eq!(
        error.code(),
        Some(&tokio_postgres::error::SqlState::QUERY_CANCELED),
        "{error}"
    );
    assert!(
        took < Duration::from_secs(10),
        "cut off, not run out: {took:?}"
    );
}

/// An append that waits on a lock longer than `statement_timeout` is
/// cancelled: the caller gets the server's reason with its SQLSTATE,
/// nothing of the append is stored, and the next append goes on the chain
/// as if it had never been tried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_cut_off_by_the_statement_timeout_writes_nothing_and_the_next_one_goes_on() {
    let db = TestDatabase::create().await;
    let store = db
        .store_with(PostgresOptions {
            statement_timeout: Some(Duration::from_millis(300)),
            ..Default::default()
        })
        .await;
    let s = stream("workflow-timeout");
    store
        .append(&s, ExpectedVersion::NoStream, events(2))
        .await
        .unwrap();
    // Someone holds the table: the append's INSERT waits, and the timeout
    // cancels it mid-append.
    let mut blocker = db.admin_client().await;
    let lock = blocker.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let refused = store
        .append(&s, ExpectedVersion::Exact(1), events(3))
        .await
        .expect_err("cut off by the timeout");
    let took = started.elapsed();
    lock.rollback().await.unwrap();
    let said = refused.to_string();
    assert!(
        said.contains("statement timeout") && said.contains("57014"),
        "the caller is told why, with the SQLSTATE: {said}"
    );
    assert!(
        took < Duration::from_secs(10),
        "cut off, not run out: {took:?}"
    );
    let stored = store.read_stream(&s, 0, 10).await.unwrap();
    assert_eq!(stored.len(), 2, "nothing of the cancelled append is stored");
    let next = store
        .append(&s, ExpectedVersion::Exact(1), events(3))
        .await
        .unwrap();
    assert_eq!(next.stream_version, 4);
    let verification = store.verify_stream(&s).await.unwrap();
    assert!(verification.ok, "{verification:?}");
    assert_eq!(verification.checked_events, 5);
    println!("append cut off after {took:?}: {said}");
}

/// Polls `condition` (state with no event to await), for at most 10 s.
async fn eventually(what: &str, condition: impl Fn() -> bool) {
    for _ in 0..1_000 {
        if condition() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never: {what}");
}

/// A process alone on its database announces nothing (every listening
/// backend pays a transaction for each NOTIFY); a process that starts
/// listening says so at once, and the first announces its commits to it
/// again without waiting for its next look.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_alone_goes_quiet_and_one_that_joins_is_heard_at_once() {
    let db = TestDatabase::create().await;
    let a = db
        .store_with(PostgresOptions {
            presence_check: Duration::from_millis(20),
            ..Default::default()
        })
        .await;
    let peers = a.peers();
    eventually("a process alone goes quiet", || !peers.present()).await;

    // B would find nothing by polling for an hour: only A's NOTIFY wakes it.
    let b = db
        .store_with(PostgresOptions {
            safety_poll: Duration::from_secs(3_600),
            ..Default::default()
        })
        .await;
    let mut sub = b.subscribe_all(1);
    assert!(sub.next().now_or_never().is_none());
    eventually("A hears B join", || peers.present()).await;
    let written = a
        .append(&stream("after-join"), ExpectedVersion::Any, events(1))
        .await
        .unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .expect("B learns of A's commit from A's NOTIFY")
        .unwrap()
        .unwrap();
    assert_eq!(seen.global_position, written.first_position);
    // With B there, A stays announcing, look after look.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(peers.present(), "A went quiet with B listening");
}

/// The safety poll is the last resort when an announcement is late or
/// lost: it must fire even though the tailer wakes more often for other
/// reasons (here its looks for other processes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_safety_poll_finds_an_unannounced_commit_while_the_tailer_keeps_waking() {
    let db = TestDatabase::create().await;
    // A announces its first commit at once, the next only an hour later.
    let a = db
        .store_with(PostgresOptions {
            notify_interval: Duration::from_secs(3_600),
            ..Default::default()
        })
        .await;
    let b = db
        .store_with(PostgresOptions {
            safety_poll: Duration::from_millis(300),
            presence_check: Duration::from_millis(100),
            ..Default::default()
        })
        .await;
    let mut sub = b.subscribe_all(1);
    assert!(sub.next().now_or_never().is_none());
    eventually("A knows B listens", || a.peers().present()).await;
    for name in ["announced", "unannounced"] {
        let written = a
            .append(&stream(name), ExpectedVersion::Any, events(1))
            .await
            .unwrap();
        let seen = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .unwrap_or_else(|_| panic!("B never saw the {name} commit"))
            .unwrap()
            .unwrap();
        assert_eq!(seen.global_position, written.first_position);
    }
}
