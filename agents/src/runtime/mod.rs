//! The runtime: claims workflows from the [`WorkQueue`], folds each one's
//! stream, runs the agent whose turn it is, and records the decision with
//! the version it read. Commands from people and applications (submit,
//! decide an escalation, cancel) come in through [`Runtime`] too.
//!
//! A claim drives a workflow through its automatic stages until a hand-off:
//! after an approval it goes back to the queue, where Lubit's priority now
//! orders it; it leaves the queue when it waits for a person or has ended.
//! If the process dies, the lease runs out and another runtime picks the
//! workflow up from what the stream says (an attempt left running is
//! recorded as abandoned, then retried).

mod calls;
mod claims;
mod commands;
mod drive;
mod external;
mod history;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use agentledger_domain::policy::{
    gitcode::GitCodeConfig, lubit::LubitConfig, rune::RuneConfig, sena::SenaConfig,
};
use agentledger_domain::privacy::TextField;
use agentledger_domain::workflow::DomainError;
use agentledger_eventstore::subject_keys::SubjectKeys;
use agentledger_eventstore::{Actor, EventStore, PolicyRef, Position, StoreError};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub use agentledger_domain::names::PRIVACY_STREAM;
pub use calls::{call_id, CallAnswer, ExternalToolSpec, MAX_CALL_ERROR, MAX_CLAIM_TOOLS};
pub use commands::{workflow_id_for_key, HumanDecision, Submission, Submitted};
pub use external::{
    context, stage_of, AgentTask, DeclaredPolicy, TaskId, Worker, DEFAULT_TASK_LEASE,
    MAX_TASK_LEASE,
};
pub use history::{stream_of, History, Recorded, Recorder, STREAM_PREFIX};

use crate::clock::Clock;
use crate::faults::{FaultPlan, FaultPoint};
use crate::queue::{QueueError, WorkQueue};
use crate::tool::ToolRegistry;
use claims::Handoff;

/// Why a command or the runtime failed.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The domain refused the command; nothing was written
    /// (`BAD_INPUT`, `NOT_FOUND` or `CONFLICT`, by the inner error).
    #[error(transparent)]
    Rejected(#[from] DomainError),
    /// The event store failed; see the inner error for how to handle it.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The task queue failed; retry later (`UNAVAILABLE`).
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// Another writer changed the workflow between read and write; read it
    /// again and retry if the command still applies (`CONFLICT`).
    #[error("the workflow changed meanwhile; read it again")]
    Superseded,
    /// A stored event cannot be read (`INTERNAL`): a bug or a newer writer.
    #[error("corrupt workflow: {0}")]
    Corrupt(String),
    /// The idempotency key was used before for a different request
    /// (`CONFLICT`); nothing was written.
    #[error("this idempotency key was used for a different request")]
    KeyReused,
    /// The person who submitted a workflow tried to decide its escalation
    /// (four eyes); nothing was written (`FORBIDDEN`).
    #[error(
        "the submitter of a workflow cannot decide its escalation: another person must (four eyes)"
    )]
    SelfDecision,
    /// The workflow moved past the position the decider saw; nothing was
    /// written. Read it again and decide on what it is now (`CONFLICT`).
    #[error("the workflow is at position {actual}, not {expected}: read it again before deciding")]
    Moved {
        expected: Position,
        actual: Position,
    },
    /// An external agent's decision breaks its role's schema; nothing was
    /// written (`BAD_INPUT`, with the path).
    #[error(transparent)]
    InvalidDecision(#[from] crate::decision::InvalidDecision),
    /// The worker does not hold the task (its lease ran out, another worker
    /// has it, or it was decided); nothing was written (`CONFLICT`).
    #[error("{0}")]
    TaskLost(String),
}

