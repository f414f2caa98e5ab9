//! Mutations: commands, each recorded with the authenticated caller as its
//! actor and the caller's tenant on the workflow.

use agentledger_agents::{HumanDecision, Submission};
use async_graphql::{Context, Object, ID};
use uuid::Uuid;

use agentledger_agents::stream_of;
use agentledger_projections::model::Fact;

use super::error::{self, from_runtime, from_store, Code};
use super::types::{
    AgentPolicyInput, AgentRole, AgentTask, ForgetResult, Position, Priority, ToolCall, Workflow,
};
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

    /// Claims the next task of `role` in the caller's tenant for worker
    /// `workerId` (highest priority first) under a lease of `leaseSeconds`
    /// (default 60, at most 600); null when none waits. Role `agent`.
    async fn claim_agent_task(
        &self,
        ctx: &Context<'_>,
        role: AgentRole,
        worker_id: String,
        lease_seconds: Option<i32>,
    ) -> async_graphql::Result<Option<AgentTask>> {
        let principal = principal(ctx)?;
        let lease = lease(lease_seconds)?;
        let task = services(ctx)
            .runtime
            .claim_agent_task(
                role.to_projection(),
                &worker(principal, Some(worker_id), None),
                lease,
            )
            .await
            .map_err(from_runtime)?;
        Ok(task.map(AgentTask::of))
    }

    /// Extends the caller's lease on a task by `leaseSeconds` from now;
    /// returns when it now ends. A lease that ran out is a `CONFLICT`.
    async fn renew_agent_task(
        &self,
        ctx: &Context<'_>,
        task_id: ID,
        worker_id: String,
        lease_seconds: Option<i32>,
    ) -> async_graphql::Result<chrono::DateTime<chrono::Utc>> {
        let principal = principal(ctx)?;
        let lease = lease(lease_seconds)?;
        services(ctx)
            .runtime
            .renew_agent_task(
                parse_task(&task_id)?,
                &worker(principal, Some(worker_id), None),
                lease,
            )
            .await
            .map_err(from_runtime)
    }

    /// Gives a task back (this worker cannot decide it): another worker may
    /// claim it after a pause that grows with its attempts.
    async fn fail_agent_task(
        &self,
        ctx: &Context<'_>,
        task_id: ID,
        worker_id: String,
        error: String,
    ) -> async_graphql::Result<bool> {
        let principal = principal(ctx)?;
        services(ctx)
            .runtime
            .fail_agent_task(
                parse_task(&task_id)?,
                &worker(principal, Some(worker_id), None),
                &error,
            )
            .await
            .map_err(from_runtime)?;
        Ok(true)
    }

    /// Records an external agent's decision on a task it holds, with the
    /// worker as its actor (its id, the version it declares, the caller's
    /// credential) and the policy it declares. The decision must match the
    /// role's schema (`agentDecisionSchema`): otherwise `BAD_INPUT` with
    /// `path` and `schemaPath` in the error's extensions. A lease that ran
    /// out, a task another worker holds or decided, or a different decision
    /// for a task already decided is a `CONFLICT`; the same decision sent
    /// again is stored once. Nothing is written on any error.
    async fn submit_agent_decision(
        &self,
        ctx: &Context<'_>,
        task_id: ID,
        decision: async_graphql::Json<serde_json::Value>,
        #[graphql(desc = "The worker that claimed the task; the lease's when absent.")]
        worker_id: Option<String>,
        #[graphql(desc = "The worker's version, recorded with its decision.")]
        worker_version: Option<String>,
        policy: Option<AgentPolicyInput>,
    ) -> async_graphql::Result<Workflow> {
        let services = services(ctx);
        let principal = principal(ctx)?;
        let task = parse_task(&task_id)?;
        let policy = policy.unwrap_or_default();
        let position = services
            .runtime
            .submit_agent_decision(
                task,
                &worker(principal, worker_id, worker_version),
                &decision.0,
                agentledger_agents::DeclaredPolicy {
                    name: policy.name,
                    version: policy.version,
                    fingerprint: policy.fingerprint,
                },
            )
            .await
            .map_err(from_runtime)?;
        Self::after_write(services, task.workflow, position).await
    }

    /// Claims for worker `workerId` the oldest call of one of `tools`
    /// (external tools, `[[tools.external]]`) in the caller's tenant, under
    /// a lease of `leaseSeconds` (default 60, at most 600); null when none
    /// waits. Role `agent`.
    async fn claim_tool_call(
        &self,
        ctx: &Context<'_>,
        tools: Vec<String>,
        worker_id: String,
        lease_seconds: Option<i32>,
    ) -> async_graphql::Result<Option<ToolCall>> {
        let principal = principal(ctx)?;
        let lease = lease(lease_seconds)?;
        let call = services(ctx)
            .runtime
            .claim_tool_call(&tools, &worker(principal, Some(worker_id), None), lease)
            .await
            .map_err(from_runtime)?;
        Ok(call.map(ToolCall::of))
    }

    /// Answers a call the caller's worker holds: exactly one of `output`
    /// (the tool's result) or `error` (the executor retries, as after a
    /// built-in tool's error). True when stored; the executor records it.
    /// After the lease or the deadline ran out, or after another answer,
    /// `CONFLICT` with nothing stored; the same answer sent again is true.
    async fn complete_tool_call(
        &self,
        ctx: &Context<'_>,
        call_id: ID,
        output: Option<String>,
        error: Option<String>,
        #[graphql(desc = "The worker that claimed the call; the lease's when absent.")]
        worker_id: Option<String>,
    ) -> async_graphql::Result<bool> {
        let principal = principal(ctx)?;
        let id = uuid::Uuid::parse_str(&call_id)
            .map_err(|_| error::bad_input(format!("{:?} is not a call id", call_id.as_str())))?;
        let answer = match (output, error) {
            (Some(output), None) => agentledger_agents::CallAnswer::Output(output),
            (None, Some(error)) => agentledger_agents::CallAnswer::Error(error),
            _ => {
                return Err(error::bad_input(
                    "give exactly one of output and error".to_string(),
                ))
            }
        };
        services(ctx)
            .runtime
            .answer_tool_call(id, &worker(principal, worker_id, None), answer)
            .await
            .map_err(from_runtime)?;
        Ok(true)
    }
}

/// The worker `worker_id` (empty: the one named by the lease) of the
/// calling credential, at `version`.
fn worker(
    principal: &crate::auth::Principal,
    worker_id: Option<String>,
    version: Option<String>,
) -> agentledger_agents::Worker {
    agentledger_agents::Worker {
        id: worker_id.unwrap_or_default(),
        version: version.unwrap_or_default(),
        subject: principal.subject.clone(),
        method: principal.method.as_str().into(),
        tenant: principal.tenant.clone(),
    }
}

fn lease(seconds: Option<i32>) -> async_graphql::Result<std::time::Duration> {
    match seconds {
        None => Ok(agentledger_agents::runtime::DEFAULT_TASK_LEASE),
        Some(s)
            if (1..=agentledger_agents::runtime::MAX_TASK_LEASE.as_secs() as i32).contains(&s) =>
        {
            Ok(std::time::Duration::from_secs(s as u64))
        }
        Some(_) => Err(error::bad_input(format!(
            "leaseSeconds must be between 1 and {}",
            agentledger_agents::runtime::MAX_TASK_LEASE.as_secs()
        ))),
    }
}

fn parse_task(id: &ID) -> async_graphql::Result<agentledger_agents::TaskId> {
    id.parse::<agentledger_agents::TaskId>()
        .map_err(|e| error::bad_input(e.to_string()))
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
