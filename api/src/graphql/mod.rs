//! The GraphQL schema of design §5 (all of it but what #6 owns: auditTrail,
//! replay, verify*). Resolvers read the read models, send commands through
//! the agents runtime, and stream from the event store.

pub mod error;
pub mod types;

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use agentledger_agents::{stream_of, Runtime, Submission};
use agentledger_eventstore::signing::LedgerKeys;
use agentledger_eventstore::{EventStore, StreamId};
use agentledger_projections::model::audit::AuditEntry;
use agentledger_projections::model::status::StatusFold;
use agentledger_projections::model::Fact;
use agentledger_projections::{ReadModels, WorkflowCursor};
use async_graphql::connection::{Connection, Edge, EmptyFields};
use async_graphql::dataloader::DataLoader;
use async_graphql::{Context, Object, Schema, Subscription, ID};
use chrono::{DateTime, Utc};
use futures::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use error::{bad_input, from_read, from_runtime, from_store, Code};
use types::{
    AgentMetrics, AgentRole, AuditLoader, ForgetResult, LedgerKey, Position, Priority,
    RecordedEvent, ReplayStep, SignedDigest, SubjectKeyLoader, Verification, Workflow,
    WorkflowState,
};

/// The schema type.
pub type AgentledgerSchema = Schema<Query, Mutation, SubscriptionRoot>;

/// Who is calling: the one place a request's caller is known. Authentication
/// (a later issue) fills it in; in dev every caller is `anonymous`.
#[derive(Debug, Clone)]
pub struct Caller {
    pub name: String,
}

impl Caller {
    /// The unauthenticated caller of dev mode.
    pub fn anonymous() -> Self {
        Self {
            name: "anonymous".into(),
        }
    }
}

/// Limits on what a request may ask.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest page of `workflows` and `events`.
    pub max_page: usize,
    /// Query depth and complexity.
    pub max_depth: usize,
    pub max_complexity: usize,
    /// How long a mutation waits for the read models to show its write.
    pub read_your_writes: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_page: 100,
            max_depth: 12,
            max_complexity: 2_000,
            read_your_writes: Duration::from_secs(5),
        }
    }
}

/// What the resolvers use.
#[derive(Clone)]
pub struct Services {
    pub runtime: Runtime,
    pub store: Arc<dyn EventStore>,
    pub read_models: Arc<dyn ReadModels>,
    pub limits: Limits,
    /// The deployment's digest signing keys.
    pub ledger_keys: Arc<dyn LedgerKeys>,
    /// Cancelled when the server shuts down: open subscriptions complete.
    pub shutdown: CancellationToken,
    /// Subscriptions open now.
    pub open_subscriptions: Arc<AtomicI64>,
}

/// Counts an open subscription for as long as it lives.
struct Open(Arc<AtomicI64>);

impl Open {
    fn new(counter: &Arc<AtomicI64>) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Self(counter.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// `stream`, counted while open and ended when the server shuts down.
fn tracked<S: Stream + Send + 'static>(
    services: &Services,
    stream: S,
) -> impl Stream<Item = S::Item> + Send {
    let open = Open::new(&services.open_subscriptions);
    let shutdown = services.shutdown.clone().cancelled_owned();
    stream.take_until(shutdown).map(move |item| {
        // Holding `open` here keeps it (and the count) alive with the stream.
        let _keep = &open;
        item
    })
}

/// Builds the schema over `services`.
pub fn schema(services: Services) -> AgentledgerSchema {
    let loader = DataLoader::new(AuditLoader(services.read_models.clone()), tokio::spawn);
    // No cache: a key destroyed between two requests is gone for the next.
    let keys = DataLoader::new(
        SubjectKeyLoader(services.runtime.subject_keys().cloned()),
        tokio::spawn,
    );
    Schema::build(Query, Mutation, SubscriptionRoot)
        .limit_depth(services.limits.max_depth)
        .limit_complexity(services.limits.max_complexity)
        .data(loader)
        .data(keys)
        .data(services)
        .finish()
}

/// The schema's SDL (what `agentledger schema` prints).
pub fn sdl() -> String {
    Schema::build(Query, Mutation, SubscriptionRoot)
        .finish()
        .sdl()
}

fn services<'a>(ctx: &Context<'a>) -> &'a Services {
    ctx.data_unchecked::<Services>()
}

