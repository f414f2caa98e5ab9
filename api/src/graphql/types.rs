//! The GraphQL types of design §5, converted from domain and read-model
//! types here (the only place that knows both).

use std::collections::HashMap;
use std::sync::Arc;

use agentledger_domain::privacy;
use agentledger_domain::workflow::{
    read_column, Priority as DomainPriority, WorkflowState as DomainState, ERASED,
};
use agentledger_eventstore::subject_keys::SubjectKeys;
use agentledger_eventstore::RecordedEvent as StoredEvent;
use agentledger_projections::model::audit::AuditEntry;
use agentledger_projections::model::metrics::AgentMetrics as MetricsRow;
use agentledger_projections::model::status::{enum_name, SubtaskStatus, WorkflowStatus};
use agentledger_projections::{AgentRole as ProjectionRole, ReadModels};
use async_graphql::dataloader::{DataLoader, Loader};
use async_graphql::{
    ComplexObject, Context, Enum, InputValueError, InputValueResult, Object, Scalar, ScalarType,
    SimpleObject, Value, ID,
};
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::budget;

/// A global position (or a count of events): a non-negative 64-bit integer
/// sent as a JSON number (GraphQL's `Int` is 32-bit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position(pub u64);

#[Scalar(name = "Position")]
impl ScalarType for Position {
    fn parse(value: Value) -> InputValueResult<Self> {
        match &value {
            Value::Number(n) => n
                .as_u64()
                .map(Position)
                .ok_or_else(|| InputValueError::custom("a position is a non-negative integer")),
            _ => Err(InputValueError::expected_type(value)),
        }
    }

    fn to_value(&self) -> Value {
        Value::Number(self.0.into())
    }
}

/// Where a workflow stands.
#[derive(Enum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkflowState {
    Submitted,
    Analysing,
    Gating,
    AwaitingHuman,
    Executing,
    Reviewing,
    Completed,
    Rejected,
    Failed,
    Flagged,
    Cancelled,
}

impl WorkflowState {
    /// Every state, in the order of the schema.
    pub const ALL: [WorkflowState; 11] = [
        Self::Submitted,
        Self::Analysing,
        Self::Gating,
        Self::AwaitingHuman,
        Self::Executing,
        Self::Reviewing,
        Self::Completed,
        Self::Rejected,
        Self::Failed,
        Self::Flagged,
        Self::Cancelled,
    ];

    pub fn from_domain(state: DomainState) -> Self {
        use DomainState as S;
        match state {
            S::New | S::Submitted => Self::Submitted,
            S::Analysing => Self::Analysing,
            S::Gating => Self::Gating,
            S::AwaitingHuman => Self::AwaitingHuman,
            S::Executing => Self::Executing,
            S::Reviewing => Self::Reviewing,
            S::Completed => Self::Completed,
            S::Rejected => Self::Rejected,
            S::Failed => Self::Failed,
            S::Flagged => Self::Flagged,
            S::Cancelled => Self::Cancelled,
        }
    }

    pub fn to_domain(self) -> DomainState {
        use DomainState as S;
        match self {
            Self::Submitted => S::Submitted,
            Self::Analysing => S::Analysing,
            Self::Gating => S::Gating,
            Self::AwaitingHuman => S::AwaitingHuman,
            Self::Executing => S::Executing,
            Self::Reviewing => S::Reviewing,
            Self::Completed => S::Completed,
            Self::Rejected => S::Rejected,
            Self::Failed => S::Failed,
            Self::Flagged => S::Flagged,
            Self::Cancelled => S::Cancelled,
        }
    }
}

/// How urgent a workflow is.
#[derive(Enum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    Low,
    Normal,
    High,
    Critical,
}

impl Priority {
    pub fn from_domain(p: DomainPriority) -> Self {
        match p {
            DomainPriority::Low => Self::Low,
            DomainPriority::Normal => Self::Normal,
            DomainPriority::High => Self::High,
            DomainPriority::Critical => Self::Critical,
        }
    }

