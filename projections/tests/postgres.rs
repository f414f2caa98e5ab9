//! The PostgreSQL read models under crashes, rebuilds and failover: they
//! always end equal, row for row, to a fresh rebuild from the events.

mod common;

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use agentledger_eventstore::testing::TestDatabase;
use agentledger_eventstore::{EventStore, PostgresEventStore};
use agentledger_projections::postgres::audit_query;
use agentledger_projections::postgres::rebuild::{differences, rebuild};
use agentledger_projections::postgres::runner::{
    Checkpoints, ProjectionRunner, RunnerConfig, RunnerFaultPlan,
};
use agentledger_projections::{AuditFilter, PostgresReadModels, ReadModels, PROJECTIONS};
use common::Agents;
use tokio_postgres::types::ToSql;

fn runner(
    db: &TestDatabase,
    store: &PostgresEventStore,
    name: &str,
    checkpoints: &Checkpoints,
    fault: Option<RunnerFaultPlan>,
) -> ProjectionRunner {
    ProjectionRunner::spawn(
        &[name],
        db.service_url(),
        Arc::new(store.clone()),
        checkpoints.clone(),
        RunnerConfig {
            batch_size: 50,
            retry: Duration::from_millis(100),
            ..RunnerConfig::default()
        },
        fault,
    )
    .unwrap()
}

/// Rebuilds every projection into `_rebuild` tables and asserts they equal
/// the live ones.
async fn assert_live_equals_rebuild(db: &TestDatabase, store: &PostgresEventStore) {
    let mut admin = db.admin_client().await;
    for name in PROJECTIONS {
        rebuild(&mut admin, Arc::new(store.clone()), name, false, |_, _| {})
            .await
            .unwrap();
        assert_eq!(
            differences(&admin, name).await.unwrap(),
            0,
            "{name}: live differs from a rebuild"
        );
    }
}

async fn wait_caught_up(store: &PostgresEventStore, checkpoints: &Checkpoints) {
    let models = PostgresReadModels::new(store.pool().clone(), checkpoints);
    let head = store.head_position().await.unwrap();
    models
        .wait_for(head, Duration::from_secs(60))
        .await
        .expect("projections catch up");
}

#[tokio::test]
async fn runners_killed_at_seeded_points_still_apply_every_event_once() {
    let db = TestDatabase::create().await;
    let store = db.store().await;
    let checkpoints = Checkpoints::default();
    // Each projection's runner dies three times at seed-chosen points (a
    // failing seed replays the same crashes), then runs without faults.
    let mut supervisors = tokio::task::JoinSet::new();
    let crashes = Arc::new(AtomicI64::new(0));
    for (p, name) in PROJECTIONS.iter().enumerate() {
        let (db_url, store, checkpoints, crashes) = (
            db.service_url(),
            store.clone(),
            checkpoints.clone(),
            crashes.clone(),
        );
        supervisors.spawn(async move {
            for round in 0..3u64 {
                let plan = RunnerFaultPlan::from_seed(1_000 * p as u64 + round, 8);
                let doomed = ProjectionRunner::spawn(
                    &[name],
                    db_url.clone(),
                    Arc::new(store.clone()),
                    checkpoints.clone(),
                    RunnerConfig {
                        batch_size: 50,
                        retry: Duration::from_millis(100),
                        ..RunnerConfig::default()
                    },
                    Some(plan),
                )
                .unwrap();
                doomed.ended().await;
                crashes.fetch_add(1, Ordering::SeqCst);
            }
            ProjectionRunner::spawn(
                &[name],
                db_url,
                Arc::new(store.clone()),
                checkpoints,
                RunnerConfig {
                    batch_size: 50,
                    retry: Duration::from_millis(100),
                    ..RunnerConfig::default()
                },
                None,
            )
            .unwrap()
        });
    }
    let agents = Agents::postgres(&store);
    agents.run_workflows(500).await;
    agents.stop().await;
    let survivors = supervisors.join_all().await;
    assert_eq!(
        crashes.load(Ordering::SeqCst),
        9,
        "every doomed runner died at its fault point"
    );
    wait_caught_up(&store, &checkpoints).await;
    assert_live_equals_rebuild(&db, &store).await;
    for runner in survivors {
        runner.stop().await;
    }
}

