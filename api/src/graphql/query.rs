//! Queries: reads of the read models and of the event store, each confined
//! to the caller's tenant.

use agentledger_agents::stream_of;
use agentledger_projections::model::audit::AuditEntry;
use async_graphql::connection::{Connection, Edge, EmptyFields};
use async_graphql::{Context, Object, ID};
use chrono::{DateTime, Utc};

use super::budget;
use super::error::{self, bad_input, from_read, from_store, Code};
use super::types::{
    self, AgentMetrics, AgentRole, ConsistencyProof, InclusionProof, LedgerKey, Me, Position,
    ProjectionLag, RecordedEvent, ReplayStep, SignedDigest, Verification, Workflow, WorkflowCount,
    WorkflowState,
};
use super::{
    decode_cursor, encode_cursor, facts_of, may_see, page_size, parse_id, principal, services,
    visible_stream, Followed,
};

/// Queries.
pub struct Query;

#[Object]
impl Query {
    /// Who is calling: the principal this request authenticated as.
    async fn me(&self, ctx: &Context<'_>) -> async_graphql::Result<Me> {
        Ok(Me::of(principal(ctx)?))
    }

    /// One workflow, from the read models; null when there is none in the
    /// caller's tenant.
    async fn workflow(&self, ctx: &Context<'_>, id: ID) -> async_graphql::Result<Option<Workflow>> {
        let id = parse_id(&id)?;
        let tenant = &principal(ctx)?.tenant;
        let status = services(ctx)
            .read_models
            .workflow(id)
            .await
            .map_err(from_read)?;
        Ok(status.filter(|s| &s.tenant == tenant).map(Workflow::of))
    }

    /// Workflows, newest first, optionally in one state; a cursor connection.
    #[graphql(complexity = "first.unwrap_or(20).max(0) as usize * child_complexity")]
    async fn workflows(
        &self,
        ctx: &Context<'_>,
        state: Option<WorkflowState>,
        first: Option<i32>,
        after: Option<String>,
    ) -> async_graphql::Result<Connection<String, Workflow, EmptyFields, EmptyFields>> {
        let services = services(ctx);
        let tenant = &principal(ctx)?.tenant;
        let size = page_size(first, &services.limits)?;
        let cursor = after.as_deref().map(decode_cursor).transpose()?;
        let mut page = services
            .read_models
            .workflows(
                Some(tenant),
                state.map(WorkflowState::to_domain),
                cursor,
                size + 1,
            )
            .await
            .map_err(from_read)?;
        let has_next = page.len() > size;
        page.truncate(size);
        let mut connection = Connection::new(cursor.is_some(), has_next);
        connection.edges.extend(
            page.into_iter()
                .map(|status| Edge::new(encode_cursor(&status), Workflow::of(status))),
        );
        Ok(connection)
    }

    /// How many of the caller's tenant's workflows are in each state, every
    /// state listed (zeros too), from the read models.
    async fn workflow_counts(
        &self,
        ctx: &Context<'_>,
    ) -> async_graphql::Result<Vec<WorkflowCount>> {
        let tenant = &principal(ctx)?.tenant;
        let counts = services(ctx)
            .read_models
            .count_by_state(Some(tenant))
            .await
            .map_err(from_read)?;
        let mut all: Vec<WorkflowCount> = WorkflowState::ALL
            .into_iter()
            .map(|state| WorkflowCount { state, count: 0 })
            .collect();
        for (state, n) in counts {
            let state = WorkflowState::from_domain(state);
            if let Some(entry) = all.iter_mut().find(|c| c.state == state) {
                entry.count += i64::try_from(n).unwrap_or(i64::MAX);
            }
        }
        Ok(all)
    }

    /// How many events each projection has still to apply. Counts over the
    /// whole ledger (every tenant's events), never their content.
    async fn projection_lag(&self, ctx: &Context<'_>) -> async_graphql::Result<Vec<ProjectionLag>> {
        let services = services(ctx);
        let lags = agentledger_projections::lag(&*services.read_models, &*services.store)
            .await
            .map_err(from_read)?;
        Ok(lags
            .into_iter()
            .map(|(projection, behind)| ProjectionLag {
                projection,
                behind_events: Position(behind),
            })
            .collect())
    }