    pub fn to_domain(self) -> DomainPriority {
        match self {
            Self::Low => DomainPriority::Low,
            Self::Normal => DomainPriority::Normal,
            Self::High => DomainPriority::High,
            Self::Critical => DomainPriority::Critical,
        }
    }
}

/// The four agent roles.
#[derive(Enum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentRole {
    Analyst,
    Gatekeeper,
    Executor,
    Ethics,
}

impl AgentRole {
    pub fn from_projection(role: ProjectionRole) -> Self {
        match role {
            ProjectionRole::Analyst => Self::Analyst,
            ProjectionRole::Gatekeeper => Self::Gatekeeper,
            ProjectionRole::Executor => Self::Executor,
            ProjectionRole::Ethics => Self::Ethics,
        }
    }

    pub fn to_projection(self) -> ProjectionRole {
        match self {
            Self::Analyst => ProjectionRole::Analyst,
            Self::Gatekeeper => ProjectionRole::Gatekeeper,
            Self::Executor => ProjectionRole::Executor,
            Self::Ethics => ProjectionRole::Ethics,
        }
    }
}

/// Subtasks done and in all.
#[derive(SimpleObject, Debug, Clone, Copy)]
pub struct Progress {
    pub done: i32,
    pub total: i32,
}

#[derive(Debug, Clone)]
pub struct Subtask(pub SubtaskStatus);

/// A subtask of the current plan.
#[Object]
impl Subtask {
    async fn id(&self) -> &str {
        &self.0.id
    }
    async fn title(&self, ctx: &Context<'_>) -> async_graphql::Result<String> {
        reveal(ctx, &self.0.title).await
    }
    async fn tool(&self) -> &str {
        &self.0.tool
    }
    async fn depends_on(&self) -> &[String] {
        &self.0.depends_on
    }
    /// `PENDING`, `RUNNING`, `RETRYING`, `SUCCEEDED`, `FAILED` or `SKIPPED`.
    async fn state(&self) -> String {
        enum_name(&self.0.state)
    }
    async fn attempts(&self) -> i32 {
        i32::from(self.0.attempts)
    }
    async fn output(&self, ctx: &Context<'_>) -> async_graphql::Result<Option<String>> {
        match &self.0.output {
            Some(output) => Ok(Some(reveal(ctx, output).await?)),
            None => Ok(None),
        }
    }
}

/// A recorded decision (or fact) about a workflow, in a reviewer's words.
#[derive(SimpleObject, Debug, Clone)]
#[graphql(complex)]
pub struct Decision {
    pub position: Position,
    pub role: Option<AgentRole>,
    pub actor: String,
    /// `agent`, `human` or `system`.
    pub actor_kind: String,
    /// The agent's (or worker's) version; empty for people.
    pub actor_version: String,
    /// The fingerprint of the policy the decision was made by (agents).
    pub policy_fingerprint: Option<String>,
    pub kind: String,
    /// Personal text in it shows as `[sealed]`; `rationale` opens it.
    pub summary: String,
    #[graphql(skip)]
    pub rationale: String,
    pub at: DateTime<Utc>,
}

#[ComplexObject]
impl Decision {
    /// The reasons as recorded (personal text opened while its key exists).
    async fn rationale(&self, ctx: &Context<'_>) -> async_graphql::Result<String> {
        reveal(ctx, &self.rationale).await
    }
}

/// Reads a read-model column that may hold sealed personal text: opened
/// with the subject's key while it exists, `[erased]` after.
pub async fn reveal(ctx: &Context<'_>, column: &str) -> async_graphql::Result<String> {
    let (separator, texts) = read_column(column);
    let mut shown = Vec::with_capacity(texts.len());
    for text in &texts {
        let Some(sealed) = text.as_sealed() else {
            shown.push(text.as_str().to_string());
            continue;
        };
        let key = ctx
            .data_unchecked::<DataLoader<SubjectKeyLoader>>()
            .load_one(sealed.key)
            .await?;
        shown.push(
            key.and_then(|key| privacy::open(&key, sealed))
                .unwrap_or_else(|| ERASED.to_string()),
        );
    }
    let shown = shown.join(&separator);
    budget::charge(ctx, shown.len() + 16)?;
    Ok(shown)
}