/// How the runtime behaves; every policy configuration is recorded (as a
/// fingerprint) with the decisions made under it.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// This runtime's name in leases (unique per process).
    pub owner: String,
    /// Workflows driven at once.
    pub max_workflows: usize,
    /// Most rows one claim takes.
    pub claim_batch: usize,
    /// How long a claim lasts without renewal; a dead runtime's work waits
    /// this long before another picks it up.
    pub lease: Duration,
    /// How often the queue is polled when nothing woke the runtime (new
    /// work from other processes wakes it through the event store; expired
    /// leases are only found by polling).
    pub poll_interval: Duration,
    /// How long a submission whose stream never appeared stays queued.
    pub orphan_grace: Duration,
    pub sena: SenaConfig,
    pub lubit: LubitConfig,
    pub gitcode: GitCodeConfig,
    pub rune: RuneConfig,
    /// Roles whose decisions external workers make (through the API)
    /// instead of the built-in agent; none by default.
    pub external: std::collections::BTreeSet<agentledger_domain::names::AgentRole>,
    /// Tools served by external workers, registered beside the given ones
    /// (replacing any of the same name); none by default.
    pub external_tools: Vec<ExternalToolSpec>,
    /// Tools of MCP servers, registered like `external_tools`; none by
    /// default.
    pub mcp_tools: Vec<crate::mcp::McpToolSpec>,
    /// Roles a language model decides (with the reference policy as its
    /// fallback); none by default. Needs `llm`.
    pub llm_roles: std::collections::BTreeSet<agentledger_domain::names::AgentRole>,
    /// The model's endpoint, for `llm_roles`.
    pub llm: Option<crate::llm::LlmConfig>,
    /// Reuse of deterministic tools' results and models' answers (off by
    /// default).
    pub cache: crate::cache::CacheConfig,
    /// Which free text of a workflow with a data subject is sealed under the
    /// subject's key (default: all of it).
    pub personal_fields: Vec<TextField>,
    /// Where the runtime counts restarts of its work (task `agents`): a
    /// workflow whose drive panicked is handed back to the queue and driven
    /// again; `/metrics` reports the count.
    pub health: agentledger_eventstore::health::Health,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            owner: format!("{}-{}", std::process::id(), Uuid::now_v7().simple()),
            max_workflows: 64,
            claim_batch: 32,
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_secs(1),
            orphan_grace: Duration::from_secs(30),
            sena: SenaConfig::default(),
            lubit: LubitConfig::default(),
            gitcode: GitCodeConfig::default(),
            rune: RuneConfig::default(),
            external_tools: Vec::new(),
            mcp_tools: Vec::new(),
            llm_roles: std::collections::BTreeSet::new(),
            llm: None,
            cache: crate::cache::CacheConfig::default(),
            external: Default::default(),
            personal_fields: TextField::ALL.to_vec(),
            health: Default::default(),
        }
    }
}

/// The four agents' identities, with the fingerprints of their configurations.
#[derive(Debug, Clone)]
pub(crate) struct Agents {
    pub sena: Recorder,
    pub lubit: Recorder,
    pub gitcode: Recorder,
    pub rune: Recorder,
}

/// The hex SHA-256 of `config`'s canonical JSON: the same configuration
/// always gives the same fingerprint, on any machine.
pub fn fingerprint(config: &impl Serialize) -> String {
    let value = serde_json::to_value(config).expect("policy configurations serialise");
    hex::encode(Sha256::digest(
        agentledger_eventstore::chain::canonical_json(&value),
    ))
}

fn agent(name: &str, config: &impl Serialize) -> Recorder {
    let version = agentledger_domain::policy::VERSION.to_string();
    Recorder {
        actor: Actor::agent(name, version.clone()),
        policy: Some(PolicyRef {
            name: format!("{name}-reference"),
            version,
            fingerprint: fingerprint(config),
        }),
    }
}

/// Who records a model's decisions for `role`: the role's agent, under the
/// policy `<agent>-llm` at the prompt's version, fingerprinted over the
/// endpoint, model, limits and prompt.
fn model_recorder(
    model: &crate::llm::LlmAgent,
    role: agentledger_domain::names::AgentRole,
) -> Recorder {
    let name = role.reference_agent();
    let (version, _) = crate::llm::prompt(role);
    Recorder {
        actor: Actor::agent(name, agentledger_domain::policy::VERSION.to_string()),
        policy: Some(PolicyRef {
            name: format!("{name}-llm"),
            version,
            fingerprint: fingerprint(&model.policy_basis(role)),
        }),
    }
}