#[tokio::test]
async fn a_rebuild_swaps_in_while_queries_are_served_and_the_live_runner_goes_on() {
    let db = TestDatabase::create().await;
    let store = db.store().await;
    let checkpoints = Checkpoints::default();
    let runners: Vec<_> = PROJECTIONS
        .iter()
        .map(|name| runner(&db, &store, name, &checkpoints, None))
        .collect();
    let agents = Agents::postgres(&store);
    agents.run_workflows(60).await;
    wait_caught_up(&store, &checkpoints).await;

    // A reader keeps counting rows through the service pool.
    let stop = Arc::new(AtomicBool::new(false));
    let least = Arc::new(AtomicI64::new(i64::MAX));
    let reader = {
        let (pool, stop, least) = (store.pool().clone(), stop.clone(), least.clone());
        tokio::spawn(async move {
            let mut reads = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let client = pool.get().await.unwrap();
                for table in [
                    "workflow_status",
                    "workflow_subtasks",
                    "audit_trail",
                    "agent_metrics",
                ] {
                    let n: i64 = client
                        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
                        .await
                        .unwrap_or_else(|e| panic!("{table} unreadable during a rebuild: {e:?}"))
                        .get(0);
                    least.fetch_min(n, Ordering::SeqCst);
                }
                reads += 1;
                tokio::task::yield_now().await;
            }
            reads
        })
    };
    // More work arrives while the rebuild runs.
    let more = {
        let runtime = agents.runtime.clone();
        tokio::spawn(async move {
            for i in 0..40 {
                runtime
                    .submit(agentledger_agents::Submission {
                        request: common::REQUESTS[i % common::REQUESTS.len()].into(),
                        ..Default::default()
                    })
                    .await
                    .unwrap();
            }
        })
    };
    let mut admin = db.admin_client().await;
    for name in PROJECTIONS {
        let mut calls = 0;
        let report = rebuild(&mut admin, Arc::new(store.clone()), name, true, |_, _| {
            calls += 1
        })
        .await
        .unwrap();
        assert!(report.events > 0 && calls > 0, "{name}: progress reported");
    }
    more.await.unwrap();
    // The swapped tables carry the migration's keys and indexes, by name.
    let names: Vec<String> = admin
        .query(
            "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema()
              AND tablename IN ('workflow_status', 'workflow_subtasks', 'audit_trail', 'agent_metrics')
              ORDER BY indexname",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        names,
        [
            "agent_metrics_bucket",
            "agent_metrics_pkey",
            "audit_trail_actor_time",
            "audit_trail_kind_time",
            "audit_trail_pkey",
            "audit_trail_role_time",
            "audit_trail_tenant",
            "audit_trail_time",
            "audit_trail_workflow",
            "workflow_status_completed",
            "workflow_status_newest",
            "workflow_status_pkey",
            "workflow_status_state_newest",
            "workflow_status_tenant_newest",
            "workflow_status_tenant_state_newest",
            "workflow_subtasks_pkey",
        ]
    );
    stop.store(true, Ordering::SeqCst);
    let reads = reader.await.unwrap();
    assert!(reads > 0);
    assert!(least.load(Ordering::SeqCst) > 0, "a table was seen empty");

    // The live runners carry on from the swapped tables.
    agents.run_workflows(20).await;
    agents.stop().await;
    wait_caught_up(&store, &checkpoints).await;
    assert_live_equals_rebuild(&db, &store).await;
    for runner in runners {
        runner.stop().await;
    }
}