fn caller(ctx: &Context<'_>) -> Caller {
    ctx.data_opt::<Caller>()
        .cloned()
        .unwrap_or_else(Caller::anonymous)
}

fn parse_id(id: &ID) -> async_graphql::Result<Uuid> {
    id.parse::<Uuid>()
        .map_err(|_| bad_input(format!("{:?} is not a workflow id", id.as_str())))
}

fn page_size(first: Option<i32>, limits: &Limits) -> async_graphql::Result<usize> {
    match first {
        None => Ok(limits.max_page.min(20)),
        Some(n) if n < 0 => Err(bad_input("first must not be negative")),
        Some(n) if n as usize > limits.max_page => Err(bad_input(format!(
            "first is {n}; at most {} per page",
            limits.max_page
        ))),
        Some(n) => Ok(n as usize),
    }
}

/// Cursors are opaque to clients: `<microseconds>.<uuid>` in hex.
fn encode_cursor(status: &agentledger_projections::model::status::WorkflowStatus) -> String {
    hex::encode(format!(
        "{}.{}",
        status.created_at.timestamp_micros(),
        status.id
    ))
}

fn decode_cursor(cursor: &str) -> async_graphql::Result<WorkflowCursor> {
    let malformed = || bad_input("malformed cursor");
    let text = String::from_utf8(hex::decode(cursor).map_err(|_| malformed())?)
        .map_err(|_| malformed())?;
    let (micros, id) = text.split_once('.').ok_or_else(malformed)?;
    Ok(WorkflowCursor {
        created_at: DateTime::<Utc>::from_timestamp_micros(
            micros.parse().map_err(|_| malformed())?,
        )
        .ok_or_else(malformed)?,
        id: id.parse().map_err(|_| malformed())?,
    })
}

/// Queries.
pub struct Query;

#[Object]
impl Query {
    /// One workflow, from the read models.
    async fn workflow(&self, ctx: &Context<'_>, id: ID) -> async_graphql::Result<Option<Workflow>> {
        let id = parse_id(&id)?;
        let status = services(ctx)
            .read_models
            .workflow(id)
            .await
            .map_err(from_read)?;
        Ok(status.map(|status| Workflow {
            status,
            decisions: None,
        }))
    }

    /// Workflows, newest first, optionally in one state; a cursor connection.
    async fn workflows(
        &self,
        ctx: &Context<'_>,
        state: Option<WorkflowState>,
        first: Option<i32>,
        after: Option<String>,
    ) -> async_graphql::Result<Connection<String, Workflow, EmptyFields, EmptyFields>> {
        let services = services(ctx);
        let size = page_size(first, &services.limits)?;
        let cursor = after.as_deref().map(decode_cursor).transpose()?;
        let mut page = services
            .read_models
            .workflows(state.map(WorkflowState::to_domain), cursor, size + 1)
            .await
            .map_err(from_read)?;
        let has_next = page.len() > size;
        page.truncate(size);
        let mut connection = Connection::new(cursor.is_some(), has_next);
        connection.edges.extend(page.into_iter().map(|status| {
            Edge::new(
                encode_cursor(&status),
                Workflow {
                    status,
                    decisions: None,
                },
            )
        }));
        Ok(connection)
    }

