//! The claim loop: claims workflows from the queue as slots free up,
//! drives each in its own task, renews the leases it holds, re-queues
//! workflows that lost their row, and wakes on work recorded elsewhere.

use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio::task::JoinSet;
use uuid::Uuid;

use super::{drive, History, Inner, Runtime, RuntimeError, STREAM_PREFIX};
use crate::queue::Claim;

impl Runtime {
    /// Queues every workflow of the ledger that waits for an agent: what a
    /// queue kept in memory needs after a restart over a kept ledger
    /// (`serve --data-dir`). Reads the whole ledger once; returns how many
    /// were queued.
    pub async fn resume_unfinished(&self) -> Result<usize, RuntimeError> {
        const PAGE: usize = 1_000;
        let mut seen = std::collections::HashSet::new();
        let mut order = Vec::new();
        let mut from = 1;
        loop {
            let page = self.inner.store.read_all(from, PAGE).await?;
            for event in &page {
                let id = event
                    .stream_id
                    .as_str()
                    .strip_prefix(STREAM_PREFIX)
                    .and_then(|id| Uuid::parse_str(id).ok());
                if let Some(id) = id.filter(|id| seen.insert(*id)) {
                    order.push(id);
                }
            }
            match page.last() {
                Some(last) if page.len() == PAGE => from = last.global_position + 1,
                _ => break,
            }
        }
        let mut queued = 0;
        for id in order {
            if requeue_if_waiting(&self.inner, id).await?.is_some() {
                queued += 1;
            }
        }
        if queued > 0 {
            self.inner.wake.notify_one();
        }
        Ok(queued)
    }