#[tokio::test]
async fn when_the_lease_holder_stops_another_runner_takes_over() {
    let db = TestDatabase::create().await;
    let store = db.store().await;
    // Two "processes": separate runners and checkpoint views.
    let (first_view, second_view) = (Checkpoints::default(), Checkpoints::default());
    let first = runner(&db, &store, "audit_trail", &first_view, None);
    let agents = Agents::postgres(&store);
    agents.run_workflows(30).await;
    let head = store.head_position().await.unwrap();
    let mut watch = first_view.receivers()["audit_trail"].clone();
    tokio::time::timeout(Duration::from_secs(30), watch.wait_for(|p| *p >= head))
        .await
        .expect("the first runner leads")
        .unwrap();
    let second = runner(&db, &store, "audit_trail", &second_view, None);
    first.stop().await;
    agents.run_workflows(30).await;
    agents.stop().await;
    let head = store.head_position().await.unwrap();
    let mut watch = second_view.receivers()["audit_trail"].clone();
    tokio::time::timeout(Duration::from_secs(30), watch.wait_for(|p| *p >= head))
        .await
        .expect("the second runner took over")
        .unwrap();
    assert!(
        first_view.get("audit_trail") < head,
        "the stopped runner applied nothing after it stopped"
    );
    let mut admin = db.admin_client().await;
    rebuild(
        &mut admin,
        Arc::new(store.clone()),
        "audit_trail",
        false,
        |_, _| {},
    )
    .await
    .unwrap();
    assert_eq!(differences(&admin, "audit_trail").await.unwrap(), 0);
    second.stop().await;
}

#[tokio::test]
async fn audit_questions_are_answered_from_indexes() {
    let db = TestDatabase::create().await;
    let store = db.store().await;
    let checkpoints = Checkpoints::default();
    let runners: Vec<_> = PROJECTIONS
        .iter()
        .map(|name| runner(&db, &store, name, &checkpoints, None))
        .collect();
    let agents = Agents::postgres(&store);
    let ids = agents.run_workflows(200).await;
    agents.stop().await;
    wait_caught_up(&store, &checkpoints).await;
    let admin = db.admin_client().await;
    admin
        .batch_execute("ANALYZE; SET enable_seqscan = off;")
        .await
        .unwrap();
    let now = chrono::Utc::now();
    let questions = [
        (
            "everything about workflow X in order",
            AuditFilter {
                workflow: Some(ids[7]),
                ..Default::default()
            },
            "audit_trail_workflow",
        ),
        (
            "all decisions by Lubit between T1 and T2",
            AuditFilter {
                actor: Some("lubit".into()),
                from: Some(now - chrono::Duration::hours(1)),
                to: Some(now),
                ..Default::default()
            },
            "audit_trail",
        ),
        (
            "every escalation in a time range",
            AuditFilter {
                kind: Some("gate.escalate".into()),
                from: Some(now - chrono::Duration::hours(1)),
                ..Default::default()
            },
            "audit_trail",
        ),
    ];
    for (question, filter, index) in questions {
        let (sql, params) = audit_query(&filter, 100);
        let params: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p.as_ref() as _).collect();
        let plan: Vec<String> = admin
            .query(&format!("EXPLAIN {sql}"), &params)
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        let plan = plan.join("\n");
        assert!(plan.contains("Index"), "{question}:\n{plan}");
        assert!(plan.contains(index), "{question}:\n{plan}");
        assert!(!plan.contains("Seq Scan"), "{question}:\n{plan}");
    }
    for runner in runners {
        runner.stop().await;
    }
}

