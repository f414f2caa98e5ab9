//! Mutations: commands, each recorded with the authenticated caller as its
//! actor and the caller's tenant on the workflow.

use agentledger_agents::{HumanDecision, Submission};
use async_graphql::{Context, Object, ID};
use uuid::Uuid;

use agentledger_agents::stream_of;
use agentledger_projections::model::Fact;

use super::error::{self, from_runtime, from_store, Code};
use super::types::{ForgetResult, Position, Priority, Workflow};
use super::{parse_id, principal, services, Followed, Services};
use crate::auth::Role;

/// Mutations: commands. Each returns the workflow as of its own write.
pub struct Mutation;

impl Mutation {
    /// The workflow as of the write at `position`: from the read models once
    /// they applied it. A committed write is never reported as a failure:
    /// when they lag past the wait (or cannot be read), the state is folded
    /// from the recorded events and flagged `pending`.
    async fn after_write(
        services: &Services,
        id: Uuid,
        position: u64,
    ) -> async_graphql::Result<Workflow> {
        let applied = services
            .read_models
            .wait_for(position, services.limits.read_your_writes)
            .await;
        let read = match applied {
            Ok(()) => services.read_models.workflow(id).await,
            Err(e) => Err(e),
        };
        match read {
            Ok(Some(status)) => return Ok(Workflow::of(status)),
            Ok(None) => tracing::warn!(%id, position, "applied but not in the read models"),
            Err(e) => {
                tracing::warn!(%id, position, error = %e, "read models behind a committed write")
            }
        }
        let events = services
            .store
            .read_stream(&stream_of(id), 0, 100_000)
            .await
            .map_err(from_store)?;
        let mut facts = Vec::with_capacity(events.len());
        for event in &events {
            facts.extend(Fact::decode(event).map_err(|e| error::internal(&e))?);
        }
        let mut followed = Followed::new(&facts);
        for fact in &facts {
            followed.apply(fact);
        }
        let mut workflow = followed
            .snapshot()
            .ok_or_else(|| error::error(Code::Internal, "the written workflow has no events"))?;
        workflow.pending = true;
        Ok(workflow)
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
        let principal = principal(ctx)?;
        let priority = priority.map_or(Default::default(), Priority::to_domain);
        // Jumping the queue is an operator's call.
        if priority == agentledger_domain::workflow::Priority::Critical
            && !(principal.roles.has(Role::Operator) || principal.roles.has(Role::Admin))
        {
            return Err(error::error(
                Code::Forbidden,
                "priority CRITICAL needs the operator or admin role",
            ));
        }
        let submitted = services
            .runtime
            .submit_recorded(Submission {
                workflow_id: None,
                request,
                input,
                priority,
                owner: Some(principal.subject.clone()),
                actor: Some(principal.actor()),
                tenant: Some(principal.tenant.clone()),
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
    /// Admin only.
    async fn forget_subject(
        &self,
        ctx: &Context<'_>,
        subject_id: String,
    ) -> async_graphql::Result<ForgetResult> {
        let principal = principal(ctx)?;
        let forgotten = services(ctx)
            .runtime
            .forget_subject(&principal.tenant, &subject_id, &principal.actor())
            .await
            .map_err(from_runtime)?;
        Ok(ForgetResult {
            subject_id,
            destroyed: forgotten.key_id.is_some(),
            key_id: forgotten.key_id.map(|k| ID(k.to_string())),
            vacuumed: forgotten.vacuumed,
        })
    }

    /// Cancels a workflow that has not ended: a submitter its own, an
    /// operator any of its tenant's.
    async fn cancel_workflow(
        &self,
        ctx: &Context<'_>,
        id: ID,
        reason: Option<String>,
    ) -> async_graphql::Result<Workflow> {
        let services = services(ctx);
        let principal = principal(ctx)?;
        let id = parse_id(&id)?;
        let owner = owner_in_tenant(ctx, id).await?;
        let any = principal.roles.has(Role::Operator) || principal.roles.has(Role::Admin);
        if !any && owner != principal.subject {
            return Err(error::error(
                Code::Forbidden,
                "a submitter cancels only its own workflows; this one is another's",
            ));
        }
        let position = services
            .runtime
            .cancel(id, reason, &principal.actor())
            .await
            .map_err(from_runtime)?;
        Self::after_write(services, id, position).await
    }

    /// A person's decision on an escalated workflow, recorded with the
    /// caller as its actor and naming the gate decision it answers. The
    /// workflow's submitter may not decide it (four eyes) unless the server
    /// allows self-approval. With `expectedPosition` (the workflow's
    /// `lastPosition` as the person saw it), a workflow that has moved on
    /// is a `CONFLICT` and nothing is written.
    async fn decide_escalation(
        &self,
        ctx: &Context<'_>,
        id: ID,
        approve: bool,
        comment: String,
        expected_position: Option<Position>,
    ) -> async_graphql::Result<Workflow> {
        let services = services(ctx);
        let principal = principal(ctx)?;
        let id = parse_id(&id)?;
        owner_in_tenant(ctx, id).await?;
        let decision = HumanDecision {
            approve,
            comment,
            by: principal.actor(),
            expected_position: expected_position.map(|p| p.0),
            allow_self: services.auth.config().allow_self_approval,
        };
        let position = services
            .runtime
            .decide_escalation(id, decision)
            .await
            .map_err(from_runtime)?;
        Self::after_write(services, id, position).await
    }
}

/// The owner of workflow `id` when it is in the caller's tenant; else
/// `NOT_FOUND`, as for a workflow that does not exist.
async fn owner_in_tenant(ctx: &Context<'_>, id: Uuid) -> async_graphql::Result<String> {
    let first = super::visible_stream(ctx, id, 1).await?;
    Ok(first[0]
        .metadata
        .get("owner")
        .and_then(|o| o.as_str())
        .unwrap_or_default()
        .to_string())
}