    /// Recorded events from the store: of one workflow or of all, from a
    /// position (inclusive).
    async fn events(
        &self,
        ctx: &Context<'_>,
        workflow_id: Option<ID>,
        from_position: Option<Position>,
        first: Option<i32>,
    ) -> async_graphql::Result<Vec<RecordedEvent>> {
        let services = services(ctx);
        let size = page_size(first, &services.limits)?;
        let from = from_position.map_or(1, |p| p.0.max(1));
        let events = match workflow_id {
            Some(id) => {
                let stream = stream_of(parse_id(&id)?);
                let mut all = services
                    .store
                    .read_stream(&stream, 0, 10_000)
                    .await
                    .map_err(from_store)?;
                all.retain(|e| e.global_position >= from);
                all.truncate(size);
                all
            }
            None => services
                .store
                .read_all(from, size)
                .await
                .map_err(from_store)?,
        };
        Ok(events.iter().map(RecordedEvent::of).collect())
    }

    /// The audit trail, in position order: every recorded event in a
    /// reviewer's words, filtered by workflow, actor, role, kind and time
    /// range (`from` inclusive, `to` exclusive); a cursor connection.
    #[allow(clippy::too_many_arguments)]
    async fn audit_trail(
        &self,
        ctx: &Context<'_>,
        workflow_id: Option<ID>,
        actor: Option<String>,
        role: Option<AgentRole>,
        kind: Option<String>,
        from: Option<DateTime<Utc>>,
        to: Option<DateTime<Utc>>,
        first: Option<i32>,
        after: Option<String>,
    ) -> async_graphql::Result<Connection<String, types::AuditTrailEntry, EmptyFields, EmptyFields>>
    {
        let services = services(ctx);
        let size = page_size(first, &services.limits)?;
        let after_position = after
            .as_deref()
            .map(|c| c.parse::<u64>().map_err(|_| bad_input("malformed cursor")))
            .transpose()?;
        let filter = agentledger_projections::AuditFilter {
            workflow: workflow_id.as_ref().map(parse_id).transpose()?,
            actor,
            role: role.map(AgentRole::to_projection),
            kind,
            from,
            to,
            after: after_position,
        };
        let mut page = services
            .read_models
            .audit_trail(&filter, size + 1)
            .await
            .map_err(from_read)?;
        let has_next = page.len() > size;
        page.truncate(size);
        let mut connection = Connection::new(after_position.is_some(), has_next);
        connection.edges.extend(
            page.iter()
                .map(|e| Edge::new(e.position.to_string(), types::AuditTrailEntry::of(e))),
        );
        Ok(connection)
    }

    /// The workflow's events in order, each with the state after it, who
    /// recorded it, what it was based on and why; up to `atPosition` when
    /// given. Nothing is re-executed: the recorded events are folded again.
    async fn replay(
        &self,
        ctx: &Context<'_>,
        workflow_id: ID,
        at_position: Option<Position>,
    ) -> async_graphql::Result<Vec<ReplayStep>> {
        let stream = stream_of(parse_id(&workflow_id)?);
        let events = services(ctx)
            .store
            .read_stream(&stream, 0, 100_000)
            .await
            .map_err(from_store)?;
        if events.is_empty() {
            return Err(error::error(Code::NotFound, "no such workflow"));
        }
        let mut followed = Followed {
            fold: None,
            decisions: Vec::new(),
        };
        let mut steps = Vec::new();
        for event in events
            .iter()
            .take_while(|e| at_position.is_none_or(|at| e.global_position <= at.0))
        {
            let fact = Fact::decode(event)
                .map_err(|e| error::internal(&e))?
                .ok_or_else(|| error::internal(&"not a workflow event"))?;
            followed.apply(&fact);
            let entry = AuditEntry::of(&fact);
            steps.push(ReplayStep {
                position: Position(event.global_position),
                event: RecordedEvent::of(event),
                state: followed.snapshot().expect("a fact was applied"),
                actor: entry.actor,
                role: entry.role.map(AgentRole::from_projection),
                inputs: fact.metadata.inputs.iter().map(|p| Position(*p)).collect(),
                summary: entry.summary,
                rationale: entry.rationale,
            });
        }
        Ok(steps)
    }