/// Loads data-subject keys by id, batched across a response.
pub struct SubjectKeyLoader(pub Option<Arc<dyn SubjectKeys>>);

impl Loader<Uuid> for SubjectKeyLoader {
    type Value = [u8; 32];
    type Error = async_graphql::Error;

    async fn load(&self, keys: &[Uuid]) -> Result<HashMap<Uuid, Self::Value>, Self::Error> {
        match &self.0 {
            Some(store) => store.secrets(keys).await.map_err(super::error::from_store),
            None => Ok(HashMap::new()),
        }
    }
}

/// The caller, as this request authenticated.
#[derive(SimpleObject, Debug, Clone)]
pub struct Me {
    /// Stable and unique: `apikey:<key id>`, `jwt:<issuer>#<sub>` or
    /// `anonymous`; the owner of the workflows this caller submits.
    pub subject: String,
    /// The name recorded as the actor of this caller's decisions.
    pub name: String,
    pub tenant: String,
    pub roles: Vec<String>,
    /// `api_key`, `jwt` or `none` (authentication is off).
    pub method: String,
}

impl Me {
    pub fn of(p: &crate::auth::Principal) -> Self {
        Self {
            subject: p.subject.clone(),
            name: p.name.clone(),
            tenant: p.tenant.clone(),
            roles: p.roles.names().into_iter().map(String::from).collect(),
            method: p.method.as_str().into(),
        }
    }
}

/// What `forgetSubject` did.
#[derive(SimpleObject, Debug, Clone)]
pub struct ForgetResult {
    pub subject_id: String,
    /// False when the subject had no key (nothing was sealed for it, or it
    /// was forgotten before).
    pub destroyed: bool,
    /// The destroyed key's id, as recorded on the `privacy-keys` stream.
    pub key_id: Option<ID>,
    /// Whether the key table was vacuumed, so no dead row keeps the key.
    pub vacuumed: bool,
}

impl Decision {
    fn of(entry: &AuditEntry) -> Self {
        Self {
            position: Position(entry.position),
            role: entry.role.map(AgentRole::from_projection),
            actor: entry.actor.clone(),
            actor_kind: entry.actor_kind.clone(),
            actor_version: entry.actor_version.clone(),
            policy_fingerprint: entry.policy_fingerprint.clone(),
            kind: entry.kind.clone(),
            summary: entry.summary.clone(),
            rationale: entry.rationale.clone(),
            at: entry.recorded_at,
        }
    }
}

/// How many workflows are in one state.
#[derive(SimpleObject, Debug, Clone)]
pub struct WorkflowCount {
    pub state: WorkflowState,
    pub count: i64,
}

/// How far one projection is behind the ledger's head.
#[derive(SimpleObject, Debug, Clone)]
pub struct ProjectionLag {
    pub projection: String,
    /// Events recorded that the projection has not applied yet.
    pub behind_events: Position,
}

/// RUNE's review.
#[derive(SimpleObject, Debug, Clone)]
pub struct EthicsScores {
    pub transparency: f64,
    pub collaboration: f64,
    pub autonomy: f64,
    pub fairness: f64,
    pub passed: bool,
    pub findings: Vec<String>,
}

/// The first `len` entries of a shared list of a workflow's decisions:
/// the states of one replay or progress stream share one list.
#[derive(Debug, Clone)]
pub struct Decisions {
    all: Arc<Vec<AuditEntry>>,
    len: usize,
}

impl Decisions {
    pub fn prefix(all: &Arc<Vec<AuditEntry>>, len: usize) -> Self {
        Self {
            all: all.clone(),
            len: len.min(all.len()),
        }
    }

