//! Replay against the read models, position by position: the state replay
//! shows after each event of a workflow equals what the PostgreSQL read
//! models held right after the projections applied that event.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use agentledger_agents::{PostgresWorkQueue, Runtime, RuntimeConfig, SystemClock, ToolRegistry};
use agentledger_api::{Limits, Services};
use agentledger_eventstore::signing::InMemoryLedgerKeys;
use agentledger_eventstore::testing::TestDatabase;
use agentledger_eventstore::EventStore;
use agentledger_projections::postgres::project::projection;
use agentledger_projections::postgres::runner::Checkpoints;
use agentledger_projections::{Fact, PostgresReadModels};
use serde_json::{json, Value};

const STATE: &str = "id state priority request progress { done total }
    subtasks { id title tool dependsOn state attempts output }
    decisions { position role actor kind summary rationale at }
    ethics { transparency collaboration autonomy fairness passed findings }
    createdAt updatedAt completedAt lastPosition version";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_at_every_position_equals_the_read_model_right_after_that_event() {
    let db = TestDatabase::create().await;
    let store = db.store().await;
    let ids = common::complete_workflows(
        &store,
        &[
            "Summarise the attached report. Then count the words. Finally sort the tags.",
            "보고서를 요약해 주세요. 그다음 단어 수를 세어 주세요.",
        ],
    )
    .await;
    let shared: Arc<dyn EventStore> = Arc::new(store.clone());
    let services = Services {
        runtime: Runtime::new(
            shared.clone(),
            Arc::new(PostgresWorkQueue::new(store.pool().clone())),
            ToolRegistry::default(),
            Arc::new(SystemClock),
            RuntimeConfig::default(),
        ),
        store: shared.clone(),
        read_models: Arc::new(PostgresReadModels::new(
            store.pool().clone(),
            &Checkpoints::default(),
        )),
        limits: Limits::default(),
        ledger_keys: Arc::new(InMemoryLedgerKeys::default()),
        shutdown: Default::default(),
        open_subscriptions: Arc::default(),
        auth: Arc::new(agentledger_api::Authenticator::off()),
        ledger_work: Arc::new(tokio::sync::Semaphore::new(1)),
        transparency: Default::default(),
    };
    let schema = agentledger_api::schema(services);
    let run = |query: String, variables: Value| {
        let schema = schema.clone();
        async move {
            let request = async_graphql::Request::new(query)
                .variables(async_graphql::Variables::from_json(variables))
                .data(agentledger_api::Principal::anonymous());
            let response = schema.execute(request).await;
            assert!(response.errors.is_empty(), "{:?}", response.errors);
            response.data.into_json().unwrap()
        }
    };

    // What replay says after each event, by position.
    let mut replayed: HashMap<u64, Value> = HashMap::new();
    for id in &ids {
        let data = run(
            format!(
                "query($id: ID!) {{ replay(workflowId: $id) {{ position state {{ {STATE} }} }} }}"
            ),
            json!({ "id": id.to_string() }),
        )
        .await;
        for step in data["replay"].as_array().unwrap() {
            replayed.insert(step["position"].as_u64().unwrap(), step["state"].clone());
        }
    }
    assert!(replayed.len() >= 20, "{} steps", replayed.len());

    // The projections, one event per transaction, as a runner sees the
    // ledger (the two workflows interleaved); after each, the read model.
    let mut status = projection("workflow_status", shared.clone()).unwrap();
    let mut audit = projection("audit_trail", shared.clone()).unwrap();
    let mut client = db.admin_client().await;
    let mut compared = 0;
    for event in store.read_all(1, 10_000).await.unwrap() {
        let fact = Fact::decode(&event).unwrap().expect("a workflow event");
        let tx = client.transaction().await.unwrap();
        status
            .apply(&tx, "", std::slice::from_ref(&fact))
            .await
            .unwrap();
        audit
            .apply(&tx, "", std::slice::from_ref(&fact))
            .await
            .unwrap();
        tx.commit().await.unwrap();
        let read = run(
            format!("query($id: ID!) {{ workflow(id: $id) {{ {STATE} }} }}"),
            json!({ "id": fact.workflow.to_string() }),
        )
        .await;
        let expected = &replayed[&event.global_position];
        assert_eq!(
            &read["workflow"], expected,
            "position {} ({}): read model vs replay",
            event.global_position, event.event_type
        );
        compared += 1;
    }
    assert_eq!(compared, replayed.len(), "every position compared");
}
