//! Guarantees only the PostgreSQL store has to prove: tamper detection on
//! stored rows, immutability, the least-privileged role, and the scripted
//! interleaving behind the gap-safe global order.

use std::sync::Arc;
use std::time::Duration;

use agentledger_eventstore::postgres::APPEND_LOCK;
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
            let mut metadata = Metadata::new(Actor { kind: ActorKind::Agent, name: "lubit".into(), version: "1".into() });
            metadata.correlation_id = Some(uuid::Uuid::now_v7());
            NewEvent::new(format!("Step{i}"), json!({"i": i, "text": "검토 완료", "score": 0.75}), metadata)
        })
        .collect()
}

/// Seeds one stream of five events and returns the database and the positions.
async fn seeded() -> (TestDatabase, PostgresEventStore, StreamId, Vec<u64>) {
    let db = TestDatabase::create().await;
    let store = db.store().await;
    let s = stream("workflow-tamper");
    store.append(&stream("workflow-other"), ExpectedVersion::Any, events(2)).await.unwrap();
    store.append(&s, ExpectedVersion::NoStream, events(5)).await.unwrap();
    let positions = store.read_stream(&s, 0, 10).await.unwrap().iter().map(|e| e.global_position).collect();
    assert!(store.verify_stream(&s).await.unwrap().ok, "the untouched stream verifies after the jsonb round trip");
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
    assert_eq!(verification.first_broken_position, Some(position), "{verification:?}");
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
    tamper(&db, &format!("UPDATE events SET event_type = 'Step9' WHERE global_position = {}", positions[1])).await;
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
    tamper(&db, &format!("DELETE FROM events WHERE global_position = {}", positions[2])).await;
    // The next event now stands where version 2 was expected.
    assert_broken_at(&store, &s, positions[3]).await;
}

#[tokio::test]
async fn the_triggers_refuse_update_delete_and_truncate_even_for_the_owner() {
    let (db, store, s, positions) = seeded().await;
    let admin = db.admin_client().await;
    for sql in [
        format!("UPDATE events SET event_type = 'X' WHERE global_position = {}", positions[0]),
        format!("DELETE FROM events WHERE global_position = {}", positions[0]),
        "TRUNCATE events".to_string(),
    ] {
        let error = admin.batch_execute(&sql).await.expect_err(&sql);
        assert_eq!(error.code(), Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE), "{sql}: {error}");
    }
    assert_eq!(store.read_stream(&s, 0, 10).await.unwrap().len(), 5);
}

#[tokio::test]
async fn the_service_role_can_append_and_read_but_not_change_or_delete() {
    let db = TestDatabase::create().await;
    let store = db.store().await; // connected as the service role
    store.append(&stream("workflow-role"), ExpectedVersion::Any, events(1)).await.unwrap();
    let service = connect(&db.service_url()).await;
    let who: String = service.query_one("SELECT current_user::text", &[]).await.unwrap().get(0);
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
    assert!(a.unwrap().is_empty() && b.unwrap().is_empty(), "already applied");
}

/// The scripted interleaving behind the gap-safe order: process A holds an
/// uncommitted append (rows inserted, lock held); process B's later append
/// must wait and may not commit first; a reader sees neither until A commits,
/// then both, in position order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_append_cannot_overtake_an_uncommitted_one() {
    let db = TestDatabase::create().await;
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
    let a = db.store_with(PostgresOptions { before_commit: Some(hook), ..Default::default() }).await;
    let b = db.store().await;
    let reader = db.store().await;
    let mut sub = reader.subscribe_all(1);

    let a_append = tokio::spawn(async move { a.append(&stream("stream-a"), ExpectedVersion::Any, events(2)).await });
    inserted.notified().await; // A's rows are in, uncommitted, the lock held.

    let b_store = b.clone();
    let b_append = tokio::spawn(async move { b_store.append(&stream("stream-b"), ExpectedVersion::Any, events(1)).await });
    // Wait until B is observably blocked on the append lock.
    let admin = db.admin_client().await;
    let mut waited = Duration::ZERO;
    loop {
        let waiting: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted \
                 AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                 AND objid = ($1::bigint & x'ffffffff'::bigint)",
                &[&APPEND_LOCK],
            )
            .await
            .unwrap()
            .get(0);
        if waiting == 1 {
            break;
        }
        assert!(waited < Duration::from_secs(10), "B never queued behind A");
        tokio::time::sleep(Duration::from_millis(5)).await;
        waited += Duration::from_millis(5);
    }
    assert!(!b_append.is_finished(), "B committed while A held the lock");
    assert_eq!(reader.head_position().await.unwrap(), 0, "nothing is visible yet");
    assert!(reader.read_all(1, 10).await.unwrap().is_empty());
    assert!(sub.next().now_or_never().is_none(), "the subscriber saw an uncommitted or later event");

    release.notify_one();
    let a_result = a_append.await.unwrap().unwrap();
    let b_result = b_append.await.unwrap().unwrap();
    assert_eq!((a_result.first_position, a_result.last_position), (1, 2));
    assert_eq!(b_result.first_position, 3, "B's event comes after A's");
    let mut seen = Vec::new();
    for _ in 0..3 {
        let e = sub.next().await.unwrap().unwrap();
        seen.push((e.global_position, e.stream_id.to_string()));
    }
    assert_eq!(
        seen,
        vec![(1, "stream-a".to_string()), (2, "stream-a".to_string()), (3, "stream-b".to_string())]
    );
}