    fn entries(&self) -> &[AuditEntry] {
        &self.all[..self.len]
    }
}

/// A workflow as the read models (or a fold of its stream) show it.
#[derive(Debug, Clone)]
pub struct Workflow {
    pub status: WorkflowStatus,
    /// Known already (a subscription folds them from the stream); else
    /// loaded from the audit trail, batched across a page.
    pub decisions: Option<Decisions>,
    /// The read models had not applied this write when the answer went out.
    pub pending: bool,
}

impl Workflow {
    /// A workflow as the read models have it.
    pub fn of(status: WorkflowStatus) -> Self {
        Self {
            status,
            decisions: None,
            pending: false,
        }
    }
}

#[Object(name = "Workflow")]
impl Workflow {
    /// True when a mutation answers before the read models applied its
    /// write (they lagged past the wait): the write is committed, and the
    /// state shown is folded from the recorded events.
    async fn pending(&self) -> bool {
        self.pending
    }

    async fn id(&self) -> ID {
        ID(self.status.id.to_string())
    }
    async fn state(&self) -> WorkflowState {
        WorkflowState::from_domain(self.status.state)
    }
    async fn priority(&self) -> Priority {
        Priority::from_domain(self.status.priority)
    }
    async fn request(&self, ctx: &Context<'_>) -> async_graphql::Result<String> {
        reveal(ctx, &self.status.request).await
    }
    async fn progress(&self) -> Progress {
        Progress {
            done: self.status.progress_done,
            total: self.status.progress_total,
        }
    }
    async fn subtasks(&self, ctx: &Context<'_>) -> async_graphql::Result<Vec<Subtask>> {
        // Their short fields; titles and outputs are charged when asked for.
        let bytes = self
            .status
            .subtasks
            .iter()
            .map(|s| {
                s.id.len()
                    + s.tool.len()
                    + s.depends_on.iter().map(|d| d.len() + 3).sum::<usize>()
                    + 120
            })
            .sum();
        budget::charge(ctx, bytes)?;
        Ok(self.status.subtasks.iter().cloned().map(Subtask).collect())
    }
    /// Every recorded decision about the workflow, in order (the submission excluded).
    async fn decisions(&self, ctx: &Context<'_>) -> async_graphql::Result<Vec<Decision>> {
        let loaded;
        let entries = match &self.decisions {
            Some(known) => known.entries(),
            None => {
                loaded = ctx
                    .data_unchecked::<DataLoader<AuditLoader>>()
                    .load_one(self.status.id)
                    .await?
                    .unwrap_or_default();
                &loaded[..]
            }
        };
        let decisions: Vec<Decision> = entries
            .iter()
            .filter(|e| e.kind != "submitted")
            .map(Decision::of)
            .collect();
        // What every entry's short fields add, rationales aside (their
        // resolver charges them when they are asked for).
        let bytes = decisions
            .iter()
            .map(|d| d.actor.len() + d.kind.len() + d.summary.len() + 120)
            .sum();
        budget::charge(ctx, bytes)?;
        Ok(decisions)
    }
    async fn ethics(&self, ctx: &Context<'_>) -> async_graphql::Result<Option<EthicsScores>> {
        let Some(e) = &self.status.ethics else {
            return Ok(None);
        };
        let mut findings = Vec::with_capacity(e.findings.len());
        for finding in &e.findings {
            findings.push(reveal(ctx, finding).await?);
        }
        Ok(Some(EthicsScores {
            transparency: e.scores.transparency,
            collaboration: e.scores.collaboration,
            autonomy: e.scores.autonomy,
            fairness: e.scores.fairness,
            passed: e.passed,
            findings,
        }))
    }
    async fn created_at(&self) -> DateTime<Utc> {
        self.status.created_at
    }
    async fn updated_at(&self) -> DateTime<Utc> {
        self.status.updated_at
    }
    async fn completed_at(&self) -> Option<DateTime<Utc>> {
        self.status.completed_at
    }
    async fn last_position(&self) -> Position {
        Position(self.status.last_position)
    }
    /// The stream version of the last event applied.
    async fn version(&self) -> Position {
        Position(self.status.version)
    }
}

