//! Listing workflows with their subtasks and decisions costs a bounded
//! number of read-model queries, whatever the page size.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use agentledger_agents::{
    InMemoryWorkQueue, Runtime, RuntimeConfig, Submission, SystemClock, ToolRegistry,
};
use agentledger_api::{Limits, Services};
use agentledger_domain::workflow::WorkflowState;
use agentledger_eventstore::signing::InMemoryLedgerKeys;
use agentledger_eventstore::{EventStore, InMemoryEventStore};
use agentledger_projections::model::audit::AuditEntry;
use agentledger_projections::model::metrics::AgentMetrics;
use agentledger_projections::model::status::WorkflowStatus;
use agentledger_projections::{
    AuditFilter, InMemoryReadModels, ReadError, ReadModels, WorkflowCursor,
};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

/// Read models that count the calls made to them.
struct Counting {
    inner: InMemoryReadModels,
    calls: AtomicUsize,
    /// Play read models that lag: nothing applied, nothing found.
    behind: bool,
}

impl Counting {
    fn count(&self) {
        self.calls.fetch_add(1, Ordering::SeqCst);
    }
}

#[async_trait]
impl ReadModels for Counting {
    async fn workflow(&self, id: Uuid) -> Result<Option<WorkflowStatus>, ReadError> {
        self.count();
        if self.behind {
            return Ok(None);
        }
        self.inner.workflow(id).await
    }
    async fn workflows(
        &self,
        tenant: Option<&str>,
        state: Option<WorkflowState>,
        after: Option<WorkflowCursor>,
        limit: usize,
    ) -> Result<Vec<WorkflowStatus>, ReadError> {
        self.count();
        self.inner.workflows(tenant, state, after, limit).await
    }
    async fn audit_trail(
        &self,
        filter: &AuditFilter,
        limit: usize,
    ) -> Result<Vec<AuditEntry>, ReadError> {
        self.count();
        self.inner.audit_trail(filter, limit).await
    }
    async fn agent_metrics(
        &self,
        tenant: Option<&str>,
        from: Option<DateTime<Utc>>,
        to: Option<DateTime<Utc>>,
    ) -> Result<Vec<AgentMetrics>, ReadError> {
        self.count();
        self.inner.agent_metrics(tenant, from, to).await
    }
    async fn count_by_state(
        &self,
        tenant: Option<&str>,
    ) -> Result<Vec<(WorkflowState, u64)>, ReadError> {
        self.count();
        self.inner.count_by_state(tenant).await
    }
    async fn audit_of(&self, workflows: &[Uuid]) -> Result<Vec<AuditEntry>, ReadError> {
        self.count();
        self.inner.audit_of(workflows).await
    }
    async fn checkpoints(&self) -> Result<Vec<(String, u64)>, ReadError> {
        self.inner.checkpoints().await
    }
    async fn wait_for(&self, position: u64, limit: Duration) -> Result<(), ReadError> {
        if self.behind {
            return Err(ReadError::Timeout(position));
        }
        self.inner.wait_for(position, limit).await
    }
}

