//! The task queue contract, run against the in-memory and the PostgreSQL
//! queue: priority order, leases, expiry, renewal, and enqueues that arrive
//! while a claim is held.

use std::future::Future;
use std::time::Duration;

use agentledger_agents::queue::{InMemoryWorkQueue, PostgresWorkQueue, WorkQueue};
use agentledger_domain::workflow::Priority;
use agentledger_eventstore::testing::TestDatabase;
use chrono::{DateTime, Utc};
use uuid::Uuid;

const LEASE: Duration = Duration::from_secs(30);

fn at(seconds: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(1_800_000_000 + seconds, 0).unwrap()
}

async fn claims_follow_priority_then_availability(q: &dyn WorkQueue) {
    let (low, normal, critical, later) = (
        Uuid::now_v7(),
        Uuid::now_v7(),
        Uuid::now_v7(),
        Uuid::now_v7(),
    );
    q.enqueue(low, Priority::Low, at(0), at(0)).await.unwrap();
    q.enqueue(normal, Priority::Normal, at(1), at(1))
        .await
        .unwrap();
    q.enqueue(critical, Priority::Critical, at(2), at(2))
        .await
        .unwrap();
    q.enqueue(later, Priority::Critical, at(100), at(3))
        .await
        .unwrap();
    let claimed: Vec<Uuid> = q
        .claim("a", 10, at(5), LEASE)
        .await
        .unwrap()
        .iter()
        .map(|c| c.workflow)
        .collect();
    assert_eq!(
        claimed,
        [critical, normal, low],
        "not yet available rows wait"
    );
    assert!(
        q.claim("b", 10, at(6), LEASE).await.unwrap().is_empty(),
        "leased rows are not claimed again"
    );
    assert_eq!(q.waiting().await.unwrap(), 4);
}

async fn an_expired_lease_is_claimed_by_another_owner(q: &dyn WorkQueue) {
    let id = Uuid::now_v7();
    q.enqueue(id, Priority::Normal, at(0), at(0)).await.unwrap();
    let first = q.claim("a", 1, at(0), LEASE).await.unwrap();
    assert_eq!(first[0].claims, 1);
    assert!(q.claim("b", 1, at(29), LEASE).await.unwrap().is_empty());
    let second = q.claim("b", 1, at(31), LEASE).await.unwrap();
    assert_eq!((second[0].workflow, second[0].claims), (id, 2));
    // The old owner can neither renew, release nor complete it any more.
    assert!(q.renew("a", &[id], at(100)).await.unwrap().is_empty());
    q.release("a", id, None, at(31)).await.unwrap();
    assert!(!q.complete("a", id, second[0].seq, at(31)).await.unwrap());
    assert!(
        q.claim("c", 1, at(40), LEASE).await.unwrap().is_empty(),
        "b still holds it"
    );
    assert_eq!(q.renew("b", &[id], at(100)).await.unwrap(), [id]);
    assert!(
        q.claim("c", 1, at(70), LEASE).await.unwrap().is_empty(),
        "renewed to 100"
    );
}

async fn release_requeues_with_a_new_priority(q: &dyn WorkQueue) {
    let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
    q.enqueue(a, Priority::Low, at(0), at(0)).await.unwrap();
    q.enqueue(b, Priority::Normal, at(0), at(0)).await.unwrap();
    let claims = q.claim("w", 2, at(1), LEASE).await.unwrap();
    assert_eq!(claims.len(), 2);
    q.release("w", a, Some(Priority::Critical), at(1))
        .await
        .unwrap();
    q.release("w", b, None, at(1)).await.unwrap();
    let next: Vec<_> = q
        .claim("w", 2, at(2), LEASE)
        .await
        .unwrap()
        .into_iter()
        .map(|c| (c.workflow, c.priority))
        .collect();
    assert_eq!(next, [(a, Priority::Critical), (b, Priority::Normal)]);
}

async fn complete_keeps_work_enqueued_during_the_claim(q: &dyn WorkQueue) {
    let (kept, done) = (Uuid::now_v7(), Uuid::now_v7());
    for id in [kept, done] {
        q.enqueue(id, Priority::Normal, at(0), at(0)).await.unwrap();
    }
    let claims = q.claim("w", 2, at(1), LEASE).await.unwrap();
    // A person decides on `kept` while the worker still holds it.
    q.enqueue(kept, Priority::High, at(2), at(2)).await.unwrap();
    for claim in &claims {
        let released = q
            .complete("w", claim.workflow, claim.seq, at(3))
            .await
            .unwrap();
        // Kept for the newer work (a claimer must be woken), or gone.
        assert_eq!(released, claim.workflow == kept, "{}", claim.workflow);
    }
    let again = q.claim("v", 5, at(3), LEASE).await.unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(
        (again[0].workflow, again[0].priority),
        (kept, Priority::High)
    );
    assert!(!q.complete("v", kept, again[0].seq, at(4)).await.unwrap());
    assert_eq!(q.waiting().await.unwrap(), 0);
}