    /// Claims and drives workflows until `shutdown` completes or a fault
    /// kills the runtime. On shutdown, drives in flight stop at their next
    /// step and their claims are released for others.
    pub async fn run(&self, shutdown: impl std::future::Future<Output = ()>) {
        let inner = self.inner.clone();
        inner.config.health.register(TASK);
        inner.config.health.register(TOOL_TASK);
        // Before any claim: a restarted process reuses what it recorded
        // before. Submissions meanwhile wait in the queue.
        super::drive::warm_cache(inner.clone()).await;
        // MCP servers are listed at start, without holding it up: a server
        // that does not answer is tried again at its tool's next call.
        let listing = {
            let inner = inner.clone();
            tokio::spawn(async move { inner.mcp.connect_all().await })
        };
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
        listing.abort();
        // Drives see `dead` at their next step and end; a killed runtime
        // leaves its leases to expire, a stopped one hands them back.
        while drives.join_next().await.is_some() {}
        if !killed {
            let held: Vec<Uuid> = inner
                .held
                .lock()
                .expect("held lock")
                .drain()
                .map(|(workflow, _)| workflow)
                .collect();
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
pub(super) type Handoff = (Claim, Option<History>, OwnedSemaphorePermit);

fn spawn_drive(
    drives: &mut JoinSet<()>,
    inner: &Arc<Inner>,
    claim: Claim,
    history: Option<History>,
    slot: OwnedSemaphorePermit,
) {
    inner
        .held
        .lock()
        .expect("held lock")
        .insert(claim.workflow, false);
    let inner = inner.clone();
    let span = crate::trace::workflow_span(claim.workflow);
    drives.spawn(tracing::Instrument::instrument(
        async move {
            let workflow = claim.workflow;
            let driven = std::panic::AssertUnwindSafe(drive::drive(&inner, claim, history))
                .catch_unwind()
                .await;
            if let Err(panic) = driven {
                restart_after_panic(&inner, workflow, panic).await;
            }
            drop(slot);
        },
        span,
    ));
}

/// The runtime's name in [`agentledger_eventstore::health::Health`].
pub const TASK: &str = "agents";

/// Tool attempts that panicked (each failed its attempt, retried as an
/// error), in [`agentledger_eventstore::health::Health`].
pub const TOOL_TASK: &str = "tools";

/// A drive panicked (a bug in an agent, a policy or the runtime; a tool's
/// panic fails only its attempt): its workflow would stay claimed, its
/// lease renewed, and never move. Count it, hand the claim back after a
/// pause that doubles with each panic of this workflow (1 s, 2 s, … at
/// most 5 minutes), and let the claim loop drive it again from its
/// recorded history. A killed runtime touches nothing.
async fn restart_after_panic(
    inner: &Arc<Inner>,
    workflow: Uuid,
    panic: Box<dyn std::any::Any + Send>,
) {
    let text = agentledger_eventstore::health::panic_message(&*panic);
    inner.config.health.counted(TASK);
    inner.held.lock().expect("held lock").remove(&workflow);
    if inner.dead.is_cancelled() {
        return;
    }
    let panics = {
        let mut panics = inner.panics.lock().expect("panics lock");
        let seen = panics.entry(workflow).or_insert(0);
        *seen += 1;
        *seen
    };
    let pause = (1i64 << (panics - 1).min(9)).min(300);
    tracing::error!(%workflow, panic = %text, panics, pause_s = pause, "a workflow's drive panicked; it will be driven again");
    let again = inner.clock.now() + chrono::Duration::seconds(pause);
    if let Err(e) = inner
        .queue
        .release(&inner.config.owner, workflow, None, again)
        .await
    {
        // The lease runs out instead, and another claim takes it.
        tracing::warn!(%workflow, error = %e, "handing back a panicked workflow failed");
    }
    inner.wake.notify_one();
}

/// Renews this runtime's leases every third of the lease time.
async fn renew_leases(inner: Arc<Inner>) {
    loop {
        inner.clock.sleep(inner.config.lease / 3).await;
        let held: Vec<Uuid> = inner
            .held
            .lock()
            .expect("held lock")
            .keys()
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
    let grace = inner.config.orphan_grace.max(Duration::from_millis(100));
    loop {
        inner.clock.sleep(grace).await;
        if !inner.config.external_tools.is_empty() {
            // Calls a crashed executor left, and answered ones kept for
            // resends: gone a minute past their deadline.
            let before = inner.clock.now() - crate::queue::CALL_GRACE;
            if let Err(e) = inner.queue.clear_calls(before).await {
                tracing::warn!(error = %e, "clearing old tool calls failed");
            }
        }
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
            match requeue_if_waiting(&inner, id).await {
                Ok(Some(state)) => {
                    tracing::warn!(workflow = %id, ?state, "workflow had no queue row; queued it again");
                    requeued += 1;
                }
                Ok(None) => {}
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

/// Queues `id` again when its stream says it waits for an agent (a final
/// or escalated workflow rightly has no row); the state it waits in, or
/// `None` when it does not wait.
pub(super) async fn requeue_if_waiting(
    inner: &Inner,
    id: uuid::Uuid,
) -> Result<Option<agentledger_domain::workflow::WorkflowState>, RuntimeError> {
    use agentledger_domain::workflow::WorkflowState as S;
    let Some(history) = History::load(&*inner.store, inner.keys(), id).await? else {
        return Ok(None);
    };
    let state = history.workflow.state;
    if !matches!(
        state,
        S::Submitted | S::Analysing | S::Gating | S::Executing | S::Reviewing
    ) {
        return Ok(None);
    }
    let now = inner.clock.now();
    inner
        .queue
        .enqueue(id, history.workflow.priority, now, now)
        .await?;
    Ok(Some(state))
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
            // nothing. A requeue here wakes the loop itself. A person's
            // decision is never the drive's own: its wake-up waits for the
            // drive to let go (`Inner::forget`), which may be after the
            // drive's queue row went and the person's row came.
            let person = event.event_type == "HumanDecisionRecorded";
            let local = event
                .stream_id
                .as_str()
                .strip_prefix(STREAM_PREFIX)
                .and_then(|id| id.parse::<Uuid>().ok())
                .is_some_and(|id| {
                    let mut held = inner.held.lock().expect("held lock");
                    held.get_mut(&id)
                        .map(|decided| *decided |= person)
                        .is_some()
                });
            if !local {
                inner.wake.notify_one();
            }
        }
    })
}
