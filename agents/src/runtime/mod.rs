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

mod drive;
mod history;

use std::collections::HashSet;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use agentledger_domain::policy::{
    gitcode::GitCodeConfig, lubit::LubitConfig, rune::RuneConfig, sena::SenaConfig,
};
use agentledger_domain::privacy::{Sealing, TextField};
use agentledger_domain::workflow::{Command, DomainError, Priority, Text, Workflow};
use agentledger_eventstore::subject_keys::{Forgotten, SubjectKeys};
use agentledger_eventstore::{
    Actor, EventStore, ExpectedVersion, Metadata, NewEvent, PolicyRef, Position, StoreError,
    StreamId,
};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub use history::{stream_of, History, Recorded, Recorder, STREAM_PREFIX};

use crate::clock::Clock;
use crate::faults::{FaultPlan, FaultPoint};
use crate::queue::{Claim, QueueError, WorkQueue};
use crate::tool::ToolRegistry;

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
}

/// A person's decision on an escalated workflow.
#[derive(Debug, Clone)]
pub struct HumanDecision {
    pub approve: bool,
    pub comment: String,
    /// Who decides (kind human; `subject` is compared with the owner).
    pub by: Actor,
    /// The workflow's last position as the person saw it; when given and the
    /// workflow has moved on, [`RuntimeError::Moved`] and nothing written.
    pub expected_position: Option<Position>,
    /// Whether the workflow's submitter may decide (never by default
    /// outside dev).
    pub allow_self: bool,
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
    /// Which free text of a workflow with a data subject is sealed under the
    /// subject's key (default: all of it).
    pub personal_fields: Vec<TextField>,
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
            personal_fields: TextField::ALL.to_vec(),
        }
    }
}

/// The stream recording destroyed subject keys.
pub const PRIVACY_STREAM: &str = "privacy-keys";

/// A request to start a workflow.
#[derive(Debug, Clone, Default)]
pub struct Submission {
    /// The workflow's id; a new UUIDv7 when `None`.
    pub workflow_id: Option<Uuid>,
    pub request: String,
    pub input: Option<String>,
    pub priority: Priority,
    /// The submitting principal's stable identity (`anonymous` in dev):
    /// the workflow's owner.
    pub owner: Option<String>,
    /// Who records the submission; a person named by `owner` when `None`.
    pub actor: Option<Actor>,
    /// The owner's tenant (`default` when `None`).
    pub tenant: Option<String>,
    pub idempotency_key: Option<String>,
    /// The data subject the request is about: its personal text is sealed
    /// under the subject's key (see [`Runtime::forget_subject`]).
    pub subject: Option<String>,
}

/// A submission as recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Submitted {
    pub id: Uuid,
    /// The position of its `WorkflowSubmitted` event.
    pub position: Position,
    /// True when an earlier submission with the same idempotency key is
    /// returned (nothing was written).
    pub existing: bool,
}

/// Where workflow ids derived from idempotency keys live (UUIDv5).
const KEY_NAMESPACE: Uuid = Uuid::from_u128(0x6167_6c65_6467_6572_6b65_7973_0000_0001);

