//! Subscriptions: a workflow's progress and recorded events, catch-up then
//! live, confined to the caller's tenant.

use std::sync::Arc;
use std::time::Duration;

use agentledger_agents::stream_of;
use agentledger_eventstore::StreamId;
use agentledger_projections::model::audit::AuditEntry;
use agentledger_projections::model::status::StatusFold;
use agentledger_projections::model::Fact;
use agentledger_projections::ReadModels;
use async_graphql::{Context, Subscription, ID};
use futures::{Stream, StreamExt};

use super::error::{self, from_store};
use super::types::{AgentRole, AgentTaskSignal, Decisions, Position, RecordedEvent, Workflow};
use super::{may_see, parse_id, principal, services, tracked, visible_stream};

/// Waits (without polling) until the read models have applied `position`;
/// past `patience` the snapshot goes out anyway (the fold is the truth) and
/// the lag is logged.
async fn settle(models: &dyn ReadModels, position: u64, patience: Duration) {
    if let Err(e) = models.wait_for(position, patience).await {
        tracing::warn!(error = %e, "read models behind; sending the snapshot anyway");
    }
}

/// Events of a workflow `workflowProgress` reads before it goes live.
const PAST_LIMIT: usize = 100_000;

/// Subscriptions.
pub struct SubscriptionRoot;

/// The state of a followed workflow. Its decisions are one shared list:
/// every state taken from it (a replay step, a progress update) holds the
/// list and how much of it applies, never a copy of the earlier entries.
pub(super) struct Followed {
    pub(super) fold: Option<StatusFold>,
    decisions: Arc<Vec<AuditEntry>>,
    applied: usize,
}

impl Followed {
    /// A follower that will be shown `known` first, in order: their
    /// entries are made once, up front.
    pub(super) fn new(known: &[Fact]) -> Self {
        Self {
            fold: None,
            decisions: Arc::new(known.iter().map(AuditEntry::of).collect()),
            applied: 0,
        }
    }

    pub(super) fn apply(&mut self, fact: &Fact) {
        match &mut self.fold {
            Some(fold) => fold.apply(fact),
            None => self.fold = Some(StatusFold::start(fact)),
        }
        if self.applied == self.decisions.len() {
            // A live event: the states already sent are usually gone, so
            // this pushes in place.
            Arc::make_mut(&mut self.decisions).push(AuditEntry::of(fact));
        }
        self.applied += 1;
    }

    pub(super) fn snapshot(&self) -> Option<Workflow> {
        self.fold.as_ref().map(|f| Workflow {
            status: f.status().clone(),
            decisions: Some(Decisions::prefix(&self.decisions, self.applied)),
            pending: false,
        })
    }
}