    /// Recomputes the hash chain of one workflow's stream.
    async fn verify_workflow(
        &self,
        ctx: &Context<'_>,
        id: ID,
    ) -> async_graphql::Result<Verification> {
        let stream = stream_of(parse_id(&id)?);
        let verification = services(ctx)
            .store
            .verify_stream(&stream)
            .await
            .map_err(from_store)?;
        if verification.checked_events == 0 {
            return Err(error::error(Code::NotFound, "no such workflow"));
        }
        Ok(Verification::of(verification))
    }

    /// Recomputes every stream's hash chain, reading the ledger in pages.
    async fn verify_ledger(&self, ctx: &Context<'_>) -> async_graphql::Result<Verification> {
        let verification = agentledger_eventstore::verify_ledger(&*services(ctx).store, |_, _| {})
            .await
            .map_err(from_store)?;
        Ok(Verification::of(verification))
    }

    /// The ledger's tree head at `atPosition` (default: the head), signed
    /// with the deployment's Ed25519 key. Every chain up to the position is
    /// recomputed first: a ledger that does not verify is not signed.
    /// Keep the result outside the system; `agentledger verify --digest`
    /// proves later that nothing up to the position changed.
    async fn ledger_digest(
        &self,
        ctx: &Context<'_>,
        at_position: Option<Position>,
    ) -> async_graphql::Result<SignedDigest> {
        let services = services(ctx);
        let digest = agentledger_eventstore::signing::sign_ledger(
            &*services.store,
            &*services.ledger_keys,
            at_position.map(|p| p.0),
        )
        .await
        .map_err(from_store)?;
        Ok(SignedDigest::of(digest))
    }

    /// The deployment's digest signing keys (public halves): the active key
    /// first, then retired ones, which still verify what they signed. Also
    /// served at `GET /.well-known/agentledger-key`.
    async fn ledger_keys(&self, ctx: &Context<'_>) -> async_graphql::Result<Vec<LedgerKey>> {
        let keys = services(ctx)
            .ledger_keys
            .public_keys()
            .await
            .map_err(from_store)?;
        Ok(keys.into_iter().map(LedgerKey::of).collect())
    }

    /// Per agent, its figures over `[from, to)` (all time when omitted).
    async fn agent_metrics(
        &self,
        ctx: &Context<'_>,
        from: Option<DateTime<Utc>>,
        to: Option<DateTime<Utc>>,
    ) -> async_graphql::Result<Vec<AgentMetrics>> {
        let rows = services(ctx)
            .read_models
            .agent_metrics(from, to)
            .await
            .map_err(from_read)?;
        Ok(AgentMetrics::per_agent(rows))
    }
}

/// Mutations: commands. Each returns the workflow as of its own write.
pub struct Mutation;

impl Mutation {
    async fn after_write(
        services: &Services,
        id: Uuid,
        position: u64,
    ) -> async_graphql::Result<Workflow> {
        services
            .read_models
            .wait_for(position, services.limits.read_your_writes)
            .await
            .map_err(from_read)?;
        let status = services
            .read_models
            .workflow(id)
            .await
            .map_err(from_read)?
            .ok_or_else(|| {
                error::error(Code::Internal, "the workflow is not in the read models yet")
            })?;
        Ok(Workflow {
            status,
            decisions: None,
        })
    }
}

