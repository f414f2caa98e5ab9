//! A workflow as the runtime sees it: its folded state plus where each event
//! sits in the store, and the one way decisions are appended (expected
//! version, causation, inputs, actor and policy in the metadata).

use std::collections::HashMap;

use agentledger_domain::privacy::SubjectKey;
use agentledger_domain::workflow::{handle, Command, ToolIntent, Workflow, WorkflowEvent};
use agentledger_eventstore::subject_keys::SubjectKeys;
use agentledger_eventstore::{
    Actor, EventStore, ExpectedVersion, Metadata, NewEvent, PolicyRef, Position, StoreError,
    StreamId,
};
use uuid::Uuid;

use super::RuntimeError;

pub use agentledger_domain::names::STREAM_PREFIX;

/// The stream of workflow `id`.
pub fn stream_of(id: Uuid) -> StreamId {
    StreamId::new(format!("{STREAM_PREFIX}{id}")).expect("a workflow stream id is valid")
}

/// Who records an event: the actor and, for agents, the policy.
#[derive(Debug, Clone)]
pub struct Recorder {
    pub actor: Actor,
    pub policy: Option<PolicyRef>,
}

/// One recorded event of the workflow.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub position: Position,
    pub event_id: Uuid,
    pub event: WorkflowEvent,
    /// The event's chain hash (hex) when it was read from the store;
    /// `None` for events this history appended itself.
    pub hash: Option<String>,
}

/// A loaded workflow.
#[derive(Debug, Clone)]
pub struct History {
    pub id: Uuid,
    pub stream: StreamId,
    pub workflow: Workflow,
    pub events: Vec<Recorded>,
    /// Tenant and owner of the submission, carried onto every event.
    pub tenant: String,
    pub owner: String,
    /// The data subject's key that seals the workflow's personal text;
    /// `None` without a subject or once the key was destroyed.
    pub key: Option<SubjectKey>,
}

impl History {
    /// Reads and folds workflow `id`; `None` when it has no events. Sealed
    /// personal text is opened with `keys` (erased where its key is gone;
    /// left sealed without `keys`).
    pub async fn load(
        store: &dyn EventStore,
        keys: Option<&dyn SubjectKeys>,
        id: Uuid,
    ) -> Result<Option<Self>, RuntimeError> {
        Self::load_with(store, keys, id, false).await
    }

    /// [`History::load`]; with `sealed_ok`, a sealed workflow loads without
    /// keys (left sealed, for a caller that opens it itself).
    async fn load_with(
        store: &dyn EventStore,
        keys: Option<&dyn SubjectKeys>,
        id: Uuid,
        sealed_ok: bool,
    ) -> Result<Option<Self>, RuntimeError> {
        const PAGE: usize = 1_000;
        let stream = stream_of(id);
        let mut history = Self {
            id,
            stream: stream.clone(),
            workflow: Workflow::default(),
            events: Vec::new(),
            tenant: String::new(),
            owner: String::new(),
            key: None,
        };
        let mut decoded = Vec::new();
        loop {
            let page = store
                .read_stream(&stream, decoded.len() as u64, PAGE)
                .await?;
            for recorded in &page {
                if decoded.is_empty() {
                    let metadata = recorded
                        .metadata()
                        .map_err(|e| RuntimeError::Corrupt(format!("{stream}: metadata: {e}")))?;
                    history.tenant = metadata.tenant;
                    history.owner = metadata.owner;
                }
                let event = WorkflowEvent::decode(
                    &recorded.event_type,
                    recorded.schema_version,
                    &recorded.payload,
                )
                .map_err(|e| RuntimeError::Corrupt(format!("{stream}: {e}")))?;
                decoded.push((
                    (recorded.global_position, recorded.event_id),
                    event,
                    hex::encode(recorded.hash),
                ));
            }
            if page.len() < PAGE {
                break;
            }
        }
        let sealing = match decoded.first() {
            Some((_, WorkflowEvent::WorkflowSubmitted { sealing, .. }, _)) => sealing.clone(),
            _ => None,
        };
        if sealing.is_some() && keys.is_none() && !sealed_ok {
            return Err(RuntimeError::Corrupt(format!(
                "{stream} is sealed for a data subject and this runtime has no subject keys"
            )));
        }
        if let (Some(keys), Some(sealing)) = (keys, &sealing) {
            let mut wanted: Vec<Uuid> = decoded
                .iter()
                .flat_map(|(_, e, _)| e.sealed_keys())
                .collect();
            wanted.push(sealing.key);
            wanted.sort_unstable();
            wanted.dedup();
            let secrets: HashMap<Uuid, SubjectKey> = keys.secrets(&wanted).await?;
            decoded.iter_mut().for_each(|(_, e, _)| e.open(&secrets));
            history.key = secrets.get(&sealing.key).copied();
        }
        for ((position, event_id), event, hash) in decoded {
            history.push(position, event_id, event, Some(hash));
        }
        Ok((!history.events.is_empty()).then_some(history))
    }

    fn push(
        &mut self,
        position: Position,
        event_id: Uuid,
        event: WorkflowEvent,
        hash: Option<String>,
    ) {
        self.workflow = std::mem::take(&mut self.workflow).apply(&event);
        self.events.push(Recorded {
            position,
            event_id,
            event,
            hash,
        });
    }

    /// The last event, which is what any decision now is caused by.
    pub fn last(&self) -> Option<&Recorded> {
        self.events.last()
    }

    /// The last event matching `wanted`.
    pub fn last_where(&self, wanted: impl Fn(&WorkflowEvent) -> bool) -> Option<&Recorded> {
        self.events.iter().rev().find(|r| wanted(&r.event))
    }

