//! Commands from people and applications: submit, decide an escalation,
//! cancel, forget a data subject. Each is checked before anything is
//! written, and recorded with its caller as the actor.

use agentledger_domain::names::{PRIVACY_STREAM, SUBJECT_KEY_DESTROYED};
use agentledger_domain::privacy::Sealing;
use agentledger_domain::workflow::{Command, DomainError, Priority, Text, Workflow};
use agentledger_eventstore::subject_keys::Forgotten;
use agentledger_eventstore::{
    Actor, ExpectedVersion, Metadata, NewEvent, Position, StoreError, StreamId,
};
use uuid::Uuid;

use super::{stream_of, History, Recorder, Runtime, RuntimeError};
use crate::queue::QueueError;

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

impl Runtime {
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
                SUBJECT_KEY_DESTROYED,
                serde_json::json!({ "key_id": key_id }),
                metadata,
            );
            event.event_id = Uuid::new_v5(&key_id, SUBJECT_KEY_DESTROYED.as_bytes());
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
            // Another submission of the same key is being recorded, or the
            // node that took it stopped before recording it (its row stays
            // leased until the lease runs out): the caller sends it again.
            Err(QueueError::Held(held)) if submission.idempotency_key.is_some() => {
                return match self
                    .existing_submission(id, &command, history.key.is_some())
                    .await?
                {
                    Some(existing) => Ok(existing),
                    None => Err(RuntimeError::Queue(QueueError::Held(held))),
                };
            }
            Err(e) => return Err(e.into()),
        };
        inner.held.lock().expect("held lock").insert(id, false);
        let submission_keyed = submission.idempotency_key.is_some();
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
            // The stream exists: with a key, a resend of this submission
            // recorded meanwhile through another node is a success.
            Ok(false) if submission_keyed => {
                match self
                    .existing_submission(id, &command, history.key.is_some())
                    .await
                {
                    Ok(Some(found)) => Ok(found),
                    Ok(None) => Err(RuntimeError::Superseded),
                    Err(e) => Err(e),
                }
            }
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
        // A submission found recorded by another node left `history`
        // empty: whoever claims the row reads the stream.
        let recorded_here = outcome.as_ref().is_ok_and(|s| !s.existing);
        let handed_over = match (handoff, slot) {
            (Some(handoff), Some(slot)) if recorded_here => {
                handoff.send((claim, Some(history), slot)).is_ok()
            }
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
        // What brought it to a person: the gate's escalation, or an
        // executor's escalation of a call whose outcome was lost.
        let answers = history
            .last_where(|e| {
                matches!(
                    e,
                    agentledger_domain::workflow::WorkflowEvent::GateDecided { .. }
                        | agentledger_domain::workflow::WorkflowEvent::SubtaskEscalated { .. }
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
}

fn person(actor: Actor) -> Recorder {
    Recorder {
        actor,
        policy: None,
    }
}