/// Loads the audit entries of many workflows in one query.
pub struct AuditLoader(pub Arc<dyn ReadModels>);

impl Loader<Uuid> for AuditLoader {
    type Value = Vec<AuditEntry>;
    type Error = async_graphql::Error;

    async fn load(&self, keys: &[Uuid]) -> Result<HashMap<Uuid, Self::Value>, Self::Error> {
        let entries = self
            .0
            .audit_of(keys)
            .await
            .map_err(super::error::from_read)?;
        let mut by_workflow: HashMap<Uuid, Vec<AuditEntry>> = HashMap::new();
        for entry in entries {
            by_workflow
                .entry(entry.workflow_id)
                .or_default()
                .push(entry);
        }
        Ok(by_workflow)
    }
}

/// An event as stored, with its place in the chain. Its payload and
/// metadata are charged to the response budget when they are asked for.
#[derive(Debug, Clone)]
pub struct RecordedEvent {
    pub position: Position,
    pub stream_id: String,
    pub version: Position,
    pub event_type: String,
    pub payload: serde_json::Value,
    pub metadata: serde_json::Value,
    pub recorded_at: DateTime<Utc>,
    pub hash: String,
    pub prev_hash: String,
}

impl RecordedEvent {
    pub fn of(e: &StoredEvent) -> Self {
        Self {
            position: Position(e.global_position),
            stream_id: e.stream_id.as_str().to_string(),
            version: Position(e.stream_version),
            event_type: e.event_type.clone(),
            payload: e.payload.clone(),
            metadata: e.metadata.clone(),
            recorded_at: e.recorded_at,
            hash: hex::encode(e.hash),
            prev_hash: hex::encode(e.prev_hash),
        }
    }
}

/// An event as stored, with its place in the chain.
#[Object(name = "RecordedEvent")]
impl RecordedEvent {
    async fn position(&self) -> Position {
        self.position
    }
    async fn stream_id(&self) -> &str {
        &self.stream_id
    }
    async fn version(&self) -> Position {
        self.version
    }
    #[graphql(name = "type")]
    async fn event_type(&self) -> &str {
        &self.event_type
    }
    async fn payload(
        &self,
        ctx: &Context<'_>,
    ) -> async_graphql::Result<async_graphql::Json<&serde_json::Value>> {
        budget::charge(ctx, agentledger_eventstore::json_len(&self.payload))?;
        Ok(async_graphql::Json(&self.payload))
    }
    async fn metadata(
        &self,
        ctx: &Context<'_>,
    ) -> async_graphql::Result<async_graphql::Json<&serde_json::Value>> {
        budget::charge(ctx, agentledger_eventstore::json_len(&self.metadata))?;
        Ok(async_graphql::Json(&self.metadata))
    }
    async fn recorded_at(&self) -> DateTime<Utc> {
        self.recorded_at
    }
    async fn hash(&self) -> &str {
        &self.hash
    }
    async fn prev_hash(&self) -> &str {
        &self.prev_hash
    }
}

/// One agent's figures over a time range.
#[derive(SimpleObject, Debug, Clone)]
#[graphql(complex)]
pub struct AgentMetrics {
    pub agent: String,
    pub role: Option<AgentRole>,
    pub decisions: i64,
    pub approvals: i64,
    pub rejections: i64,
    pub revisions: i64,
    pub escalations: i64,
    pub retries: i64,
    pub failures: i64,
    pub flagged: i64,
    #[graphql(skip)]
    pub row: MetricsRow,
}