async fn remove_deletes_whoever_holds_it(q: &dyn WorkQueue) {
    let id = Uuid::now_v7();
    q.enqueue(id, Priority::Normal, at(0), at(0)).await.unwrap();
    q.claim("w", 1, at(0), LEASE).await.unwrap();
    q.remove(id).await.unwrap();
    assert_eq!(q.waiting().await.unwrap(), 0);
}

async fn contract<Q: WorkQueue, F: Future<Output = Q>>(make: impl Fn() -> F) {
    claims_follow_priority_then_availability(&make().await).await;
    an_expired_lease_is_claimed_by_another_owner(&make().await).await;
    release_requeues_with_a_new_priority(&make().await).await;
    complete_keeps_work_enqueued_during_the_claim(&make().await).await;
    remove_deletes_whoever_holds_it(&make().await).await;
}

#[tokio::test]
async fn the_in_memory_queue_keeps_the_contract() {
    contract(|| async { InMemoryWorkQueue::default() }).await;
}

#[tokio::test]
async fn the_postgres_queue_keeps_the_contract() {
    let db = TestDatabase::create().await;
    let store = db.store().await;
    let admin = db.admin_client().await;
    contract(|| async {
        admin
            .batch_execute("DELETE FROM agent_tasks")
            .await
            .unwrap();
        PostgresWorkQueue::new(store.pool().clone())
    })
    .await;
}

/// Concurrent claimers on one database never get the same row.
#[tokio::test]
async fn concurrent_postgres_claimers_share_rows_without_overlap() {
    let db = TestDatabase::create().await;
    let store = db.store().await;
    let queue = PostgresWorkQueue::new(store.pool().clone());
    let ids: Vec<Uuid> = (0..200).map(|_| Uuid::now_v7()).collect();
    for id in &ids {
        queue
            .enqueue(*id, Priority::Normal, at(0), at(0))
            .await
            .unwrap();
    }
    let mut claimers = tokio::task::JoinSet::new();
    for n in 0..8 {
        let queue = queue.clone();
        claimers.spawn(async move {
            let mut mine = Vec::new();
            loop {
                let claims = queue
                    .claim(&format!("w{n}"), 7, at(1), LEASE)
                    .await
                    .unwrap();
                if claims.is_empty() {
                    return mine;
                }
                mine.extend(claims.into_iter().map(|c| c.workflow));
            }
        });
    }
    let mut all: Vec<Uuid> = claimers.join_all().await.into_iter().flatten().collect();
    assert_eq!(all.len(), ids.len(), "each row claimed exactly once");
    all.sort();
    all.dedup();
    assert_eq!(all.len(), ids.len());
}

/// A person's enqueue that commits while `complete` waits on the row (the
/// drive letting go at the same instant): the row must come out released,
/// not left leased to the finished drive until its lease runs out.
#[tokio::test]
async fn complete_racing_an_enqueue_on_postgres_releases_the_row() {
    let db = TestDatabase::create().await;
    let store = db.store().await;
    let queue = PostgresWorkQueue::new(store.pool().clone());
    let id = Uuid::now_v7();
    queue
        .enqueue(id, Priority::Normal, at(0), at(0))
        .await
        .unwrap();
    let claim = queue.claim("w", 1, at(1), LEASE).await.unwrap().remove(0);

    // The enqueue holds the row, uncommitted, while `complete` starts.
    let mut person = db.admin_client().await;
    let enqueue = person.transaction().await.unwrap();
    enqueue
        .execute(
            "UPDATE agent_tasks SET seq = seq + 1, available_at = $2 WHERE workflow_id = $1",
            &[&id, &at(2)],
        )
        .await
        .unwrap();
    let completing = {
        let queue = queue.clone();
        tokio::spawn(async move { queue.complete("w", id, claim.seq, at(3)).await })
    };
    // Until `complete` waits for that row lock.
    let watcher = db.admin_client().await;
    loop {
        let waiting: i64 = watcher
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                  WHERE wait_event_type = 'Lock' AND query LIKE '%agent_tasks%'
                    AND datname = current_database()",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if waiting > 0 {
            break;
        }
        tokio::task::yield_now().await;
    }
    enqueue.commit().await.unwrap();

    let released = completing.await.unwrap().unwrap();
    assert!(released, "newer work was enqueued: a claimer must be woken");
    let again = queue.claim("v", 1, at(3), LEASE).await.unwrap();
    assert_eq!(
        again.iter().map(|c| c.workflow).collect::<Vec<_>>(),
        [id],
        "the person's work is claimable at once"
    );
}