#[Object]
impl Mutation {
    /// Starts a workflow. The same `idempotencyKey` with the same request
    /// returns the first workflow and writes nothing; with another request
    /// it is a `CONFLICT`.
    async fn submit_workflow(
        &self,
        ctx: &Context<'_>,
        request: String,
        priority: Option<Priority>,
        idempotency_key: Option<String>,
        input: Option<String>,
        #[graphql(
            desc = "The data subject the request is about: its personal text is stored sealed under the subject's key, and `forgetSubject` erases it."
        )]
        subject_id: Option<String>,
    ) -> async_graphql::Result<Workflow> {
        let services = services(ctx);
        let submitted = services
            .runtime
            .submit_recorded(Submission {
                workflow_id: None,
                request,
                input,
                priority: priority.map_or(Default::default(), Priority::to_domain),
                owner: Some(caller(ctx).name),
                idempotency_key,
                subject: subject_id,
            })
            .await
            .map_err(from_runtime)?;
        Self::after_write(services, submitted.id, submitted.position).await
    }

    /// Destroys the data subject's key (crypto-shredding): the personal
    /// text of every workflow submitted for the subject reads as `[erased]`
    /// from now on: in events, read models, replays and exports. The events
    /// are untouched and still verify. The key table is vacuumed; backups
    /// taken before still hold the key until they expire (docs/audit.md).
    /// To become admin-only once roles exist.
    async fn forget_subject(
        &self,
        ctx: &Context<'_>,
        subject_id: String,
    ) -> async_graphql::Result<ForgetResult> {
        let forgotten = services(ctx)
            .runtime
            .forget_subject(&subject_id, &caller(ctx).name)
            .await
            .map_err(from_runtime)?;
        Ok(ForgetResult {
            subject_id,
            destroyed: forgotten.key_id.is_some(),
            key_id: forgotten.key_id.map(|k| ID(k.to_string())),
            vacuumed: forgotten.vacuumed,
        })
    }

    /// Cancels a workflow that has not ended.
    async fn cancel_workflow(
        &self,
        ctx: &Context<'_>,
        id: ID,
        reason: Option<String>,
    ) -> async_graphql::Result<Workflow> {
        let services = services(ctx);
        let id = parse_id(&id)?;
        let position = services
            .runtime
            .cancel(id, reason, &caller(ctx).name)
            .await
            .map_err(from_runtime)?;
        Self::after_write(services, id, position).await
    }

    /// A person's decision on an escalated workflow.
    async fn decide_escalation(
        &self,
        ctx: &Context<'_>,
        id: ID,
        approve: bool,
        comment: String,
    ) -> async_graphql::Result<Workflow> {
        let services = services(ctx);
        let id = parse_id(&id)?;
        let position = services
            .runtime
            .decide_escalation(id, approve, comment, &caller(ctx).name)
            .await
            .map_err(from_runtime)?;
        Self::after_write(services, id, position).await
    }
}

/// Waits (without polling) until the read models have applied `position`;
/// past `patience` the snapshot goes out anyway (the fold is the truth) and
/// the lag is logged.
async fn settle(models: &dyn ReadModels, position: u64, patience: Duration) {
    if let Err(e) = models.wait_for(position, patience).await {
        tracing::warn!(error = %e, "read models behind; sending the snapshot anyway");
    }
}

/// Subscriptions.
pub struct SubscriptionRoot;

/// The state of a followed workflow.
struct Followed {
    fold: Option<StatusFold>,
    decisions: Vec<AuditEntry>,
}

impl Followed {
    fn apply(&mut self, fact: &Fact) {
        match &mut self.fold {
            Some(fold) => fold.apply(fact),
            None => self.fold = Some(StatusFold::start(fact)),
        }
        self.decisions.push(AuditEntry::of(fact));
    }

    fn snapshot(&self) -> Option<Workflow> {
        self.fold.as_ref().map(|f| Workflow {
            status: f.status().clone(),
            decisions: Some(self.decisions.clone()),
        })
    }
}