#[ComplexObject]
impl AgentMetrics {
    /// Mean decision latency (from the event a decision answers to the decision).
    async fn latency_mean_ms(&self) -> Option<f64> {
        self.row.latency_mean_ms()
    }
    /// 95th percentile, read from histogram buckets (the bucket's upper bound).
    async fn latency_p95_ms(&self) -> Option<f64> {
        self.row.latency_p95_ms()
    }
    async fn latency_max_ms(&self) -> Option<f64> {
        (self.row.latency_count > 0).then(|| self.row.latency_max_ms())
    }
    /// RUNE's mean scores over the range (RUNE only).
    async fn mean_ethics(&self) -> Option<EthicsMeans> {
        self.row.ethics_means().map(|[t, c, a, f]| EthicsMeans {
            transparency: t,
            collaboration: c,
            autonomy: a,
            fairness: f,
        })
    }
}

/// Mean ethics scores.
#[derive(SimpleObject, Debug, Clone, Copy)]
pub struct EthicsMeans {
    pub transparency: f64,
    pub collaboration: f64,
    pub autonomy: f64,
    pub fairness: f64,
}

impl AgentMetrics {
    /// Per agent, the rows of a range added up.
    pub fn per_agent(rows: Vec<MetricsRow>) -> Vec<Self> {
        let mut merged: Vec<MetricsRow> = Vec::new();
        for row in rows {
            match merged.iter_mut().find(|m| m.agent == row.agent) {
                Some(m) => m.merge(&row),
                None => merged.push(row),
            }
        }
        merged
            .into_iter()
            .map(|row| Self {
                agent: row.agent.clone(),
                role: ProjectionRole::of_agent(&row.agent).map(AgentRole::from_projection),
                decisions: row.decisions,
                approvals: row.approvals,
                rejections: row.rejections,
                revisions: row.revisions,
                escalations: row.escalations,
                retries: row.retries,
                failures: row.failures,
                flagged: row.flagged,
                row,
            })
            .collect()
    }
}

/// The result of recomputing hash chains.
#[derive(SimpleObject, Debug, Clone)]
pub struct Verification {
    pub ok: bool,
    pub checked_events: Position,
    pub first_broken_position: Option<Position>,
    pub reason: Option<String>,
}

impl Verification {
    pub fn of(v: agentledger_eventstore::Verification) -> Self {
        Self {
            ok: v.ok,
            checked_events: Position(v.checked_events),
            first_broken_position: v.first_broken_position.map(Position),
            reason: v.reason,
        }
    }
}

/// A signed statement that the ledger up to `position` has tree head `root`
/// (RFC 6962 over every event's position and hash; see docs/audit.md).
#[derive(SimpleObject, Debug, Clone)]
pub struct SignedDigest {
    pub format: String,
    pub position: Position,
    pub events: Position,
    /// Hex.
    pub root: String,
    pub signed_at: DateTime<Utc>,
    pub key_id: String,
    /// Ed25519, hex.
    pub public_key: String,
    /// Hex; over the bytes docs/audit.md describes.
    pub signature: String,
    /// The digest as the JSON file `agentledger verify --digest` reads.
    pub json: String,
}

impl SignedDigest {
    pub fn of(d: agentledger_eventstore::signing::SignedDigest) -> Self {
        Self {
            json: serde_json::to_string_pretty(&d).expect("a digest serialises"),
            format: d.format,
            position: Position(d.position),
            events: Position(d.events),
            root: d.root,
            signed_at: d.signed_at,
            key_id: d.key_id,
            public_key: d.public_key,
            signature: d.signature,
        }
    }
}

/// A digest signing key, public half.
#[derive(SimpleObject, Debug, Clone)]
pub struct LedgerKey {
    pub key_id: String,
    pub algorithm: String,
    /// Hex.
    pub public_key: String,
    pub created_at: DateTime<Utc>,
    /// Set once rotated away: it signs no more, it still verifies.
    pub retired_at: Option<DateTime<Utc>>,
    /// The C2SP note verifier key of this key for the deployment's
    /// checkpoints (`<origin>+<key id>+<base64 key>`): what a checkpoint
    /// verifier or a witness is given.
    pub verifier_key: String,
}

