//! The read models in memory (the embedded dev mode): the same pure model
//! functions as PostgreSQL, applied by one task that follows `$all`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use agentledger_domain::workflow::WorkflowState;
use agentledger_eventstore::EventStore;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::model::audit::AuditEntry;
use crate::model::metrics::{AgentMetrics, MetricsBatch, Timeline};
use crate::model::status::{StatusFold, WorkflowStatus};
use crate::model::Fact;
use crate::query::{wait_all, AuditFilter, ReadError, ReadModels, WorkflowCursor, PROJECTIONS};

#[derive(Default)]
struct State {
    folds: HashMap<Uuid, StatusFold>,
    timelines: HashMap<Uuid, Timeline>,
    audit: BTreeMap<u64, AuditEntry>,
    metrics: BTreeMap<(String, String, DateTime<Utc>), AgentMetrics>,
    position: u64,
}

/// Read models kept in memory, fed by a task following the store.
pub struct InMemoryReadModels {
    state: Arc<RwLock<State>>,
    position: watch::Receiver<u64>,
    stop: CancellationToken,
}

impl Drop for InMemoryReadModels {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl InMemoryReadModels {
    /// Starts following `store` from its first event.
    pub fn start(store: Arc<dyn EventStore>) -> Self {
        let state: Arc<RwLock<State>> = Arc::default();
        let (tx, rx) = watch::channel(0);
        let stop = CancellationToken::new();
        let task_state = state.clone();
        let task_stop = stop.clone();
        tokio::spawn(async move {
            let mut events = store.subscribe_all(1);
            loop {
                let next = tokio::select! {
                    next = events.next() => next,
                    () = task_stop.cancelled() => return,
                };
                let event = match next {
                    Some(Ok(event)) => event,
                    Some(Err(e)) => {
                        tracing::error!(error = %e, "in-memory read models stopped following the store");
                        return;
                    }
                    None => return,
                };
                let position = event.global_position;
                match Fact::decode(&event) {
                    Ok(Some(fact)) => {
                        apply(&mut task_state.write().expect("read model lock"), &fact)
                    }
                    Ok(None) => {}
                    Err(e) => tracing::error!(error = %e, "skipping an unreadable event"),
                }
                task_state.write().expect("read model lock").position = position;
                tx.send_replace(position);
            }
        });
        Self {
            state,
            position: rx,
            stop,
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().expect("read model lock")
    }
}

fn apply(state: &mut State, fact: &Fact) {
    match state.folds.get_mut(&fact.workflow) {
        Some(fold) => fold.apply(fact),
        None => {
            state.folds.insert(fact.workflow, StatusFold::start(fact));
        }
    }
    state
        .audit
        .insert(fact.recorded.global_position, AuditEntry::of(fact));
    let mut batch = MetricsBatch::default();
    state
        .timelines
        .entry(fact.workflow)
        .or_default()
        .count(fact, &mut batch);
    for (key, row) in batch.rows {
        match state.metrics.get_mut(&key) {
            Some(existing) => existing.merge(&row),
            None => {
                state.metrics.insert(key, row);
            }
        }
    }
}

#[async_trait]
impl ReadModels for InMemoryReadModels {
    async fn workflow(&self, id: Uuid) -> Result<Option<WorkflowStatus>, ReadError> {
        Ok(self.read().folds.get(&id).map(|f| f.status().clone()))
    }

    async fn workflows(
        &self,
        tenant: Option<&str>,
        state: Option<WorkflowState>,
        after: Option<WorkflowCursor>,
        limit: usize,
    ) -> Result<Vec<WorkflowStatus>, ReadError> {
        let read = self.read();
        let mut all: Vec<&WorkflowStatus> = read
            .folds
            .values()
            .map(|f| f.status())
            .filter(|s| tenant.is_none_or(|t| s.tenant == t))
            .filter(|s| state.is_none_or(|wanted| s.state == wanted))
            .filter(|s| after.is_none_or(|c| (s.created_at, s.id) < (c.created_at, c.id)))
            .collect();
        all.sort_by_key(|s| std::cmp::Reverse((s.created_at, s.id)));
        Ok(all.into_iter().take(limit).cloned().collect())
    }

    async fn audit_trail(
        &self,
        filter: &AuditFilter,
        limit: usize,
    ) -> Result<Vec<AuditEntry>, ReadError> {
        let read = self.read();
        let from = filter.after.map_or(0, |a| a + 1);
        Ok(read
            .audit
            .range(from..)
            .map(|(_, e)| e)
            .filter(|e| filter.admits(e))
            .take(limit)
            .cloned()
            .collect())
    }

    async fn agent_metrics(
        &self,
        tenant: Option<&str>,
        from: Option<DateTime<Utc>>,
        to: Option<DateTime<Utc>>,
    ) -> Result<Vec<AgentMetrics>, ReadError> {
        let mut rows: Vec<AgentMetrics> = self
            .read()
            .metrics
            .values()
            .filter(|m| tenant.is_none_or(|t| m.tenant == t))
            .filter(|m| from.is_none_or(|f| m.bucket >= f) && to.is_none_or(|t| m.bucket < t))
            .cloned()
            .collect();
        rows.sort_by(|a, b| (&a.agent, a.bucket, &a.tenant).cmp(&(&b.agent, b.bucket, &b.tenant)));
        Ok(rows)
    }

    async fn count_by_state(
        &self,
        tenant: Option<&str>,
    ) -> Result<Vec<(WorkflowState, u64)>, ReadError> {
        let mut counts: HashMap<WorkflowState, u64> = HashMap::new();
        for fold in self.read().folds.values() {
            let status = fold.status();
            if tenant.is_some_and(|t| status.tenant != t) {
                continue;
            }
            *counts.entry(status.state).or_default() += 1;
        }
        Ok(counts.into_iter().collect())
    }

    async fn audit_of(&self, workflows: &[Uuid]) -> Result<Vec<AuditEntry>, ReadError> {
        let wanted: std::collections::HashSet<&Uuid> = workflows.iter().collect();
        Ok(self
            .read()
            .audit
            .values()
            .filter(|e| wanted.contains(&e.workflow_id))
            .cloned()
            .collect())
    }

    async fn checkpoints(&self) -> Result<Vec<(String, u64)>, ReadError> {
        let position = self.read().position;
        Ok(PROJECTIONS
            .iter()
            .map(|p| (p.to_string(), position))
            .collect())
    }

    async fn wait_for(&self, position: u64, limit: std::time::Duration) -> Result<(), ReadError> {
        wait_all(std::slice::from_ref(&self.position), position, limit).await
    }
}