    /// Recorded events from the store: of one workflow or of all, from a
    /// position (inclusive).
    #[graphql(complexity = "first.unwrap_or(20).max(0) as usize * child_complexity")]
    async fn events(
        &self,
        ctx: &Context<'_>,
        workflow_id: Option<ID>,
        from_position: Option<Position>,
        first: Option<i32>,
    ) -> async_graphql::Result<Vec<RecordedEvent>> {
        let services = services(ctx);
        let principal = principal(ctx)?;
        let size = page_size(first, &services.limits)?;
        let from = from_position.map_or(1, |p| p.0.max(1));
        let events = match workflow_id {
            Some(id) => {
                let mut all = visible_stream(ctx, parse_id(&id)?, 10_000).await?;
                all.retain(|e| e.global_position >= from);
                all.truncate(size);
                all
            }
            None => {
                // Other tenants' events are skipped; reading stops after a
                // bounded number of pages, so that a tenant with few events
                // in a busy ledger gets a short page rather than a long wait
                // (resume from the last position it got, plus one).
                const MAX_PAGES: usize = 20;
                let mut found = Vec::new();
                let mut next = from;
                for _ in 0..MAX_PAGES {
                    let page = services
                        .store
                        .read_all(next, size.max(1))
                        .await
                        .map_err(from_store)?;
                    let Some(last) = page.last() else { break };
                    next = last.global_position + 1;
                    let full = page.len() == size.max(1);
                    found.extend(page.into_iter().filter(|e| may_see(principal, e)));
                    if found.len() >= size || !full {
                        break;
                    }
                }
                found.truncate(size);
                found
            }
        };
        Ok(events.iter().map(RecordedEvent::of).collect())
    }