/// The workflow id for `key` submitted by `owner`: the same pair always
/// names the same workflow, so a repeated submission finds it.
pub fn workflow_id_for_key(owner: &str, key: &str) -> Uuid {
    Uuid::new_v5(&KEY_NAMESPACE, format!("{owner}\u{0}{key}").as_bytes())
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
    /// Workflows this runtime holds a lease on.
    held: Mutex<HashSet<Uuid>>,
    /// One permit per workflow driven at once.
    slots: Arc<Semaphore>,
    /// Claims handed from `submit` to the running claim loop, each with its
    /// slot and the history just written; `None` while [`Runtime::run`] is
    /// not running.
    handoff: Mutex<Option<mpsc::UnboundedSender<Handoff>>>,
    /// Cancelled when the runtime is killed (a fault) or stopped: drives
    /// end at their next step without touching the queue.
    pub dead: CancellationToken,
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
        let agents = Agents {
            sena: agent("sena", &config.sena),
            lubit: agent("lubit", &config.lubit),
            gitcode: agent("gitcode", &config.gitcode),
            rune: agent("rune", &config.rune),
        };
        Self {
            inner: Arc::new(Inner {
                store,
                queue,
                tools,
                clock,
                config,
                agents,
                faults,
                wake: Notify::new(),
                held: Mutex::new(HashSet::new()),
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

    /// The data-subject keys, when configured.
    pub fn subject_keys(&self) -> Option<&Arc<dyn SubjectKeys>> {
        self.inner.subject_keys.get()
    }

    /// Destroys the data subject's key: every text sealed under it reads as
    /// erased from now on, everywhere (events, read models, exports), while
    /// the events still verify. The destruction is recorded on the
    /// `privacy-keys` stream by key id (never the subject id), just before
    /// the key is deleted, so an auditor sees when and by whom a key was
    /// destroyed. Safe to retry.
    ///
    /// Subjects are per tenant: forgetting `subject` in `tenant` leaves a
    /// subject of the same name in another tenant alone, and the record
    /// carries `tenant`.
    pub async fn forget_subject(
        &self,
        tenant: &str,
        subject: &str,
        by: &Actor,
    ) -> Result<Forgotten, RuntimeError> {
        let subject = &agentledger_eventstore::subject_keys::filed_subject(tenant, subject)?;
        let keys = self.inner.keys().ok_or_else(|| {
            DomainError::BadInput("crypto-shredding is not configured on this runtime".into())
        })?;
        // Recorded first, under an id derived from the key: should the
        // delete then fail, the caller's retry finds the key still there,
        // resends the same event (stored once) and deletes. The other order
        // could destroy a key with no record of it.
        if let Some(key_id) = keys.find(subject).await? {
            let stream = StreamId::new(PRIVACY_STREAM).expect("a valid stream id");
            let mut metadata = Metadata::new(by.clone());
            metadata.owner = by.identity().to_string();
            metadata.tenant = tenant.to_string();
            let mut event = NewEvent::new(
                "SubjectKeyDestroyed",
                serde_json::json!({ "key_id": key_id }),
                metadata,
            );
            event.event_id = Uuid::new_v5(&key_id, b"SubjectKeyDestroyed");
            match self
                .inner
                .store
                .append(&stream, ExpectedVersion::Any, vec![event])
                .await
            {
                // Recorded before by another person's attempt: that record stands.
                Ok(_) | Err(StoreError::IdempotencyMismatch { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(keys.forget(subject).await?)
    }

    /// The event store.
    pub fn store(&self) -> &Arc<dyn EventStore> {
        &self.inner.store
    }

    /// This runtime's lease owner name.
    pub fn owner(&self) -> &str {
        &self.inner.config.owner
    }

    /// True once a fault point has stopped this runtime.
    pub fn is_dead(&self) -> bool {
        self.inner.dead.is_cancelled()
    }

    /// Starts a workflow: checks the submission (nothing is written when it
    /// is refused), queues it, records `WorkflowSubmitted`. Returns its id.
    ///
    /// The queue row is written first, already claimed by this runtime, so
    /// no other runtime can claim it before the stream exists; should this
    /// process die before the append, the row's lease runs out and the
    /// claimer that finds no stream drops the row after `orphan_grace`. The
    /// other order (append, then queue) could lose the workflow.
    pub async fn submit(&self, submission: Submission) -> Result<Uuid, RuntimeError> {
        Ok(self.submit_recorded(submission).await?.id)
    }

    /// [`Runtime::submit`], telling where the submission was recorded. With
    /// an idempotency key, the workflow id is derived from the key and its
    /// owner: the same key with the same request returns the first workflow
    /// and writes nothing; with another request it is [`RuntimeError::KeyReused`].
    pub async fn submit_recorded(&self, submission: Submission) -> Result<Submitted, RuntimeError> {
        let inner = &self.inner;
        let owner_name = submission.owner.unwrap_or_else(|| "anonymous".into());
        let tenant = submission.tenant.unwrap_or_else(|| "default".into());
        // Keys are scoped per tenant and owner; the default tenant's ids
        // stay those derived before tenants existed.
        let key_scope = if tenant == "default" {
            owner_name.clone()
        } else {
            format!("{tenant}\u{0}{owner_name}")
        };
        let id = match (&submission.workflow_id, &submission.idempotency_key) {
            (Some(id), _) => *id,
            (None, Some(key)) => workflow_id_for_key(&key_scope, key),
            (None, None) => Uuid::now_v7(),
        };
        let mut command = Command::Submit {
            request: Text::new(submission.request),
            input: submission.input.map(Text::new),
            priority: submission.priority,
            sealing: None,
        };
        let mut history = History {
            id,
            stream: stream_of(id),
            workflow: Workflow::default(),
            events: Vec::new(),
            tenant,
            owner: owner_name,
            key: None,
        };
        // Refuse bad input before anything is written.
        agentledger_domain::workflow::handle(&history.workflow, command.clone())?;
        let subject = match &submission.subject {
            None => None,
            Some(subject) => {
                let keys = inner.keys().ok_or_else(|| {
                    DomainError::BadInput(
                        "this server does not seal personal data: submit without a subject".into(),
                    )
                })?;
                Some((
                    keys,
                    agentledger_eventstore::subject_keys::filed_subject(&history.tenant, subject)?,
                ))
            }
        };
        if submission.idempotency_key.is_some() {
            if let Some(existing) = self
                .existing_submission(id, &command, subject.is_some())
                .await?
            {
                return Ok(existing);
            }
        }
        // The subject's key only now, for a submission that will be recorded.
        if let Some((keys, subject)) = subject {
            let (key_id, key) = keys.key_for(&subject).await?;
            if let Command::Submit { sealing, .. } = &mut command {
                *sealing = Some(Sealing {
                    key: key_id,
                    fields: inner.config.personal_fields.clone(),
                });
            }
            history.key = Some(key);
        }
        let now = inner.clock.now();
        let owner = &inner.config.owner;
        let claim = match inner
            .queue
            .enqueue_claimed(id, submission.priority, owner, now, inner.config.lease)
            .await
        {
            Ok(claim) => claim,
            // Another submission of the same key is being recorded.
            Err(QueueError::Held(_)) if submission.idempotency_key.is_some() => {
                return match self
                    .existing_submission(id, &command, history.key.is_some())
                    .await?
                {
                    Some(existing) => Ok(existing),
                    None => Err(RuntimeError::Superseded),
                };
            }
            Err(e) => return Err(e.into()),
        };
        inner.held.lock().expect("held lock").insert(id);
        let recorder = match submission.actor {
            Some(actor) => person(actor),
            None => person(Actor::human(history.owner.clone())),
        };
        let written = history
            .record_keyed(
                &*inner.store,
                &recorder,
                vec![command.clone()],
                None,
                vec![],
                submission.idempotency_key,
            )
            .await;
        let mut unknown = false;
        let outcome = match written {
            Ok(true) => Ok(Submitted {
                id,
                position: history.last().map_or(0, |r| r.position),
                existing: false,
            }),
            Ok(false) => Err(RuntimeError::Superseded),
            // The database failed around the commit: it may have happened.
            // Read the stream before deciding; a submission found there is
            // a success.
            Err(RuntimeError::Store(
                e @ (StoreError::Database(_) | StoreError::Unavailable(_)),
            )) => {
                unknown = true;
                match self
                    .existing_submission(id, &command, history.key.is_some())
                    .await
                {
                    Ok(Some(found)) => Ok(Submitted {
                        existing: false,
                        ..found
                    }),
                    _ => Err(RuntimeError::Store(e)),
                }
            }
            Err(e) => Err(e),
        };
        if outcome.is_err() {
            inner.forget(id);
            // A row whose append surely failed goes; one whose append may
            // have committed stays, unclaimed once its lease runs out: a
            // claimer drives the workflow if its stream exists, and drops
            // the row after `orphan_grace` if it never appears.
            if !unknown {
                let _ = inner.queue.remove(id).await;
            }
            return outcome;
        }
        if unknown {
            tracing::warn!(%id, "the submission's commit was in doubt; the stream has it");
        }
        // Drive it here if a slot is free; else let any runtime claim it.
        let handoff = inner.handoff.lock().expect("handoff lock").clone();
        let slot = inner.slots.clone().try_acquire_owned().ok();
        let handed_over = match (handoff, slot) {
            (Some(handoff), Some(slot)) => handoff.send((claim, Some(history), slot)).is_ok(),
            _ => false,
        };
        if !handed_over {
            inner.forget(id);
            inner.queue.release(owner, id, None, now).await?;
            inner.wake.notify_one();
        }
        outcome
    }

    /// The recorded submission of workflow `id` when it exists and matches
    /// `command` (and, like it, has a data subject or not);
    /// [`RuntimeError::KeyReused`] when it exists and differs.
    async fn existing_submission(
        &self,
        id: Uuid,
        command: &Command,
        with_subject: bool,
    ) -> Result<Option<Submitted>, RuntimeError> {
        let Some(history) = History::load(&*self.inner.store, self.inner.keys(), id).await? else {
            return Ok(None);
        };
        let first = &history.events[0];
        let same = match (&first.event, command) {
            (
                agentledger_domain::workflow::WorkflowEvent::WorkflowSubmitted {
                    request,
                    input,
                    priority,
                    sealing,
                },
                Command::Submit {
                    request: r,
                    input: i,
                    priority: p,
                    ..
                },
            ) => request == r && input == i && priority == p && sealing.is_some() == with_subject,
            _ => false,
        };
        if !same {
            return Err(RuntimeError::KeyReused);
        }
        Ok(Some(Submitted {
            id,
            position: first.position,
            existing: true,
        }))
    }

    /// Records a person's decision on an escalated workflow and resumes it.
    ///
    /// The queue row is written twice: before the append, claimable only
    /// after `orphan_grace` (so that a crash right after the append still
    /// resumes the workflow, late), and after it, claimable at once.
    ///
    /// The decision names the gate decision it answers (position and
    /// hash); the submitter may not decide unless `allow_self`.
    pub async fn decide_escalation(
        &self,
        workflow: Uuid,
        decision: HumanDecision,
    ) -> Result<Position, RuntimeError> {
        let inner = &self.inner;
        let mut history = History::load(&*inner.store, inner.keys(), workflow)
            .await?
            .ok_or(DomainError::NotFound)?;
        if !decision.allow_self && decision.by.identity() == history.owner {
            return Err(RuntimeError::SelfDecision);
        }
        let last = history.last().map_or(0, |r| r.position);
        if let Some(expected) = decision.expected_position.filter(|e| *e != last) {
            return Err(RuntimeError::Moved {
                expected,
                actual: last,
            });
        }
        let answers = history
            .last_where(|e| {
                matches!(
                    e,
                    agentledger_domain::workflow::WorkflowEvent::GateDecided { .. }
                )
            })
            .and_then(|gate| {
                Some(agentledger_domain::workflow::GateRef {
                    position: gate.position,
                    hash: gate.hash.clone()?,
                })
            });
        let command = Command::RecordHumanDecision {
            approve: decision.approve,
            comment: Text::new(decision.comment),
            answers,
        };
        agentledger_domain::workflow::handle(&history.workflow, command.clone())?;
        let priority = history.workflow.priority;
        let now = inner.clock.now();
        let later = now + chrono::Duration::from_std(inner.config.orphan_grace).unwrap_or_default();
        inner.queue.enqueue(workflow, priority, later, now).await?;
        let recorder = person(decision.by);
        let causation = history.last().map(|r| r.event_id);
        let inputs = history.last().map(|r| vec![r.position]).unwrap_or_default();
        if !history
            .record(&*inner.store, &recorder, vec![command], causation, inputs)
            .await?
        {
            return Err(RuntimeError::Superseded);
        }
        inner.queue.enqueue(workflow, priority, now, now).await?;
        inner.wake.notify_one();
        Ok(history.last().map_or(0, |r| r.position))
    }

    /// Cancels a workflow that has not ended. A runtime driving it stops at
    /// its next append (the version moved) and lets the row go.
    pub async fn cancel(
        &self,
        workflow: Uuid,
        reason: Option<String>,
        by: &Actor,
    ) -> Result<Position, RuntimeError> {
        let inner = &self.inner;
        let mut history = History::load(&*inner.store, inner.keys(), workflow)
            .await?
            .ok_or(DomainError::NotFound)?;
        let causation = history.last().map(|r| r.event_id);
        let command = Command::Cancel {
            reason: reason.map(Text::new),
        };
        if !history
            .record(
                &*inner.store,
                &person(by.clone()),
                vec![command],
                causation,
                vec![],
            )
            .await?
        {
            return Err(RuntimeError::Superseded);
        }
        Ok(history.last().map_or(0, |r| r.position))
    }

    /// Reads workflow `id` (its state and events); `None` when unknown.
    pub async fn load(&self, id: Uuid) -> Result<Option<History>, RuntimeError> {
        History::load(&*self.inner.store, self.inner.keys(), id).await
    }

    /// Claims and drives workflows until `shutdown` completes or a fault
    /// kills the runtime. On shutdown, drives in flight stop at their next
    /// step and their claims are released for others.
    pub async fn run(&self, shutdown: impl std::future::Future<Output = ()>) {
        let inner = self.inner.clone();
        let slots = inner.slots.clone();
        let mut drives = JoinSet::new();
        let (handoff, mut handed) = mpsc::unbounded_channel();
        *inner.handoff.lock().expect("handoff lock") = Some(handoff);
        let renewer = tokio::spawn(renew_leases(inner.clone()));
        let sweeper = tokio::spawn(sweep_unqueued(inner.clone()));
        let woken = wake_on_new_work(inner.clone());
        tokio::pin!(shutdown);
        // The last claim found fewer rows than it asked for: the queue had
        // nothing more. A slot freed since is no reason to ask again (that
        // would cost a transaction per finished workflow); new work wakes
        // the loop (`wake`: another process's records, a local requeue),
        // and expired leases are found by the poll.
        let mut drained = false;
        loop {
            while drives.try_join_next().is_some() {}
            if drained {
                tokio::select! {
                    () = inner.wake.notified() => {}
                    Some((claim, history, slot)) = handed.recv() => {
                        spawn_drive(&mut drives, &inner, claim, history, slot);
                        continue;
                    }
                    () = inner.clock.sleep(inner.config.poll_interval) => {}
                    () = &mut shutdown => break,
                    () = inner.dead.cancelled() => break,
                }
                drained = false;
            }
            // Wait for a free slot, then claim as many rows as slots are free.
            let first = tokio::select! {
                slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
                Some((claim, history, slot)) = handed.recv() => {
                    spawn_drive(&mut drives, &inner, claim, history, slot);
                    continue;
                }
                () = &mut shutdown => break,
                () = inner.dead.cancelled() => break,
            };
            // Take the slots before claiming: `submit` takes slots too.
            let mut free = vec![first];
            while free.len() < inner.config.claim_batch {
                match slots.clone().try_acquire_owned() {
                    Ok(slot) => free.push(slot),
                    Err(_) => break,
                }
            }
            let now = inner.clock.now();
            let claims = match inner
                .queue
                .claim(&inner.config.owner, free.len(), now, inner.config.lease)
                .await
            {
                Ok(claims) => claims,
                Err(e) => {
                    tracing::warn!(error = %e, "claiming work failed; retrying after the poll interval");
                    Vec::new()
                }
            };
            drained = claims.len() < free.len();
            tracing::debug!(claimed = claims.len(), owner = %inner.config.owner, "claimed");
            for (claim, slot) in claims.into_iter().zip(free.drain(..)) {
                spawn_drive(&mut drives, &inner, claim, None, slot);
            }
            drop(free);
        }
        *inner.handoff.lock().expect("handoff lock") = None;
        // Claims handed over but not started stay in `held`: they go back
        // with the others below.
        handed.close();
        while handed.recv().await.is_some() {}
        let killed = inner.dead.is_cancelled();
        inner.dead.cancel();
        renewer.abort();
        sweeper.abort();
        woken.abort();
        // Drives see `dead` at their next step and end; a killed runtime
        // leaves its leases to expire, a stopped one hands them back.
        while drives.join_next().await.is_some() {}
        if !killed {
            let held: Vec<Uuid> = inner.held.lock().expect("held lock").drain().collect();
            let now = inner.clock.now();
            for workflow in held {
                let _ = inner
                    .queue
                    .release(&inner.config.owner, workflow, None, now)
                    .await;
            }
        }
    }

    /// Kills the runtime as a crash would: drives stop where they are, no
    /// lease is released or renewed.
    pub fn kill(&self) {
        self.inner.dead.cancel();
    }
}

/// A claim handed from `submit` to the claim loop: the claim, the history
/// just written (no need to read it back), the slot it will run in.
type Handoff = (Claim, Option<History>, OwnedSemaphorePermit);

fn spawn_drive(
    drives: &mut JoinSet<()>,
    inner: &Arc<Inner>,
    claim: Claim,
    history: Option<History>,
    slot: OwnedSemaphorePermit,
) {
    inner.held.lock().expect("held lock").insert(claim.workflow);
    let inner = inner.clone();
    // Every log line of the drive carries the workflow as correlation id.
    let span = tracing::info_span!("workflow", correlation_id = %claim.workflow);
    drives.spawn(tracing::Instrument::instrument(
        async move {
            drive::drive(&inner, claim, history).await;
            drop(slot);
        },
        span,
    ));
}

fn person(actor: Actor) -> Recorder {
    Recorder {
        actor,
        policy: None,
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
        self.held.lock().expect("held lock").remove(&workflow);
    }
}

/// Renews this runtime's leases every third of the lease time.
async fn renew_leases(inner: Arc<Inner>) {
    loop {
        inner.clock.sleep(inner.config.lease / 3).await;
        let held: Vec<Uuid> = inner
            .held
            .lock()
            .expect("held lock")
            .iter()
            .copied()
            .collect();
        if held.is_empty() || inner.dead.is_cancelled() {
            continue;
        }
        let until = crate::queue::lease_end(inner.clock.now(), inner.config.lease);
        if let Err(e) = inner.queue.renew(&inner.config.owner, &held, until).await {
            tracing::warn!(error = %e, "renewing leases failed");
        }
    }
}

/// Every `orphan_grace`, re-queues workflows that wait for an agent but
/// have no queue row (an enqueue lost after its append committed, a row
/// deleted by hand): the read model names candidates unchanged for longer
/// than the grace, and each is folded from its stream first, so a final or
/// escalated workflow (which rightly has no row) is left alone.
async fn sweep_unqueued(inner: Arc<Inner>) {
    use agentledger_domain::workflow::WorkflowState as S;
    let grace = inner.config.orphan_grace.max(Duration::from_millis(100));
    loop {
        inner.clock.sleep(grace).await;
        if inner.dead.is_cancelled() {
            return;
        }
        let now = inner.clock.now();
        let before = now - chrono::Duration::from_std(grace).unwrap_or_default();
        let candidates = match inner.queue.unqueued(before, 100).await {
            Ok(candidates) => candidates,
            Err(e) => {
                tracing::warn!(error = %e, "looking for workflows without a queue row failed");
                continue;
            }
        };
        let mut requeued = 0;
        for id in candidates {
            let history = match History::load(&*inner.store, inner.keys(), id).await {
                Ok(Some(history)) => history,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(workflow = %id, error = %e, "reading a workflow to sweep failed");
                    continue;
                }
            };
            let waiting = matches!(
                history.workflow.state,
                S::Submitted | S::Analysing | S::Gating | S::Executing | S::Reviewing
            );
            if !waiting {
                continue;
            }
            match inner
                .queue
                .enqueue(id, history.workflow.priority, now, now)
                .await
            {
                Ok(()) => {
                    tracing::warn!(workflow = %id, state = ?history.workflow.state, "workflow had no queue row; queued it again");
                    requeued += 1;
                }
                Err(e) => {
                    tracing::warn!(workflow = %id, error = %e, "re-queueing a workflow failed")
                }
            }
        }
        if requeued > 0 {
            inner.wake.notify_one();
        }
    }
}

/// Wakes the claim loop when another process records work: a submission,
/// a gate verdict (an approval goes back to the queue) or a person's decision.
fn wake_on_new_work(inner: Arc<Inner>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let from = match inner.store.head_position().await {
            Ok(head) => head + 1,
            Err(_) => return,
        };
        let mut events = inner.store.subscribe_all(from);
        while let Some(event) = events.next().await {
            let Ok(event) = event else { return };
            if !matches!(
                event.event_type.as_str(),
                "WorkflowSubmitted" | "GateDecided" | "HumanDecisionRecorded"
            ) {
                continue;
            }
            // A workflow this runtime holds is being driven here (its own
            // submissions, its own gate verdicts): nothing in the queue is
            // new for it, and a claim would cost a transaction to find
            // nothing. A requeue here wakes the loop itself.
            let local = event
                .stream_id
                .as_str()
                .strip_prefix(STREAM_PREFIX)
                .and_then(|id| id.parse::<Uuid>().ok())
                .is_some_and(|id| inner.held.lock().expect("held lock").contains(&id));
            if !local {
                inner.wake.notify_one();
            }
        }
    })
}

/// Positions helper for decisions: the positions of `events`.
pub(crate) fn positions<'a>(events: impl IntoIterator<Item = &'a Recorded>) -> Vec<Position> {
    events.into_iter().map(|r| r.position).collect()
}
