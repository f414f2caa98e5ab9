//! One contract for the read models, run against memory and PostgreSQL: the
//! same workflows give the same answers.

mod common;

use std::sync::Arc;
use std::time::Duration;

use agentledger_domain::workflow::{Workflow, WorkflowEvent, WorkflowState};
use agentledger_eventstore::testing::TestDatabase;
use agentledger_eventstore::{EventStore, InMemoryEventStore, StreamId};
use agentledger_projections::model::status::WorkflowStatus;
use agentledger_projections::postgres::runner::{Checkpoints, ProjectionRunner, RunnerConfig};
use agentledger_projections::{
    AgentRole, AuditFilter, InMemoryReadModels, PostgresReadModels, ReadModels, WorkflowCursor,
    PROJECTIONS,
};
use common::Agents;
use uuid::Uuid;

const WORKFLOWS: usize = 21;

/// The checks, given read models that have applied every event of `store`.
async fn contract(models: &dyn ReadModels, store: &dyn EventStore, ids: &[Uuid]) {
    let head = store.head_position().await.unwrap();
    models
        .wait_for(head, Duration::from_secs(30))
        .await
        .expect("caught up");
    for (name, position) in models.checkpoints().await.unwrap() {
        assert!(PROJECTIONS.contains(&name.as_str()));
        assert_eq!(position, head, "{name}");
    }
    let lags = agentledger_projections::lag(models, store).await.unwrap();
    assert_eq!(lags.len(), PROJECTIONS.len());
    assert!(lags.iter().all(|(_, lag)| *lag == 0), "{lags:?}");

    // Every workflow's row matches the fold of its stream.
    let mut total_events = 0;
    for id in ids {
        let stream = StreamId::new(format!("workflow-{id}")).unwrap();
        let recorded = store.read_stream(&stream, 0, 1_000).await.unwrap();
        total_events += recorded.len();
        let events: Vec<WorkflowEvent> = recorded
            .iter()
            .map(|e| WorkflowEvent::decode(&e.event_type, e.schema_version, &e.payload).unwrap())
            .collect();
        let folded = Workflow::from_events(&events);
        let status = models
            .workflow(*id)
            .await
            .unwrap()
            .expect("a row per workflow");
        assert_eq!(status.state, folded.state, "{id}");
        assert_eq!(&*status.request, folded.request.as_str());
        assert_eq!(status.version, recorded.len() as u64 - 1);
        assert_eq!(
            status.last_position,
            recorded.last().unwrap().global_position
        );
        assert_eq!(status.created_at, recorded[0].recorded_at);
        assert_eq!(status.updated_at, recorded.last().unwrap().recorded_at);
        assert_eq!(status.completed_at.is_some(), folded.state.is_final());
        assert_eq!(status.subtasks.len(), folded.subtasks.len());
        assert_eq!(
            (
                status.progress_done as usize,
                status.progress_total as usize
            ),
            folded.progress()
        );
        for (row, sub) in status.subtasks.iter().zip(&folded.subtasks) {
            assert_eq!(row.state, sub.state);
            assert_eq!(
                Some(row.id.as_str()),
                sub.plan.as_ref().map(|p| p.id.as_str())
            );
        }
        if folded.state == WorkflowState::Completed {
            assert!(status.ethics.as_ref().is_some_and(|e| e.passed));
            assert!(status
                .subtasks
                .iter()
                .all(|s| s.started_at.is_some() && s.finished_at.is_some()));
        }
        // "Everything about workflow X, in order."
        let trail = models
            .audit_trail(
                &AuditFilter {
                    workflow: Some(*id),
                    ..Default::default()
                },
                1_000,
            )
            .await
            .unwrap();
        let positions: Vec<u64> = trail.iter().map(|e| e.position).collect();
        let expected: Vec<u64> = recorded.iter().map(|e| e.global_position).collect();
        assert_eq!(positions, expected);
        assert_eq!(trail[0].kind, "submitted");
        assert_eq!(trail[0].hash, hex::encode(recorded[0].hash));
    }

    // Pages of workflows, newest first, no item lost or repeated.
    let mut seen: Vec<WorkflowStatus> = Vec::new();
    let mut after = None;
    loop {
        let page = models.workflows(None, None, after, 4).await.unwrap();
        if page.is_empty() {
            break;
        }
        after = page.last().map(|s| WorkflowCursor {
            created_at: s.created_at,
            id: s.id,
        });
        seen.extend(page);
    }
    assert_eq!(seen.len(), ids.len());
    assert!(seen
        .windows(2)
        .all(|w| (w[0].created_at, w[0].id) > (w[1].created_at, w[1].id)));
    let rejected = models
        .workflows(None, Some(WorkflowState::Rejected), None, 100)
        .await
        .unwrap();
    assert_eq!(
        rejected.len(),
        seen.iter()
            .filter(|s| s.state == WorkflowState::Rejected)
            .count()
    );
    assert!(!rejected.is_empty());

    // "All decisions by Lubit between T1 and T2."
    let all = models
        .audit_trail(&AuditFilter::default(), 100_000)
        .await
        .unwrap();
    assert_eq!(all.len(), total_events);
    let (t1, t2) = (
        all[all.len() / 4].recorded_at,
        all[3 * all.len() / 4].recorded_at,
    );
    let lubit = models
        .audit_trail(
            &AuditFilter {
                actor: Some("lubit".into()),
                from: Some(t1),
                to: Some(t2),
                ..Default::default()
            },
            100_000,
        )
        .await
        .unwrap();
    let expected: Vec<u64> = all
        .iter()
        .filter(|e| e.actor == "lubit" && e.recorded_at >= t1 && e.recorded_at < t2)
        .map(|e| e.position)
        .collect();
    assert_eq!(
        lubit.iter().map(|e| e.position).collect::<Vec<_>>(),
        expected
    );
    assert!(!expected.is_empty());
    let gatekeeper = models
        .audit_trail(
            &AuditFilter {
                role: Some(AgentRole::Gatekeeper),
                kind: Some("gate.reject".into()),
                ..Default::default()
            },
            1_000,
        )
        .await
        .unwrap();
    assert_eq!(
        gatekeeper.len(),
        all.iter().filter(|e| e.kind == "gate.reject").count()
    );
    assert!(gatekeeper
        .iter()
        .all(|e| e.actor == "lubit" && e.policy_fingerprint.is_some()));
    // The cursor continues after a position.
    let page2 = models
        .audit_trail(
            &AuditFilter {
                after: Some(all[9].position),
                ..Default::default()
            },
            5,
        )
        .await
        .unwrap();
    assert_eq!(
        page2.iter().map(|e| e.position).collect::<Vec<_>>(),
        all[10..15].iter().map(|e| e.position).collect::<Vec<_>>()
    );

    // Agent metrics add up to what the trail shows.
    let metrics = models.agent_metrics(None, None, None).await.unwrap();
    let sum = |agent: &str,
               f: fn(&agentledger_projections::model::metrics::AgentMetrics) -> i64| {
        metrics
            .iter()
            .filter(|m| m.agent == agent)
            .map(f)
            .sum::<i64>()
    };
    let count = |kind: &str| all.iter().filter(|e| e.kind == kind).count() as i64;
    assert_eq!(sum("sena", |m| m.decisions), count("analysis"));
    assert_eq!(sum("lubit", |m| m.approvals), count("gate.approve"));
    assert_eq!(sum("lubit", |m| m.rejections), count("gate.reject"));
    assert_eq!(sum("lubit", |m| m.revisions), count("gate.revise"));
    assert_eq!(sum("rune", |m| m.flagged), count("ethics.flagged"));
    assert_eq!(
        sum("rune", |m| m.ethics_count),
        count("ethics.passed") + count("ethics.flagged")
    );
    assert_eq!(
        sum("lubit", |m| m.latency_count),
        sum("lubit", |m| m.decisions)
    );
    // GitCode's run of a chain of built-in tools is one append: its first
    // decision is timed from the approval, so every execution is timed.
    assert!(count("execution.finished") > 0);
    assert!(sum("gitcode", |m| m.latency_count) >= count("execution.finished"));
    assert!(sum("gitcode", |m| m.latency_count) <= sum("gitcode", |m| m.decisions));
    let lubit_rows: Vec<_> = metrics.iter().filter(|m| m.agent == "lubit").collect();
    assert!(lubit_rows.iter().all(|m| m.latency_p95_ms().is_some()));
    assert!(models
        .agent_metrics(
            None,
            Some(chrono::Utc::now() + chrono::Duration::hours(1)),
            None
        )
        .await
        .unwrap()
        .is_empty());

    assert!(models.workflow(Uuid::now_v7()).await.unwrap().is_none());
    let counts = models.count_by_state(None).await.unwrap();
    assert_eq!(
        counts.iter().map(|(_, n)| *n).sum::<u64>(),
        ids.len() as u64
    );
    // By tenant: the workflows' own counts them all, another none.
    let tenant = models.workflow(ids[0]).await.unwrap().unwrap().tenant;
    let mut of_tenant = models.count_by_state(Some(&tenant)).await.unwrap();
    let mut all = counts.clone();
    of_tenant.sort_by_key(|(s, _)| format!("{s:?}"));
    all.sort_by_key(|(s, _)| format!("{s:?}"));
    assert_eq!(of_tenant, all);
    assert!(models
        .count_by_state(Some("no-such-tenant"))
        .await
        .unwrap()
        .is_empty());
    let rejected_count = counts
        .iter()
        .find(|(s, _)| *s == WorkflowState::Rejected)
        .map(|(_, n)| *n);
    assert_eq!(rejected_count, Some(rejected.len() as u64));
}

#[tokio::test]
async fn the_in_memory_read_models_keep_the_contract() {
    let store: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::default());
    let models = InMemoryReadModels::start(store.clone());
    let agents = Agents::in_memory(store.clone());
    let ids = agents.run_workflows(WORKFLOWS).await;
    agents.stop().await;
    contract(&models, &*store, &ids).await;
}

#[tokio::test]
async fn the_postgres_read_models_keep_the_contract() {
    let db = TestDatabase::create().await;
    let store = db.store().await;
    let checkpoints = Checkpoints::default();
    let runners: Vec<ProjectionRunner> = PROJECTIONS
        .iter()
        .map(|name| {
            ProjectionRunner::spawn(
                &[name],
                db.service_url(),
                Arc::new(store.clone()),
                checkpoints.clone(),
                RunnerConfig::default(),
                None,
            )
            .unwrap()
        })
        .collect();
    let agents = Agents::postgres(&store);
    let ids = agents.run_workflows(WORKFLOWS).await;
    agents.stop().await;
    let models = PostgresReadModels::new(store.pool().clone(), &checkpoints);
    contract(&models, &store, &ids).await;
    for runner in runners {
        runner.stop().await;
    }
}