// Paused time: the loader's batching window (a tokio timer) closes only
// once every resolver that can run has run, however busy the machine is;
// on real time a loaded machine split the batch by chance.
#[tokio::test(start_paused = true)]
async fn a_page_of_100_workflows_with_subtasks_and_decisions_takes_a_bounded_number_of_read_model_calls(
) {
    let store: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::default());
    let models = Arc::new(Counting {
        inner: InMemoryReadModels::start(store.clone()),
        calls: AtomicUsize::new(0),
        behind: false,
    });
    let runtime = Runtime::new(
        store.clone(),
        Arc::new(InMemoryWorkQueue::default()),
        ToolRegistry::default(),
        Arc::new(SystemClock),
        RuntimeConfig::default(),
    );
    // Submitted without running the agents: each has one event, enough to list.
    let mut last = 0;
    for i in 0..100 {
        last = runtime
            .submit_recorded(Submission {
                request: format!("Count the words of note {i}."),
                ..Default::default()
            })
            .await
            .unwrap()
            .position;
    }
    models
        .wait_for(last, Duration::from_secs(10))
        .await
        .unwrap();
    let schema = agentledger_api::schema(Services {
        runtime,
        store,
        read_models: models.clone(),
        limits: Limits::default(),
        ledger_keys: Arc::new(InMemoryLedgerKeys::default()),
        shutdown: Default::default(),
        open_subscriptions: Arc::default(),
        auth: Arc::new(agentledger_api::Authenticator::off()),
        ledger_work: Arc::new(tokio::sync::Semaphore::new(1)),
        transparency: Default::default(),
    });
    models.calls.store(0, Ordering::SeqCst);
    let response = schema
        .execute(anonymous("{ workflows(first: 100) { edges { node { id state subtasks { id } decisions { kind } } } } }"))
        .await;
    assert!(response.errors.is_empty(), "{:?}", response.errors);
    let data = response.data.into_json().unwrap();
    assert_eq!(data["workflows"]["edges"].as_array().unwrap().len(), 100);
    // One call for the page (with its subtasks), then the decisions of all
    // 100 in batches: one, or two when the loader's batching window closes
    // while resolvers are still being polled (a busy machine). Never one
    // per workflow.
    let calls = models.calls.load(Ordering::SeqCst);
    assert!(
        (2..=3).contains(&calls),
        "{calls} read-model calls for a page of 100"
    );
}

#[tokio::test]
async fn an_open_subscription_is_counted_until_it_is_dropped_and_ends_on_shutdown() {
    use futures::StreamExt;
    let store: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::default());
    let models = Arc::new(InMemoryReadModels::start(store.clone()));
    let runtime = Runtime::new(
        store.clone(),
        Arc::new(InMemoryWorkQueue::default()),
        ToolRegistry::default(),
        Arc::new(SystemClock),
        RuntimeConfig::default(),
    );
    runtime
        .submit(Submission {
            request: "Sort the tags.".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let services = Services {
        runtime,
        store,
        read_models: models,
        limits: Limits::default(),
        ledger_keys: Arc::new(InMemoryLedgerKeys::default()),
        shutdown: Default::default(),
        open_subscriptions: Arc::default(),
        auth: Arc::new(agentledger_api::Authenticator::off()),
        ledger_work: Arc::new(tokio::sync::Semaphore::new(1)),
        transparency: Default::default(),
    };
    let schema = agentledger_api::schema(services.clone());
    let mut stream = schema.execute_stream(anonymous(
        "subscription { workflowEvents(fromPosition: 1) { position } }",
    ));
    let first = stream.next().await.unwrap();
    assert!(first.errors.is_empty(), "{:?}", first.errors);
    assert_eq!(services.open_subscriptions.load(Ordering::SeqCst), 1);
    services.shutdown.cancel();
    while stream.next().await.is_some() {}
    drop(stream);
    assert_eq!(services.open_subscriptions.load(Ordering::SeqCst), 0);
}

/// Bad input to the audit and privacy operations is refused with
/// `BAD_INPUT` and writes nothing: a subject id that is empty or too long,
/// forgetting nobody, a digest beyond the head.
#[tokio::test]
async fn bad_subject_ids_and_digest_positions_are_refused_with_nothing_written() {
    use agentledger_eventstore::subject_keys::InMemorySubjectKeys;
    let store: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::default());
    let runtime = Runtime::new(
        store.clone(),
        Arc::new(InMemoryWorkQueue::default()),
        ToolRegistry::default(),
        Arc::new(SystemClock),
        RuntimeConfig::default(),
    )
    .with_subject_keys(Arc::new(InMemorySubjectKeys::default()));
    let schema = agentledger_api::schema(Services {
        runtime,
        store: store.clone(),
        read_models: Arc::new(InMemoryReadModels::start(store.clone())),
        limits: Limits::default(),
        ledger_keys: Arc::new(InMemoryLedgerKeys::default()),
        shutdown: Default::default(),
        open_subscriptions: Arc::default(),
        auth: Arc::new(agentledger_api::Authenticator::off()),
        ledger_work: Arc::new(tokio::sync::Semaphore::new(1)),
        transparency: Default::default(),
    });
    let long = "x".repeat(300);
    for query in [
        r#"mutation { submitWorkflow(request: "Sort the tags.", subjectId: "  ") { id } }"#
            .to_string(),
        format!(
            r#"mutation {{ submitWorkflow(request: "Sort the tags.", subjectId: "{long}") {{ id }} }}"#
        ),
        r#"mutation { forgetSubject(subjectId: "") { destroyed } }"#.to_string(),
        "{ ledgerDigest(atPosition: 5) { root } }".to_string(),
    ] {
        let response = schema.execute(anonymous(query.as_str())).await;
        let code = response
            .errors
            .first()
            .and_then(|e| e.extensions.as_ref())
            .and_then(|x| x.get("code").cloned());
        assert_eq!(
            code,
            Some(async_graphql::Value::from("BAD_INPUT")),
            "{query}: {:?}",
            response.errors
        );
    }
    assert_eq!(store.head_position().await.unwrap(), 0, "nothing written");
    // Forgetting a subject that never had a key is not an error: nothing to destroy.
    let response = schema
        .execute(anonymous(
            r#"mutation { forgetSubject(subjectId: "nobody") { destroyed vacuumed } }"#,
        ))
        .await;
    assert!(response.errors.is_empty(), "{:?}", response.errors);
    assert_eq!(
        response.data.into_json().unwrap()["forgetSubject"]["destroyed"],
        false
    );
    assert_eq!(store.head_position().await.unwrap(), 0);
}