#[Subscription]
impl SubscriptionRoot {
    /// The workflow now, then after each of its events, until a final state.
    /// With `fromVersion`, every state from that version on (0: from the
    /// first event), folded from the stream.
    async fn workflow_progress(
        &self,
        ctx: &Context<'_>,
        id: ID,
        from_version: Option<i32>,
    ) -> async_graphql::Result<impl Stream<Item = async_graphql::Result<Workflow>>> {
        let services = services(ctx).clone();
        let id = parse_id(&id)?;
        let stream: StreamId = stream_of(id);
        let past = services
            .store
            .read_stream(&stream, 0, 100_000)
            .await
            .map_err(from_store)?;
        if past.is_empty() {
            return Err(error::error(Code::NotFound, "no such workflow"));
        }
        let mut followed = Followed {
            fold: None,
            decisions: Vec::new(),
        };
        let mut first: Vec<async_graphql::Result<Workflow>> = Vec::new();
        for event in &past {
            let fact = Fact::decode(event)
                .map_err(|e| error::internal(&e))?
                .ok_or_else(|| error::internal(&"not a workflow event"))?;
            followed.apply(&fact);
            if from_version.is_some_and(|v| event.stream_version as i64 >= i64::from(v)) {
                first.extend(followed.snapshot().map(Ok));
            }
        }
        if from_version.is_none() {
            first.extend(followed.snapshot().map(Ok));
        }
        let ended = followed
            .fold
            .as_ref()
            .is_some_and(|f| f.status().state.is_final());
        let next_version = past.len() as u64;
        let live = services.store.subscribe_stream(stream, next_version);
        // Each snapshot is sent once the read models have applied its event,
        // so a client that reads the workflow right after a snapshot (or
        // after the subscription ended) sees at least that state.
        let models = services.read_models.clone();
        let patience = services.limits.read_your_writes;
        if let Some(last) = past.last() {
            settle(&*models, last.global_position, patience).await;
        }
        let live = futures::stream::unfold(
            (live, followed, ended),
            move |(mut live, mut followed, ended)| {
                let models = models.clone();
                async move {
                    if ended {
                        return None;
                    }
                    let event = match live.next().await? {
                        Ok(event) => event,
                        Err(e) => return Some((Err(from_store(e)), (live, followed, true))),
                    };
                    let fact = match Fact::decode(&event) {
                        Ok(Some(fact)) => fact,
                        Ok(None) => return None,
                        Err(e) => return Some((Err(error::internal(&e)), (live, followed, true))),
                    };
                    followed.apply(&fact);
                    let done = followed
                        .fold
                        .as_ref()
                        .is_some_and(|f| f.status().state.is_final());
                    let snapshot = followed.snapshot().expect("a fact was applied");
                    settle(&*models, event.global_position, patience).await;
                    Some((Ok(snapshot), (live, followed, done)))
                }
            },
        );
        Ok(tracked(&services, futures::stream::iter(first).chain(live)))
    }

    /// Recorded events, catch-up then live: of one workflow (all of its
    /// events by default) or of all (from now by default); resumable with
    /// `fromPosition` (inclusive).
    async fn workflow_events(
        &self,
        ctx: &Context<'_>,
        workflow_id: Option<ID>,
        from_position: Option<Position>,
    ) -> async_graphql::Result<impl Stream<Item = async_graphql::Result<RecordedEvent>>> {
        let services = services(ctx).clone();
        let from = from_position.map(|p| p.0.max(1));
        let subscription = match workflow_id {
            Some(id) => services
                .store
                .subscribe_stream(stream_of(parse_id(&id)?), 0),
            None => {
                let from = match from {
                    Some(from) => from,
                    None => services.store.head_position().await.map_err(from_store)? + 1,
                };
                services.store.subscribe_all(from)
            }
        };
        let from = from.unwrap_or(1);
        let events = subscription
            .into_stream()
            .filter_map(move |event| async move {
                match event {
                    Ok(event) if event.global_position >= from => {
                        Some(Ok(RecordedEvent::of(&event)))
                    }
                    Ok(_) => None,
                    Err(e) => Some(Err(from_store(e))),
                }
            });
        Ok(tracked(&services, events))
    }
}
