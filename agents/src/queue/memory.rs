//! The in-memory task queue: one map under a mutex, the same semantics as
//! the PostgreSQL one.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use agentledger_domain::names::AgentRole;
use agentledger_domain::workflow::Priority;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{
    lease_end, superseded, Assignment, CallResult, Claim, PostedCall, QueueError, TaskClaim,
    WorkQueue, CALL_GRACE,
};

#[derive(Debug, Clone)]
struct Row {
    priority: Priority,
    available_at: DateTime<Utc>,
    enqueued_at: DateTime<Utc>,
    seq: i64,
    claims: i32,
    lease: Option<(String, DateTime<Utc>)>,
    /// Set while external workers of a role have the row.
    assignment: Option<Assignment>,
}

/// A task queue in memory.
#[derive(Debug, Default)]
pub struct InMemoryWorkQueue {
    rows: Mutex<HashMap<Uuid, Row>>,
    /// External tool calls, each with the order it was posted in.
    calls: Mutex<HashMap<Uuid, (u64, PostedCall)>>,
    posted: std::sync::atomic::AtomicU64,
}

impl InMemoryWorkQueue {
    fn rows(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Row>> {
        self.rows.lock().expect("queue lock")
    }

    fn calls(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, (u64, PostedCall)>> {
        self.calls.lock().expect("calls lock")
    }
}

fn held_by(row: &Row, owner: &str) -> bool {
    row.lease.as_ref().is_some_and(|(o, _)| o == owner)
}

#[async_trait]
impl WorkQueue for InMemoryWorkQueue {
    async fn enqueue(
        &self,
        workflow: Uuid,
        priority: Priority,
        available_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<(), QueueError> {
        let mut rows = self.rows();
        let row = rows.entry(workflow).or_insert(Row {
            priority,
            available_at,
            enqueued_at: now,
            seq: -1,
            claims: 0,
            lease: None,
            assignment: None,
        });
        row.priority = priority;
        row.available_at = available_at;
        row.seq += 1;
        Ok(())
    }

    async fn enqueue_claimed(
        &self,
        workflow: Uuid,
        priority: Priority,
        owner: &str,
        now: DateTime<Utc>,
        lease: Duration,
    ) -> Result<Claim, QueueError> {
        let mut rows = self.rows();
        let row = rows.entry(workflow).or_insert(Row {
            priority,
            available_at: now,
            enqueued_at: now,
            seq: 0,
            claims: 0,
            lease: None,
            assignment: None,
        });
        if row.lease.as_ref().is_some_and(|(_, until)| *until >= now) {
            return Err(QueueError::Held(workflow));
        }
        row.claims += 1;
        row.lease = Some((owner.to_string(), lease_end(now, lease)));
        Ok(Claim {
            workflow,
            priority: row.priority,
            seq: row.seq,
            claims: row.claims,
            enqueued_at: row.enqueued_at,
        })
    }

    async fn claim(
        &self,
        owner: &str,
        max: usize,
        now: DateTime<Utc>,
        lease: Duration,
    ) -> Result<Vec<Claim>, QueueError> {
        let mut rows = self.rows();
        let mut ready: Vec<(&Uuid, &mut Row)> = rows
            .iter_mut()
            .filter(|(_, r)| {
                r.assignment.is_none()
                    && r.available_at <= now
                    && r.lease.as_ref().is_none_or(|(_, t)| *t < now)
            })
            .collect();
        ready.sort_by(|(a_id, a), (b_id, b)| {
            b.priority
                .cmp(&a.priority)
                .then(a.available_at.cmp(&b.available_at))
                .then(a_id.cmp(b_id))
        });
        Ok(ready
            .into_iter()
            .take(max)
            .map(|(id, row)| {
                row.lease = Some((owner.to_string(), lease_end(now, lease)));
                row.claims += 1;
                Claim {
                    workflow: *id,
                    priority: row.priority,
                    seq: row.seq,
                    claims: row.claims,
                    enqueued_at: row.enqueued_at,
                }
            })
            .collect())
    }

    async fn renew(
        &self,
        owner: &str,
        workflows: &[Uuid],
        until: DateTime<Utc>,
    ) -> Result<Vec<Uuid>, QueueError> {
        let mut rows = self.rows();
        let mut held = Vec::new();
        for id in workflows {
            if let Some(row) = rows.get_mut(id).filter(|r| held_by(r, owner)) {
                row.lease = Some((owner.to_string(), until));
                held.push(*id);
            }
        }
        Ok(held)
    }

    async fn release(
        &self,
        owner: &str,
        workflow: Uuid,
        priority: Option<Priority>,
        available_at: DateTime<Utc>,
    ) -> Result<(), QueueError> {
        if let Some(row) = self.rows().get_mut(&workflow).filter(|r| held_by(r, owner)) {
            row.lease = None;
            row.available_at = available_at;
            if let Some(p) = priority {
                row.priority = p;
            }
        }
        Ok(())
    }

    async fn complete(
        &self,
        owner: &str,
        workflow: Uuid,
        seq: i64,
        now: DateTime<Utc>,
    ) -> Result<bool, QueueError> {
        let mut rows = self.rows();
        match rows.get_mut(&workflow) {
            Some(row) if held_by(row, owner) && row.seq == seq => {
                rows.remove(&workflow);
                Ok(false)
            }
            Some(row) if held_by(row, owner) => {
                row.lease = None;
                row.available_at = row.available_at.min(now);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn remove(&self, workflow: Uuid) -> Result<(), QueueError> {
        self.rows().remove(&workflow);
        Ok(())
    }

    async fn waiting(&self) -> Result<usize, QueueError> {
        Ok(self.rows().len())
    }

    async fn assign(
        &self,
        owner: &str,
        workflow: Uuid,
        assignment: &Assignment,
        now: DateTime<Utc>,
    ) -> Result<bool, QueueError> {
        let mut rows = self.rows();
        let Some(row) = rows.get_mut(&workflow).filter(|r| held_by(r, owner)) else {
            return Ok(false);
        };
        row.assignment = Some(assignment.clone());
        row.lease = None;
        row.claims = 0;
        row.available_at = now;
        Ok(true)
    }

    async fn claim_task(
        &self,
        role: AgentRole,
        tenant: &str,
        holder: &str,
        now: DateTime<Utc>,
        lease: Duration,
    ) -> Result<Option<TaskClaim>, QueueError> {
        let mut rows = self.rows();
        let first = rows
            .iter_mut()
            .filter(|(_, r)| {
                r.assignment
                    .as_ref()
                    .is_some_and(|a| a.role == role && a.tenant == tenant)
                    && r.available_at <= now
                    && r.lease.as_ref().is_none_or(|(_, t)| *t < now)
            })
            .min_by(|(a_id, a), (b_id, b)| {
                b.priority
                    .cmp(&a.priority)
                    .then(a.available_at.cmp(&b.available_at))
                    .then(a_id.cmp(b_id))
            });
        Ok(first.map(|(id, row)| {
            row.lease = Some((holder.to_string(), lease_end(now, lease)));
            row.claims += 1;
            task_claim(*id, row)
        }))
    }

    async fn task(&self, task: Uuid) -> Result<Option<TaskClaim>, QueueError> {
        let rows = self.rows();
        Ok(find_task(&rows, task).map(|(id, row)| task_claim(id, row)))
    }

    async fn renew_task(
        &self,
        task: Uuid,
        holder: &str,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<bool, QueueError> {
        let mut rows = self.rows();
        let Some(row) = held_task(&mut rows, task, holder, now) else {
            return Ok(false);
        };
        row.lease = Some((holder.to_string(), until));
        Ok(true)
    }

    async fn release_task(
        &self,
        task: Uuid,
        holder: &str,
        now: DateTime<Utc>,
        available_at: DateTime<Utc>,
    ) -> Result<bool, QueueError> {
        let mut rows = self.rows();
        let Some(row) = held_task(&mut rows, task, holder, now) else {
            return Ok(false);
        };
        row.lease = None;
        row.available_at = available_at;
        Ok(true)
    }

    async fn post_call(&self, call: &PostedCall, now: DateTime<Utc>) -> Result<(), QueueError> {
        let order = self
            .posted
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut calls = self.calls();
        calls.retain(|_, (_, c)| c.deadline + CALL_GRACE >= now && !superseded(c, call));
        calls
            .entry(call.id)
            .or_insert_with(|| (order, call.clone()));
        Ok(())
    }

    async fn claim_call(
        &self,
        tools: &[String],
        tenant: &str,
        holder: &str,
        now: DateTime<Utc>,
        lease: Duration,
    ) -> Result<Option<PostedCall>, QueueError> {
        let mut calls = self.calls();
        let next = calls
            .values_mut()
            .filter(|(_, c)| {
                c.result.is_none()
                    && c.deadline > now
                    && c.tenant == tenant
                    && tools.contains(&c.tool)
                    && c.lease.as_ref().is_none_or(|(_, until)| *until < now)
            })
            .min_by_key(|(order, _)| *order);
        Ok(next.map(|(_, call)| {
            call.claims += 1;
            call.lease = Some((holder.to_string(), lease_end(now, lease)));
            call.clone()
        }))
    }

    async fn call(&self, id: Uuid) -> Result<Option<PostedCall>, QueueError> {
        Ok(self.calls().get(&id).map(|(_, c)| c.clone()))
    }

    async fn answer_call(
        &self,
        id: Uuid,
        holder: &str,
        now: DateTime<Utc>,
        result: &CallResult,
    ) -> Result<bool, QueueError> {
        let mut calls = self.calls();
        let Some((_, call)) = calls.get_mut(&id) else {
            return Ok(false);
        };
        let held = call
            .lease
            .as_ref()
            .is_some_and(|(h, until)| h == holder && *until >= now);
        if !held || call.result.is_some() || call.deadline <= now {
            return Ok(false);
        }
        call.result = Some(result.clone());
        Ok(true)
    }

    async fn remove_call(&self, id: Uuid) -> Result<(), QueueError> {
        self.calls().remove(&id);
        Ok(())
    }

    async fn clear_calls(&self, before: DateTime<Utc>) -> Result<u64, QueueError> {
        let mut calls = self.calls();
        let had = calls.len();
        calls.retain(|_, (_, c)| c.deadline >= before);
        Ok((had - calls.len()) as u64)
    }

    async fn finish_task(
        &self,
        task: Uuid,
        next: Option<Priority>,
        now: DateTime<Utc>,
    ) -> Result<bool, QueueError> {
        let mut rows = self.rows();
        let Some(id) = find_task(&rows, task).map(|(id, _)| id) else {
            return Ok(false);
        };
        match next {
            None => {
                rows.remove(&id);
            }
            Some(priority) => {
                let row = rows.get_mut(&id).expect("found above");
                row.assignment = None;
                row.lease = None;
                row.claims = 0;
                row.priority = priority;
                row.available_at = now;
                row.seq += 1;
            }
        }
        Ok(true)
    }
}

/// The row of `task` while `holder`'s lease on it holds at `now`.
fn held_task<'r>(
    rows: &'r mut HashMap<Uuid, Row>,
    task: Uuid,
    holder: &str,
    now: DateTime<Utc>,
) -> Option<&'r mut Row> {
    let id = find_task(rows, task)?.0;
    rows.get_mut(&id).filter(|row| {
        row.lease
            .as_ref()
            .is_some_and(|(h, t)| h == holder && *t >= now)
    })
}

fn find_task(rows: &HashMap<Uuid, Row>, task: Uuid) -> Option<(Uuid, &Row)> {
    rows.iter()
        .find(|(_, r)| r.assignment.as_ref().is_some_and(|a| a.task == task))
        .map(|(id, r)| (*id, r))
}

fn task_claim(workflow: Uuid, row: &Row) -> TaskClaim {
    TaskClaim {
        workflow,
        assignment: row.assignment.clone().expect("an assigned row"),
        priority: row.priority,
        attempt: row.claims,
        lease: row.lease.clone(),
    }
}