impl LedgerKey {
    /// `k`, with its verifier key under the checkpoint origin `origin`.
    pub fn of(k: agentledger_eventstore::signing::LedgerKey, origin: &str) -> Self {
        Self {
            verifier_key: note_verifier_key(&k.public_key, origin),
            key_id: k.key_id,
            algorithm: k.algorithm,
            public_key: k.public_key,
            created_at: k.created_at,
            retired_at: k.retired_at,
        }
    }
}

/// The verifier key of a hex Ed25519 public key, empty if it does not decode.
pub fn note_verifier_key(public_hex: &str, origin: &str) -> String {
    hex::decode(public_hex)
        .ok()
        .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
        .and_then(|bytes| ed25519_dalek::VerifyingKey::from_bytes(&bytes).ok())
        .map(|key| agentledger_eventstore::checkpoint::verifier_key(origin, &key))
        .unwrap_or_default()
}

/// An event's audit path in the ledger's tree (RFC 9162 §2.1.3).
#[derive(SimpleObject, Debug, Clone)]
pub struct InclusionProof {
    /// The event's leaf: its index among the events in position order.
    pub leaf_index: Position,
    /// The tree the proof is for (a checkpoint's or digest's size).
    pub tree_size: Position,
    /// SHA-256(0x00 ‖ position as 8 big-endian bytes ‖ event hash), hex.
    pub leaf_hash: String,
    /// The path, leaf side first, hex.
    pub hashes: Vec<String>,
}

/// The proof that one tree is a prefix of a larger one (RFC 9162 §2.1.4).
#[derive(SimpleObject, Debug, Clone)]
pub struct ConsistencyProof {
    pub from_size: Position,
    pub to_size: Position,
    /// In the RFC's order, hex.
    pub hashes: Vec<String>,
}

/// One step of a replay: an event and the workflow's state after it.
#[derive(SimpleObject, Debug, Clone)]
#[graphql(complex)]
pub struct ReplayStep {
    pub position: Position,
    pub event: RecordedEvent,
    /// The state after the event, by the same fold as the write side.
    pub state: Workflow,
    /// Who recorded it (agent, person or system).
    pub actor: String,
    pub role: Option<AgentRole>,
    /// The positions of the events the decision was based on.
    pub inputs: Vec<Position>,
    pub summary: String,
    #[graphql(skip)]
    pub rationale: String,
}

#[ComplexObject]
impl ReplayStep {
    /// The reasons as recorded (personal text opened while its key exists).
    async fn rationale(&self, ctx: &Context<'_>) -> async_graphql::Result<String> {
        reveal(ctx, &self.rationale).await
    }
}

/// One audit trail entry: a recorded event in a reviewer's words.
#[derive(SimpleObject, Debug, Clone)]
#[graphql(name = "AuditEntry", complex)]
pub struct AuditTrailEntry {
    pub position: Position,
    pub workflow_id: ID,
    pub version: Position,
    pub event_type: String,
    pub kind: String,
    /// `agent`, `human` or `system`.
    pub actor_kind: String,
    pub actor: String,
    pub actor_version: String,
    pub role: Option<AgentRole>,
    pub summary: String,
    #[graphql(skip)]
    pub rationale: String,
    pub policy_fingerprint: Option<String>,
    pub recorded_at: DateTime<Utc>,
    pub hash: String,
}

#[ComplexObject]
impl AuditTrailEntry {
    /// The reasons as recorded (personal text opened while its key exists).
    async fn rationale(&self, ctx: &Context<'_>) -> async_graphql::Result<String> {
        reveal(ctx, &self.rationale).await
    }
}