    /// Handles `commands` in order against the current state and appends all
    /// their events in one append, expecting the version this history read.
    /// `Ok(false)`: another writer appended first (the decision is theirs).
    pub async fn record(
        &mut self,
        store: &dyn EventStore,
        recorder: &Recorder,
        commands: Vec<Command>,
        causation: Option<Uuid>,
        inputs: Vec<Position>,
    ) -> Result<bool, RuntimeError> {
        self.record_keyed(store, recorder, commands, causation, inputs, None)
            .await
    }

    /// [`History::record`] with the idempotency key of the command.
    pub async fn record_keyed(
        &mut self,
        store: &dyn EventStore,
        recorder: &Recorder,
        commands: Vec<Command>,
        causation: Option<Uuid>,
        inputs: Vec<Position>,
        idempotency_key: Option<String>,
    ) -> Result<bool, RuntimeError> {
        self.append(
            store,
            recorder,
            commands,
            causation,
            inputs,
            idempotency_key,
            None,
        )
        .await
    }

    /// [`History::record`] with the events' ids given by `ids` (by index):
    /// resending the same decision then stores it once.
    pub async fn record_with_ids(
        &mut self,
        store: &dyn EventStore,
        recorder: &Recorder,
        commands: Vec<Command>,
        causation: Option<Uuid>,
        inputs: Vec<Position>,
        ids: &(dyn Fn(usize) -> Uuid + Sync),
    ) -> Result<bool, RuntimeError> {
        self.append(
            store,
            recorder,
            commands,
            causation,
            inputs,
            None,
            Some(ids),
        )
        .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn append(
        &mut self,
        store: &dyn EventStore,
        recorder: &Recorder,
        commands: Vec<Command>,
        causation: Option<Uuid>,
        inputs: Vec<Position>,
        idempotency_key: Option<String>,
        ids: Option<&(dyn Fn(usize) -> Uuid + Sync)>,
    ) -> Result<bool, RuntimeError> {
        let mut scratch = self.workflow.clone();
        let mut events = Vec::new();
        for command in commands {
            let produced = handle(&scratch, command)?;
            scratch = produced.iter().fold(scratch, Workflow::apply);
            events.extend(produced);
        }
        if events.is_empty() {
            return Ok(true);
        }
        let mut metadata = Metadata::new(recorder.actor.clone());
        metadata.correlation_id = Some(self.id);
        metadata.causation_id = causation;
        metadata.tenant = self.tenant.clone();
        metadata.owner = self.owner.clone();
        metadata.policy = recorder.policy.clone();
        metadata.inputs = inputs;
        metadata.idempotency_key = idempotency_key;
        // The trace the decision was made in; not on events whose ids are
        // derived (a resend must stay byte for byte what was stored).
        if ids.is_none() {
            metadata.trace_id = crate::trace::current_trace_id();
        }
        // Personal text is stored sealed; this history keeps it readable.
        let sealing = scratch.sealing.clone();
        let new: Vec<NewEvent> = events
            .iter()
            .enumerate()
            .map(|(index, event)| {
                let stored = sealing.as_ref().map(|sealing| {
                    let mut stored = event.clone();
                    stored.seal(sealing, self.key.as_ref(), random_nonce);
                    stored
                });
                let (event_type, schema_version, payload) =
                    stored.as_ref().unwrap_or(event).encode();
                let mut new = NewEvent::new(event_type, payload, metadata.clone());
                new.schema_version = schema_version;
                if let Some(ids) = ids {
                    new.event_id = ids(index);
                }
                // A call's idempotency key is the id of the event that
                // declared it: the server and the ledger name it alike.
                if let WorkflowEvent::SubtaskStarted {
                    intent:
                        Some(ToolIntent {
                            idempotency_key,
                            repeats: None,
                            ..
                        }),
                    ..
                } = event
                {
                    new.event_id = *idempotency_key;
                }
                new
            })
            .collect();
        let ids: Vec<Uuid> = new.iter().map(|e| e.event_id).collect();
        let expected = match self.events.len() {
            0 => ExpectedVersion::NoStream,
            n => ExpectedVersion::Exact(n as u64 - 1),
        };
        let appended = match store.append(&self.stream, expected, new).await {
            Ok(appended) => appended,
            Err(StoreError::Conflict { .. }) => return Ok(false),
            Err(e) => return Err(e.into()),
        };
        let contiguous =
            appended.last_position - appended.first_position + 1 == events.len() as u64;
        if contiguous {
            for ((event, id), i) in events.into_iter().zip(ids).zip(0..) {
                self.push(appended.first_position + i, id, event, None);
            }
        } else {
            // Positions of one append are taken as a block; should that ever
            // change, read them back rather than guess.
            let key = self.key;
            *self = Self::load_with(store, None, self.id, true)
                .await?
                .ok_or_else(|| RuntimeError::Corrupt(format!("{} vanished", self.stream)))?;
            if let Some(key) = key {
                let secrets = self
                    .workflow
                    .sealing
                    .as_ref()
                    .map(|s| HashMap::from([(s.key, key)]))
                    .unwrap_or_default();
                for recorded in &mut self.events {
                    recorded.event.open(&secrets);
                }
                self.workflow = Workflow::from_events(self.events.iter().map(|r| &r.event));
                self.key = Some(key);
            }
        }
        Ok(true)
    }
}

/// A fresh 96-bit AES-GCM nonce from the operating system's generator.
fn random_nonce() -> [u8; 12] {
    use aes_gcm::aead::rand_core::RngCore;
    let mut nonce = [0u8; 12];
    aes_gcm::aead::OsRng.fill_bytes(&mut nonce);
    nonce
}