/// Decodes a workflow's stored events.
pub(super) fn facts_of(
    events: &[agentledger_eventstore::RecordedEvent],
) -> async_graphql::Result<Vec<Fact>> {
    events
        .iter()
        .map(|event| {
            Fact::decode(event)
                .map_err(|e| error::internal(&e))?
                .ok_or_else(|| error::internal(&"not a workflow event"))
        })
        .collect()
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
        // Opened before the stream is read, so that the read leaves no gap
        // before the live feed and need not be made twice.
        let mut live = services.store.subscribe_stream(stream, 0);
        let past = visible_stream(ctx, id, PAST_LIMIT).await?;
        let facts = facts_of(&past)?;
        let mut followed = Followed::new(&facts);
        let mut first: Vec<async_graphql::Result<Workflow>> = Vec::new();
        for (event, fact) in past.iter().zip(&facts) {
            followed.apply(fact);
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
        // Only a complete read may stand in for the subscription's own.
        if past.len() < PAST_LIMIT {
            live.read_by_caller(past.len() as u64);
        }
        // The first snapshot, and the final one, are sent once the read
        // models have applied their event, so a client that reads the
        // workflow right after them (or after the subscription ended) sees
        // at least that state. The snapshots between go out at once: a
        // wait there would make the read models commit every event on its
        // own, and the snapshot itself is the state it shows.
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
                    if done {
                        settle(&*models, event.global_position, patience).await;
                    }
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
        let principal = principal(ctx)?.clone();
        let from = from_position.map(|p| p.0.max(1));
        let subscription = match workflow_id {
            Some(id) => {
                let id = parse_id(&id)?;
                // A client may follow a workflow before it exists (ids
                // derived from idempotency keys): then the tenant filter
                // below judges each event as it comes. One that exists in
                // another tenant is NOT_FOUND at once.
                let first = services
                    .store
                    .read_stream(&stream_of(id), 0, 1)
                    .await
                    .map_err(from_store)?;
                if first.first().is_some_and(|e| !may_see(&principal, e)) {
                    return Err(error::error(error::Code::NotFound, "no such workflow"));
                }
                services.store.subscribe_stream(stream_of(id), 0)
            }
            None => {
                let from = match from {
                    Some(from) => from,
                    None => services.store.head_position().await.map_err(from_store)? + 1,
                };
                services.store.subscribe_all(from)
            }
        };
        let from = from.unwrap_or(1);
        let events = subscription.into_stream().filter_map(move |event| {
            // Other tenants' events are dropped here, in the fan-out of
            // the one tailer's feed: no query per subscriber.
            let visible = event.as_ref().map_or(true, |e| may_see(&principal, e));
            async move {
                match event {
                    Ok(_) if !visible => None,
                    Ok(event) if event.global_position >= from => {
                        Some(Ok(RecordedEvent::of(&event)))
                    }
                    Ok(_) => None,
                    Err(e) => Some(Err(from_store(e))),
                }
            }
        });
        Ok(tracked(&services, events))
    }

    /// Signals that a task for an external agent, or a call of an external
    /// tool, may be waiting in the caller's tenant: once at once, then
    /// whenever this server hands one out, and every few seconds for work
    /// handed out by other servers. On each signal, call `claimAgentTask`
    /// (or `claimToolCall` for a signal with a `tool`) until it answers
    /// null. Without `role` and `tools`, for every role this server leaves
    /// to external agents; with `tools` alone, for those tools only.
    async fn agent_tasks(
        &self,
        ctx: &Context<'_>,
        role: Option<AgentRole>,
        #[graphql(desc = "External tools this worker serves (at most 64).")] tools: Option<
            Vec<String>,
        >,
    ) -> async_graphql::Result<impl Stream<Item = async_graphql::Result<AgentTaskSignal>>> {
        let services = services(ctx).clone();
        let runtime = services.runtime.clone();
        let roles: Vec<AgentRole> = match (role, &tools) {
            (Some(role), _) => vec![role],
            (None, Some(_)) => Vec::new(),
            (None, None) => [AgentRole::Analyst, AgentRole::Gatekeeper, AgentRole::Ethics]
                .into_iter()
                .filter(|r| runtime.serves_externally(r.to_projection()))
                .collect(),
        };
        if let Some(builtin) = roles
            .iter()
            .find(|r| !runtime.serves_externally(r.to_projection()))
        {
            return Err(error::bad_input(format!(
                "the {} role is served by the built-in agent on this server",
                builtin.to_projection().as_str()
            )));
        }
        if roles.is_empty() && tools.as_ref().is_some_and(Vec::is_empty) {
            return Err(error::bad_input(
                "name a role or at least one tool to wait for".to_string(),
            ));
        }
        let tenant = principal(ctx)?.tenant.clone();
        let tools = tools.unwrap_or_default();
        let served = runtime.external_tools();
        if tools.len() > agentledger_agents::MAX_CLAIM_TOOLS {
            return Err(error::bad_input(format!(
                "name at most {} tools",
                agentledger_agents::MAX_CLAIM_TOOLS
            )));
        }
        if let Some(unknown) = tools.iter().find(|t| !served.contains(&t.as_str())) {
            return Err(error::bad_input(format!(
                "{unknown:?} is not a tool served by external workers here"
            )));
        }
        let every: Vec<AgentTaskSignal> = roles
            .iter()
            .map(|&role| AgentTaskSignal { role, tool: None })
            .chain(tools.iter().map(|t| AgentTaskSignal {
                role: AgentRole::Executor,
                tool: Some(t.clone()),
            }))
            .collect();
        let signals = (runtime.agent_task_signals(), runtime.tool_call_signals());
        // First everything at once (work may be waiting), then each as it comes.
        let first = every.clone();
        let stream = futures::stream::unfold(
            (signals, first),
            move |((mut roles_heard, mut tools_heard), mut pending)| {
                let every = every.clone();
                let tenant = tenant.clone();
                async move {
                    use tokio::sync::broadcast::error::RecvError;
                    while pending.is_empty() {
                        tokio::select! {
                            signal = roles_heard.recv() => match signal {
                                Ok(r) => pending.extend(
                                    every.iter().filter(|s| s.tool.is_none() && s.role.to_projection() == r).cloned(),
                                ),
                                Err(RecvError::Lagged(_)) => pending.extend(every.iter().cloned()),
                                Err(RecvError::Closed) => return None,
                            },
                            signal = tools_heard.recv() => match signal {
                                // Another tenant's call is not this worker's news.
                                Ok((t, tool)) if t == tenant => pending.extend(
                                    every.iter().filter(|s| s.tool.as_ref() == Some(&tool)).cloned(),
                                ),
                                Ok(_) => {}
                                Err(RecvError::Lagged(_)) => pending.extend(every.iter().cloned()),
                                Err(RecvError::Closed) => return None,
                            },
                            () = tokio::time::sleep(TASK_SIGNAL_TICK) => pending.extend(every.iter().cloned()),
                        }
                    }
                    let signal = pending.remove(0);
                    // One signal per kind of work is enough until it is claimed.
                    pending.retain(|s| *s != signal);
                    Some((Ok(signal), ((roles_heard, tools_heard), pending)))
                }
            },
        );
        Ok(tracked(&services, stream))
    }
}

/// How often `agentTasks` signals without news: tasks handed out by other
/// servers are found then.
const TASK_SIGNAL_TICK: Duration = Duration::from_secs(5);