impl AuditTrailEntry {
    pub fn of(e: &AuditEntry) -> Self {
        Self {
            position: Position(e.position),
            workflow_id: ID(e.workflow_id.to_string()),
            version: Position(e.version),
            event_type: e.event_type.clone(),
            kind: e.kind.clone(),
            actor_kind: e.actor_kind.clone(),
            actor: e.actor.clone(),
            actor_version: e.actor_version.clone(),
            role: e.role.map(AgentRole::from_projection),
            summary: e.summary.clone(),
            rationale: e.rationale.clone(),
            policy_fingerprint: e.policy_fingerprint.clone(),
            recorded_at: e.recorded_at,
            hash: e.hash.clone(),
        }
    }
}

/// Work for an external agent: the decision one workflow waits for, with
/// what the built-in agent would have seen.
#[derive(SimpleObject, Debug, Clone)]
pub struct AgentTask {
    /// `<workflowId>:<version>`: the workflow and the stream version the
    /// decision will be recorded at.
    pub id: ID,
    pub workflow_id: ID,
    pub role: AgentRole,
    /// Claims of this task so far, this one included.
    pub attempt: i32,
    /// Request, input, priority, round, and by role: the tools and the
    /// gatekeeper's feedback (ANALYST), the analysis (GATEKEEPER), the
    /// analysis, verdict and subtask outputs (ETHICS).
    pub context: async_graphql::Json<serde_json::Value>,
    /// Submit, renew or fail before this, or the task goes to another worker.
    pub lease_expires_at: DateTime<Utc>,
}

impl AgentTask {
    pub fn of(task: agentledger_agents::AgentTask) -> Self {
        Self {
            id: ID(task.id.to_string()),
            workflow_id: ID(task.id.workflow.to_string()),
            role: AgentRole::from_projection(task.role),
            attempt: task.attempt,
            context: async_graphql::Json(task.context),
            lease_expires_at: task.lease_expires_at,
        }
    }
}

/// The policy an external agent decided by, recorded with its decision.
#[derive(async_graphql::InputObject, Debug, Clone, Default)]
pub struct AgentPolicyInput {
    /// E.g. `gatekeeper-strict`; `<role>-external` when absent.
    pub name: Option<String>,
    /// The policy's version; the worker's when absent.
    pub version: Option<String>,
    /// Of the policy's configuration (prompt, model, rules); derived from
    /// name and version when absent.
    pub fingerprint: Option<String>,
}

/// A task for this role may be waiting: claim until `claimAgentTask`
/// answers null. With `tool` (role `EXECUTOR`), a call of that external
/// tool may be waiting: claim until `claimToolCall` answers null.
#[derive(SimpleObject, Debug, Clone, PartialEq, Eq)]
pub struct AgentTaskSignal {
    pub role: AgentRole,
    pub tool: Option<String>,
}

/// A call of an external tool: one attempt of one subtask, run by the
/// worker that claimed it under the executor's deadline.
#[derive(SimpleObject, Debug, Clone)]
pub struct ToolCall {
    /// Answer with `completeToolCall(callId: id, …)`.
    pub id: ID,
    pub workflow_id: ID,
    pub subtask_id: String,
    pub tool: String,
    /// The subtask's title.
    pub instruction: String,
    /// The dependencies' outputs, else the workflow's input, else the request.
    pub input: String,
    /// The executor's attempt (1 to 3); a retry is a new call.
    pub attempt: i32,
    /// Claims of this call by workers, this one included.
    pub claims: i32,
    /// The executor records a timeout after this; answers are refused then.
    pub deadline: DateTime<Utc>,
    /// Answer before this, or another worker may claim the call.
    pub lease_expires_at: DateTime<Utc>,
}

impl ToolCall {
    pub fn of(call: agentledger_agents::queue::PostedCall) -> Self {
        Self {
            id: ID(call.id.to_string()),
            workflow_id: ID(call.workflow.to_string()),
            subtask_id: call.subtask,
            tool: call.tool,
            instruction: call.instruction,
            input: call.input,
            attempt: i32::from(call.attempt),
            claims: call.claims,
            deadline: call.deadline,
            lease_expires_at: call.lease.map_or(call.deadline, |(_, until)| until),
        }
    }
}