#[tokio::test]
async fn a_process_not_running_a_projection_waits_for_it_through_announcements() {
    let db = TestDatabase::create().await;
    let store = db.store().await;
    let (running_view, other_view) = (Checkpoints::default(), Checkpoints::default());
    let stop = tokio_util::sync::CancellationToken::new();
    let listener = tokio::spawn(other_view.clone().follow(db.service_url(), stop.clone()));
    let runners: Vec<_> = PROJECTIONS
        .iter()
        .map(|name| runner(&db, &store, name, &running_view, None))
        .collect();
    let agents = Agents::postgres(&store);
    agents.run_workflows(20).await;
    agents.stop().await;
    let head = store.head_position().await.unwrap();
    // The other process learns each checkpoint from NOTIFY, not by polling.
    let models = PostgresReadModels::new(store.pool().clone(), &other_view);
    models
        .wait_for(head, Duration::from_secs(30))
        .await
        .expect("announced");
    for name in PROJECTIONS {
        assert!(other_view.get(name) >= head, "{name}");
    }
    stop.cancel();
    listener.await.unwrap();
    for runner in runners {
        runner.stop().await;
    }
}

/// `serve` runs the three projections in one runner. Their checkpoints can
/// differ (one was run alone, or rebuilt): each must then take only the
/// events past its own, and all must end equal to a rebuild.
#[tokio::test]
async fn one_runner_for_all_three_starts_each_from_its_own_checkpoint() {
    let db = TestDatabase::create().await;
    let store = db.store().await;
    let checkpoints = Checkpoints::default();
    let agents = Agents::postgres(&store);
    let spawn_all = || {
        ProjectionRunner::spawn(
            &PROJECTIONS,
            db.service_url(),
            Arc::new(store.clone()),
            checkpoints.clone(),
            RunnerConfig::default(),
            None,
        )
        .unwrap()
    };
    let all = spawn_all();
    agents.run_workflows(10).await;
    wait_caught_up(&store, &checkpoints).await;
    all.stop().await;

    // The audit trail alone moves on.
    let audit = runner(&db, &store, "audit_trail", &checkpoints, None);
    agents.run_workflows(10).await;
    let head = store.head_position().await.unwrap();
    let mut watch = checkpoints.receivers()["audit_trail"].clone();
    tokio::time::timeout(Duration::from_secs(30), watch.wait_for(|p| *p >= head))
        .await
        .expect("the audit trail catches up")
        .unwrap();
    audit.stop().await;
    assert!(checkpoints.get("workflow_status") < head);

    let all = spawn_all();
    agents.run_workflows(5).await;
    agents.stop().await;
    wait_caught_up(&store, &checkpoints).await;
    all.stop().await;
    assert_live_equals_rebuild(&db, &store).await;
}

/// A process follows the checkpoints on the listener its store already
/// keeps (one LISTEN connection per process, not two), and after that
/// connection is cut it listens again and reads what it missed.
#[tokio::test]
async fn checkpoints_followed_on_the_stores_listener_survive_a_cut_connection() {
    let db = TestDatabase::create().await;
    let store = db.store().await;
    let other = db.store().await;
    let (running_view, other_view) = (Checkpoints::default(), Checkpoints::default());
    let stop = tokio_util::sync::CancellationToken::new();
    let follower = tokio::spawn(other_view.clone().follow_store(other.clone(), stop.clone()));
    let all = ProjectionRunner::spawn(
        &PROJECTIONS,
        db.service_url(),
        Arc::new(store.clone()),
        running_view.clone(),
        RunnerConfig::default(),
        None,
    )
    .unwrap();
    let agents = Agents::postgres(&store);
    let models = PostgresReadModels::new(other.pool().clone(), &other_view);
    let admin = db.admin_client().await;
    let listening = || async {
        admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                  WHERE datname = current_database() AND query LIKE 'LISTEN%'",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    for round in 0..2 {
        agents.run_workflows(10).await;
        let head = store.head_position().await.unwrap();
        models
            .wait_for(head, Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| panic!("round {round}: not announced: {e}"));
        // Two processes, one listening connection each.
        assert_eq!(listening().await, 2, "round {round}");
        if round == 0 {
            admin
                .execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                      WHERE datname = current_database() AND query LIKE 'LISTEN%'",
                    &[],
                )
                .await
                .unwrap();
        }
    }
    agents.stop().await;
    stop.cancel();
    follower.await.unwrap();
    all.stop().await;
}