    /// The audit trail, in position order: every recorded event in a
    /// reviewer's words, filtered by workflow, actor, role, kind and time
    /// range (`from` inclusive, `to` exclusive); a cursor connection.
    #[allow(clippy::too_many_arguments)]
    #[graphql(complexity = "100 + first.unwrap_or(20).max(0) as usize * child_complexity")]
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
            tenant: Some(principal(ctx)?.tenant.clone()),
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
        // Each entry's short fields, its rationale aside (charged when asked for).
        budget::charge(
            ctx,
            page.iter()
                .map(|e| e.summary.len() + e.actor.len() + e.actor_version.len() + 300)
                .sum(),
        )?;
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
    #[graphql(complexity = 100)]
    async fn replay(
        &self,
        ctx: &Context<'_>,
        workflow_id: ID,
        at_position: Option<Position>,
    ) -> async_graphql::Result<Vec<ReplayStep>> {
        let mut events = visible_stream(ctx, parse_id(&workflow_id)?, 100_000).await?;
        if let Some(at) = at_position {
            events.retain(|e| e.global_position <= at.0);
        }
        let facts = facts_of(&events)?;
        let mut followed = Followed::new(&facts);
        let mut steps = Vec::with_capacity(events.len());
        for (event, fact) in events.iter().zip(&facts) {
            followed.apply(fact);
            let entry = AuditEntry::of(fact);
            // The step's own short fields; its event's documents, its state
            // and its rationale are charged as they are resolved.
            budget::charge(
                ctx,
                entry.summary.len() + entry.actor.len() + 24 * fact.metadata.inputs.len() + 300,
            )?;
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
    #[graphql(complexity = 100)]
    async fn verify_workflow(
        &self,
        ctx: &Context<'_>,
        id: ID,
    ) -> async_graphql::Result<Verification> {
        let id = parse_id(&id)?;
        // The caller's tenant's workflow, or NOT_FOUND.
        visible_stream(ctx, id, 1).await?;
        let stream = stream_of(id);
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

    /// A receipt of the workflow: its events as stored, each with its
    /// inclusion proof in the ledger's tree, and a checkpoint of that tree
    /// signed now (format `agentledger-receipt-1`). Save it as a file:
    /// `agentledger verify --receipt FILE --public-key VERIFIER_KEY` checks
    /// it with no database. Sealed personal text stays sealed in it.
    #[graphql(complexity = 100)]
    async fn workflow_receipt(
        &self,
        ctx: &Context<'_>,
        id: ID,
    ) -> async_graphql::Result<async_graphql::Json<serde_json::Value>> {
        let id = parse_id(&id)?;
        // The caller's tenant's workflow, or NOT_FOUND.
        visible_stream(ctx, id, 1).await?;
        let services = services(ctx);
        // A proof per event: one receipt at a time per process.
        let _turn = services
            .ledger_work
            .acquire()
            .await
            .map_err(|e| error::internal(&e))?;
        let receipt = agentledger_eventstore::receipt::build(
            &*services.store,
            &*services.transparency.tree,
            &*services.ledger_keys,
            &services.transparency.origin,
            &stream_of(id),
        )
        .await
        .map_err(from_store)?;
        Ok(async_graphql::Json(
            serde_json::to_value(receipt).map_err(|e| error::internal(&e))?,
        ))
    }

    /// Recomputes every stream's hash chain, reading the ledger in pages.
    /// It returns hashes and counts only, never another tenant's content;
    /// one runs at a time per process (others wait their turn).
    #[graphql(complexity = 500)]
    async fn verify_ledger(&self, ctx: &Context<'_>) -> async_graphql::Result<Verification> {
        let services = services(ctx);
        let _turn = services
            .ledger_work
            .acquire()
            .await
            .map_err(|e| error::internal(&e))?;
        let verification = agentledger_eventstore::verify_ledger(&*services.store, |_, _| {})
            .await
            .map_err(from_store)?;
        Ok(Verification::of(verification))
    }

    /// The ledger's tree head at `atPosition` (default: the head), signed
    /// with the deployment's Ed25519 key. Every chain up to the position is
    /// recomputed first: a ledger that does not verify is not signed.
    /// Keep the result outside the system; `agentledger verify --digest`
    /// proves later that nothing up to the position changed.
    #[graphql(complexity = 500)]
    async fn ledger_digest(
        &self,
        ctx: &Context<'_>,
        at_position: Option<Position>,
    ) -> async_graphql::Result<SignedDigest> {
        let services = services(ctx);
        let _turn = services
            .ledger_work
            .acquire()
            .await
            .map_err(|e| error::internal(&e))?;
        let digest = agentledger_eventstore::signing::sign_ledger(
            &*services.store,
            &*services.ledger_keys,
            at_position.map(|p| p.0),
        )
        .await
        .map_err(from_store)?;
        Ok(SignedDigest::of(digest))
    }

    /// The JSON Schema an external agent's decision for `role` must match
    /// (`submitAgentDecision`). The ANALYST's names this server's tools.
    async fn agent_decision_schema(
        &self,
        ctx: &Context<'_>,
        role: AgentRole,
    ) -> async_graphql::Result<async_graphql::Json<serde_json::Value>> {
        services(ctx)
            .runtime
            .agent_decision_schema(role.to_projection())
            .cloned()
            .map(async_graphql::Json)
            .ok_or_else(|| {
                bad_input("the EXECUTOR role takes no decisions; its tools are pluggable")
            })
    }

    /// The deployment's digest signing keys (public halves): the active key
    /// first, then retired ones, which still verify what they signed. Also
    /// served at `GET /.well-known/agentledger-key`.
    async fn ledger_keys(&self, ctx: &Context<'_>) -> async_graphql::Result<Vec<LedgerKey>> {
        let services = services(ctx);
        let keys = services
            .ledger_keys
            .public_keys()
            .await
            .map_err(from_store)?;
        let origin = &services.transparency.origin;
        Ok(keys.into_iter().map(|k| LedgerKey::of(k, origin)).collect())
    }

    /// The audit path of the event at `position` in the ledger's tree of
    /// `treeSize` leaves (RFC 9162 §2.1.3): with the leaf hash, it leads to
    /// the root of a checkpoint or signed digest of that size. The tree
    /// grows a moment after each commit; a position it does not cover yet
    /// is `BAD_INPUT`.
    #[graphql(complexity = 50)]
    async fn inclusion_proof(
        &self,
        ctx: &Context<'_>,
        position: Position,
        tree_size: Position,
    ) -> async_graphql::Result<InclusionProof> {
        use agentledger_eventstore::tlog;
        let services = services(ctx);
        let tree = &services.transparency.tree;
        let index = tree
            .leaf_index(position.0)
            .await
            .map_err(from_store)?
            .ok_or_else(|| {
                bad_input(format!(
                    "the ledger's tree has no event at position {} (no event took it, or the \
                     tree does not reach it yet)",
                    position.0
                ))
            })?;
        let event = services
            .store
            .read_all(position.0, 1)
            .await
            .map_err(from_store)?
            .into_iter()
            .find(|e| e.global_position == position.0)
            .ok_or_else(|| bad_input(format!("no event at position {}", position.0)))?;
        let hashes = tlog::inclusion_proof(&**tree, index, tree_size.0)
            .await
            .map_err(from_store)?;
        Ok(InclusionProof {
            leaf_index: Position(index),
            tree_size,
            leaf_hash: hex::encode(agentledger_eventstore::digest::leaf(
                position.0,
                &event.hash,
            )),
            hashes: hashes.iter().map(hex::encode).collect(),
        })
    }

    /// The proof that the ledger's tree of `fromSize` leaves is a prefix of
    /// its tree of `toSize` leaves (RFC 9162 §2.1.4): nothing a checkpoint
    /// of the smaller size covered was changed or removed since.
    #[graphql(complexity = 50)]
    async fn consistency_proof(
        &self,
        ctx: &Context<'_>,
        from_size: Position,
        to_size: Position,
    ) -> async_graphql::Result<ConsistencyProof> {
        let tree = &services(ctx).transparency.tree;
        let hashes =
            agentledger_eventstore::tlog::consistency_proof(&**tree, from_size.0, to_size.0)
                .await
                .map_err(from_store)?;
        Ok(ConsistencyProof {
            from_size,
            to_size,
            hashes: hashes.iter().map(hex::encode).collect(),
        })
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
            .agent_metrics(Some(&principal(ctx)?.tenant), from, to)
            .await
            .map_err(from_read)?;
        Ok(AgentMetrics::per_agent(rows))
    }
}
