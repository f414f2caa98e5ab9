//! The GraphQL schema of design §5: queries (`query`), mutations
//! (`mutation`) and subscriptions (`subscription`). Resolvers read the read
//! models, send commands through the agents runtime, and stream from the
//! event store. Who may call which root field is `auth::access::ACCESS`,
//! enforced before any resolver runs; which rows a caller sees (its tenant,
//! its own workflows) is decided here, by [`visible_stream`] and
//! [`principal`].

pub(crate) mod budget;
mod mutation;
mod query;
mod subscription;

pub mod error;
pub mod types;

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use agentledger_agents::{stream_of, Runtime};
use agentledger_eventstore::signing::LedgerKeys;
use agentledger_eventstore::{EventStore, RecordedEvent};
use agentledger_projections::{ReadModels, WorkflowCursor};
use async_graphql::dataloader::DataLoader;
use async_graphql::{Context, Schema, ID};
use chrono::{DateTime, Utc};
use futures::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::auth::access::ShapeLimits;
use crate::auth::{Authenticator, Principal, Role};
use error::{bad_input, from_store, Code};
use types::{AuditLoader, SubjectKeyLoader};

pub use mutation::Mutation;
pub use query::Query;
pub use subscription::SubscriptionRoot;
use subscription::{facts_of, Followed};

/// The schema type.
pub type AgentledgerSchema = Schema<Query, Mutation, SubscriptionRoot>;

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
    /// Root fields and aliases per operation.
    pub shape: ShapeLimits,
    /// Whether introspection (`__schema`, `__type`) is answered.
    pub introspection: bool,
    /// Largest GraphQL response (or subscription message), in bytes of
    /// JSON, enforced while it is built.
    pub max_response_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_page: 100,
            max_depth: 12,
            max_complexity: 2_000,
            read_your_writes: Duration::from_secs(5),
            shape: ShapeLimits::default(),
            introspection: true,
            max_response_bytes: 8 * 1024 * 1024,
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
    /// Who is calling, and the four-eyes setting.
    pub auth: Arc<Authenticator>,
    /// Whole-ledger work (verification, signing) runs one at a time per
    /// process, however many callers or aliases ask.
    pub ledger_work: Arc<tokio::sync::Semaphore>,
    /// The ledger's tree: proofs and checkpoints.
    pub transparency: Transparency,
}

/// The ledger's tree as proofs and checkpoints read it.
#[derive(Clone)]
pub struct Transparency {
    /// The tiles (kept up by `agentledger_eventstore::tlog::maintain`).
    pub tree: Arc<dyn agentledger_eventstore::tlog::TreeTiles>,
    /// The checkpoints' origin line, also their signing key's name.
    pub origin: String,
    /// What the witnesses said to the last checkpoint pushed, by URL.
    pub witnesses: WitnessStatus,
    /// The last checkpoint `GET /checkpoint` signed: (tree size, when,
    /// note). Signed again only when the tree grew or a second passed.
    pub signed: Arc<std::sync::Mutex<Option<(u64, std::time::Instant, String)>>>,
}

impl Transparency {
    /// A copy of what each witness said last, by URL.
    pub fn witness_reports(&self) -> std::collections::BTreeMap<String, WitnessReport> {
        self.witnesses.lock().expect("witness status lock").clone()
    }
}

/// The witnesses' answers, by witness URL (written by `serve`'s pusher).
pub type WitnessStatus = Arc<std::sync::Mutex<std::collections::BTreeMap<String, WitnessReport>>>;

/// What one witness said last.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct WitnessReport {
    /// The largest tree it cosigned for us.
    pub cosigned_size: u64,
    /// Why it refused our last checkpoint (a history it cannot see as an
    /// extension of what it cosigned): the node is not ready while set.
    pub refused: Option<String>,
    /// Why it could not be reached last time (the node stays ready).
    pub unreachable: Option<String>,
    /// The checkpoint it cosigned last and its cosignature lines, each
    /// verified under a key of `[witness] keys` (not in `/ready`'s body).
    #[serde(skip)]
    pub cosigned: Option<(String, Vec<String>)>,
}

/// The origin a deployment that names none signs its checkpoints with.
pub const DEFAULT_ORIGIN: &str = "localhost/agentledger";

impl Default for Transparency {
    /// Tiles in memory that nothing maintains, and the default origin: for
    /// tests that do not ask for proofs.
    fn default() -> Self {
        Self {
            tree: Arc::new(agentledger_eventstore::tlog::MemoryTiles::default()),
            origin: DEFAULT_ORIGIN.to_string(),
            witnesses: WitnessStatus::default(),
            signed: Arc::default(),
        }
    }
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
    let mut builder = Schema::build(Query, Mutation, SubscriptionRoot)
        .limit_depth(services.limits.max_depth)
        .limit_complexity(services.limits.max_complexity);
    if !services.limits.introspection {
        builder = builder.disable_introspection();
    }
    builder.data(loader).data(keys).data(services).finish()
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

/// The caller. The access guard has already refused a request without one.
fn principal<'a>(ctx: &Context<'a>) -> async_graphql::Result<&'a Principal> {
    ctx.data_opt::<Principal>()
        .ok_or_else(|| error::error(Code::Unauthenticated, "this request carries no credential"))
}

/// Whether `principal` may see `event`: its tenant's workflow events, and
/// for auditors and admins its tenant's administrative records too.
fn may_see(principal: &Principal, event: &RecordedEvent) -> bool {
    let tenant = event.metadata.get("tenant").and_then(|t| t.as_str());
    tenant == Some(principal.tenant.as_str())
        && (event
            .stream_id
            .as_str()
            .starts_with(agentledger_agents::STREAM_PREFIX)
            || principal.roles.has(Role::Auditor)
            || principal.roles.has(Role::Admin))
}

/// The events of workflow `id` from the store, when it exists in the
/// caller's tenant; else `NOT_FOUND`, the same answer as for a workflow that
/// does not exist, so that another tenant's ids do not leak.
/// Events [`visible_stream`] reads before it has checked who may see them
/// (a workflow of the reference agents has a dozen or two), and the bytes
/// of documents after which that first read ends sooner.
const FIRST_READ: usize = 32;
const FIRST_READ_BYTES: usize = 256 * 1024;

async fn visible_stream(
    ctx: &Context<'_>,
    id: Uuid,
    limit: usize,
) -> async_graphql::Result<Vec<RecordedEvent>> {
    let principal = principal(ctx)?;
    let store = &services(ctx).store;
    let stream = stream_of(id);
    // The first event decides, before more than a first page is read:
    // another tenant's workflow costs about what a missing one does, and a
    // workflow of usual length is read in one round trip.
    let page = store
        .read_page(
            agentledger_eventstore::ReadFrom::Stream(&stream, 0),
            limit.min(FIRST_READ),
            FIRST_READ_BYTES,
        )
        .await
        .map_err(from_store)?;
    let mut events = page.events;
    match events.first() {
        Some(first) if may_see(principal, first) => {}
        _ => return Err(error::error(Code::NotFound, "no such workflow")),
    }
    if events.len() < limit && (page.cut || events.len() == FIRST_READ) {
        events.extend(
            store
                .read_stream(&stream, events.len() as u64, limit - events.len())
                .await
                .map_err(from_store)?,
        );
    }
    Ok(events)
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