pub(crate) struct Inner {
    pub store: Arc<dyn EventStore>,
    pub queue: Arc<dyn WorkQueue>,
    pub tools: ToolRegistry,
    pub clock: Arc<dyn Clock>,
    pub config: RuntimeConfig,
    pub agents: Agents,
    pub faults: Option<FaultPlan>,
    /// Something may be claimable.
    pub wake: Notify,
    /// Workflows this runtime holds a lease on, each with whether a
    /// person decided on it meanwhile (its wake-up was held back).
    held: Mutex<HashMap<Uuid, bool>>,
    /// How often each workflow's drive panicked here: the pause before it
    /// is driven again doubles with each.
    panics: Mutex<std::collections::HashMap<Uuid, u32>>,
    /// One permit per workflow driven at once.
    slots: Arc<Semaphore>,
    /// Claims handed from `submit` to the running claim loop, each with its
    /// slot and the history just written; `None` while [`Runtime::run`] is
    /// not running.
    handoff: Mutex<Option<mpsc::UnboundedSender<Handoff>>>,
    /// Cancelled when the runtime is killed (a fault) or stopped: drives
    /// end at their next step without touching the queue.
    pub dead: CancellationToken,
    /// Calls of external tools waiting for workers.
    pub calls: Arc<calls::CallBoard>,
    /// Connections to the MCP servers of `config.mcp_tools`.
    pub mcp: crate::mcp::McpServers,
    /// Results reused instead of run again.
    pub cache: crate::cache::ResultCache,
    /// The model serving `config.llm_roles`, with its recorder per role.
    pub llm: Option<(
        crate::llm::LlmAgent,
        Vec<(agentledger_domain::names::AgentRole, Recorder)>,
    )>,
    /// The schemas of external agents' decisions.
    pub decisions: crate::decision::Decisions,
    /// A task was handed to external workers of this role.
    pub task_signal: tokio::sync::broadcast::Sender<agentledger_domain::names::AgentRole>,
    /// Data-subject keys (crypto-shredding); without them, submissions
    /// with a subject are refused.
    subject_keys: OnceLock<Arc<dyn SubjectKeys>>,
}

impl Inner {
    /// The subject keys, when configured.
    pub fn keys(&self) -> Option<&dyn SubjectKeys> {
        self.subject_keys.get().map(|k| &**k)
    }
}

/// The agent runtime. Cheap to clone.
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<Inner>,
}

impl Runtime {
    /// A runtime over `store` and `queue` with `tools`, reading time from `clock`.
    pub fn new(
        store: Arc<dyn EventStore>,
        queue: Arc<dyn WorkQueue>,
        tools: ToolRegistry,
        clock: Arc<dyn Clock>,
        config: RuntimeConfig,
    ) -> Self {
        Self::with_faults(store, queue, tools, clock, config, None)
    }