/// `query` as the anonymous caller of authentication off (every role).
fn anonymous(query: &str) -> async_graphql::Request {
    async_graphql::Request::new(query).data(agentledger_api::Principal::anonymous())
}

/// A committed submission is never reported as a failure: when the read
/// models lag past the wait, the answer is the state folded from the
/// recorded events, flagged pending.
#[tokio::test]
async fn a_mutation_whose_read_models_lag_answers_pending_not_an_error() {
    let store: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::default());
    let models = Arc::new(Counting {
        inner: InMemoryReadModels::start(store.clone()),
        calls: AtomicUsize::new(0),
        behind: true,
    });
    let runtime = Runtime::new(
        store.clone(),
        Arc::new(InMemoryWorkQueue::default()),
        ToolRegistry::default(),
        Arc::new(SystemClock),
        RuntimeConfig::default(),
    );
    let schema = agentledger_api::schema(Services {
        runtime,
        store: store.clone(),
        read_models: models,
        limits: Limits::default(),
        ledger_keys: Arc::new(InMemoryLedgerKeys::default()),
        shutdown: Default::default(),
        open_subscriptions: Arc::default(),
        auth: Arc::new(agentledger_api::Authenticator::off()),
        ledger_work: Arc::new(tokio::sync::Semaphore::new(1)),
        transparency: Default::default(),
    });
    let response = schema
        .execute(anonymous(
            r#"mutation { submitWorkflow(request: "정렬해 주세요.") { id state request pending } }"#,
        ))
        .await;
    assert!(response.errors.is_empty(), "{:?}", response.errors);
    let data = response.data.into_json().unwrap();
    let workflow = &data["submitWorkflow"];
    assert_eq!(workflow["pending"], true);
    assert_eq!(workflow["state"], "SUBMITTED");
    assert_eq!(workflow["request"], "정렬해 주세요.");
    // And it is recorded: the id names a stream with the submission.
    let id: Uuid = workflow["id"].as_str().unwrap().parse().unwrap();
    let events = store
        .read_stream(&agentledger_agents::stream_of(id), 0, 10)
        .await
        .unwrap();
    assert_eq!(events[0].event_type, "WorkflowSubmitted");
}