    /// Like [`Runtime::new`], dying at the point `faults` names (crash tests).
    pub fn with_faults(
        store: Arc<dyn EventStore>,
        queue: Arc<dyn WorkQueue>,
        tools: ToolRegistry,
        clock: Arc<dyn Clock>,
        config: RuntimeConfig,
        faults: Option<FaultPlan>,
    ) -> Self {
        let config_slots = config.max_workflows.max(1);
        let board = Arc::new(calls::CallBoard::new(queue.clone(), clock.clone()));
        let tools = config.external_tools.iter().fold(tools, |tools, spec| {
            tools.register(calls::ExternalTool::new(spec, board.clone()))
        });
        let mcp = crate::mcp::McpServers::default();
        let tools = config.mcp_tools.iter().fold(tools, |tools, spec| {
            tools.register(crate::mcp::McpTool::new(
                spec,
                mcp.connection(spec, clock.clone()),
            ))
        });
        // Sena chooses among the tools: added ones are part of its policy.
        let sena = match (
            config.external_tools.is_empty(),
            config.mcp_tools.is_empty(),
        ) {
            (true, true) => agent("sena", &config.sena),
            (false, true) => agent("sena", &(&config.sena, &config.external_tools)),
            _ => agent(
                "sena",
                &(&config.sena, &config.external_tools, &config.mcp_tools),
            ),
        };
        let agents = Agents {
            sena,
            lubit: agent("lubit", &config.lubit),
            gitcode: agent("gitcode", &config.gitcode),
            rune: agent("rune", &config.rune),
        };
        let decisions = crate::decision::Decisions::new(&tools.names());
        let llm = config
            .llm
            .clone()
            .filter(|_| !config.llm_roles.is_empty())
            .map(|llm_config| {
                let model = crate::llm::LlmAgent::new(llm_config);
                let recorders = config
                    .llm_roles
                    .iter()
                    .map(|&role| (role, model_recorder(&model, role)))
                    .collect();
                (model, recorders)
            });
        Self {
            inner: Arc::new(Inner {
                decisions,
                calls: board,
                mcp,
                llm,
                cache: crate::cache::ResultCache::new(config.cache.clone()),
                task_signal: tokio::sync::broadcast::channel(64).0,
                store,
                queue,
                tools,
                clock,
                config,
                agents,
                faults,
                wake: Notify::new(),
                held: Mutex::new(HashMap::new()),
                panics: Mutex::default(),
                slots: Arc::new(Semaphore::new(config_slots)),
                handoff: Mutex::new(None),
                dead: CancellationToken::new(),
                subject_keys: OnceLock::new(),
            }),
        }
    }

    /// Seals personal text of workflows with a data subject under keys from
    /// `keys`, and opens it when reading workflows back.
    pub fn with_subject_keys(self, keys: Arc<dyn SubjectKeys>) -> Self {
        if self.inner.subject_keys.set(keys).is_err() {
            tracing::warn!("subject keys were set already; keeping the first");
        }
        self
    }

    /// Where the runtime (and, sharing it, the projection runner) report
    /// restarts and problems.
    pub fn health(&self) -> &agentledger_eventstore::health::Health {
        &self.inner.config.health
    }

    /// The data-subject keys, when configured.
    pub fn subject_keys(&self) -> Option<&Arc<dyn SubjectKeys>> {
        self.inner.subject_keys.get()
    }

    /// The event store.
    pub fn store(&self) -> &Arc<dyn EventStore> {
        &self.inner.store
    }

    /// This runtime's lease owner name.
    pub fn owner(&self) -> &str {
        &self.inner.config.owner
    }

    /// How many times an MCP server said its tools changed (each change is
    /// listed before that server's next call is built).
    pub fn mcp_tool_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.mcp.changes()
    }

    /// The result cache's counts.
    pub fn cache_stats(&self) -> crate::cache::CacheStats {
        self.inner.cache.stats()
    }

    /// True once a fault point has stopped this runtime.
    pub fn is_dead(&self) -> bool {
        self.inner.dead.is_cancelled()
    }
}

impl Inner {
    /// Counts a visit of `point`; when the fault plan strikes, kills the
    /// runtime and returns true.
    pub(crate) fn crash_at(&self, point: FaultPoint) -> bool {
        let strikes = self.faults.as_ref().is_some_and(|f| f.strikes(point));
        if strikes {
            tracing::warn!(?point, owner = %self.config.owner, "fault point reached: the runtime dies here");
            self.dead.cancel();
        }
        strikes || self.dead.is_cancelled()
    }

    pub(crate) fn forget(&self, workflow: Uuid) {
        let decided_meanwhile = self.held.lock().expect("held lock").remove(&workflow);
        if decided_meanwhile == Some(true) {
            // Its wake-up came while the drive still held the workflow,
            // maybe after the drive's queue row was gone: the person's
            // work is claimable now, and nothing else would say so.
            self.wake.notify_one();
        }
        // A drive that ended normally: its earlier panics are behind it.
        self.panics.lock().expect("panics lock").remove(&workflow);
    }
}

/// Positions helper for decisions: the positions of `events`.
pub(crate) fn positions<'a>(events: impl IntoIterator<Item = &'a Recorded>) -> Vec<Position> {
    events.into_iter().map(|r| r.position).collect()
}
