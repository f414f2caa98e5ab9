//! The task queue in PostgreSQL (`agent_tasks`, migration V2): claims with
//! `FOR UPDATE SKIP LOCKED` so that concurrent claimers never wait on or
//! take the same row.

use std::time::Duration;

use agentledger_domain::names::AgentRole;
use agentledger_domain::workflow::Priority;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use uuid::Uuid;

use super::{
    lease_end, priority_code, priority_from_code, Assignment, CallResult, Claim, PostedCall,
    QueueError, TaskClaim, WorkQueue, CALL_GRACE,
};

/// A task queue in PostgreSQL, over a pool with the service role.
#[derive(Clone)]
pub struct PostgresWorkQueue {
    pool: Pool,
}

impl PostgresWorkQueue {
    /// A queue on `pool` (e.g. the event store's read pool).
    pub fn new(pool: Pool) -> Self {
        Self { pool }
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, QueueError> {
        self.pool.get().await.map_err(|e| match e {
            deadpool_postgres::PoolError::Backend(e) => unavailable(e),
            other => QueueError::Unavailable(other.to_string()),
        })
    }
}

fn unavailable(e: tokio_postgres::Error) -> QueueError {
    // "db error" alone says nothing: name what the server said.
    QueueError::Unavailable(agentledger_eventstore::describe_db_error(&e))
}

const ENQUEUE: &str = "
    INSERT INTO agent_tasks (workflow_id, priority, available_at, enqueued_at)
    VALUES ($1, $2, $3, $4)
    ON CONFLICT (workflow_id) DO UPDATE
       SET priority = EXCLUDED.priority,
           available_at = EXCLUDED.available_at,
           seq = agent_tasks.seq + 1";

// A new workflow's row, leased to its submitter. Should the id exist
// already, the row is taken over only when its lease has run out.
const ENQUEUE_CLAIMED: &str = "
    INSERT INTO agent_tasks (workflow_id, priority, available_at, enqueued_at, claims, lease_owner, lease_until)
    VALUES ($1, $2, $3, $3, 1, $4, $5)
    ON CONFLICT (workflow_id) DO UPDATE
       SET lease_owner = EXCLUDED.lease_owner, lease_until = EXCLUDED.lease_until,
           claims = agent_tasks.claims + 1
     WHERE agent_tasks.lease_until IS NULL OR agent_tasks.lease_until < $3
    RETURNING seq, claims, enqueued_at, priority";

// The inner SELECT picks and locks the rows (skipping rows other claimers
// hold locked this instant); the UPDATE takes the lease on them.
const CLAIM: &str = "
    WITH ready AS (
        SELECT workflow_id FROM agent_tasks
         WHERE role IS NULL
           AND available_at <= $2 AND (lease_until IS NULL OR lease_until < $2)
         ORDER BY priority DESC, available_at, workflow_id
         LIMIT $4
         FOR UPDATE SKIP LOCKED)
    UPDATE agent_tasks t
       SET lease_owner = $1, lease_until = $3, claims = t.claims + 1
      FROM ready
     WHERE t.workflow_id = ready.workflow_id
    RETURNING t.workflow_id, t.priority, t.seq, t.claims, t.enqueued_at, t.available_at";

const RENEW: &str = "
    UPDATE agent_tasks SET lease_until = $3
     WHERE lease_owner = $1 AND workflow_id = ANY($2)
    RETURNING workflow_id";

const RELEASE: &str = "
    UPDATE agent_tasks
       SET lease_owner = NULL, lease_until = NULL,
           priority = COALESCE($3, priority), available_at = $4
     WHERE workflow_id = $2 AND lease_owner = $1";

// Deletes the row when nothing was enqueued since the claim. A concurrent
// enqueue that commits first changes `seq`, which PostgreSQL checks again
// on the row it waited for: the row then stays, for RELEASE_HELD.
const COMPLETE: &str = "
    DELETE FROM agent_tasks
     WHERE workflow_id = $2 AND lease_owner = $1 AND seq = $3";

// What `complete` does when newer work kept the row: hands it back now,
// whatever its `seq` became. (One statement with the DELETE above in a CTE
// missed both when the enqueue committed while it waited: its UPDATE
// judged `seq` on the row as it was before.)
const RELEASE_HELD: &str = "
    UPDATE agent_tasks
       SET lease_owner = NULL, lease_until = NULL, available_at = LEAST(available_at, $3)
     WHERE workflow_id = $2 AND lease_owner = $1";

const ASSIGN: &str = "
    UPDATE agent_tasks
       SET role = $3, task_id = $4, task_version = $5, tenant = $6,
           lease_owner = NULL, lease_until = NULL, claims = 0, available_at = $7
     WHERE workflow_id = $2 AND lease_owner = $1";

const TASK_COLUMNS: &str =
    "t.workflow_id, t.role, t.task_id, t.task_version, t.tenant, t.priority, \
     t.claims, t.lease_owner, t.lease_until";

fn claim_task_sql() -> String {
    format!(
        "WITH ready AS (
            SELECT workflow_id FROM agent_tasks
             WHERE role = $1 AND tenant = $2
               AND available_at <= $4 AND (lease_until IS NULL OR lease_until < $4)
             ORDER BY priority DESC, available_at, workflow_id
             LIMIT 1
             FOR UPDATE SKIP LOCKED)
        UPDATE agent_tasks t
           SET lease_owner = $3, lease_until = $5, claims = t.claims + 1
          FROM ready
         WHERE t.workflow_id = ready.workflow_id
        RETURNING {TASK_COLUMNS}"
    )
}

// A lease in the past is nobody's: renewing or releasing it is refused.
const RENEW_TASK: &str = "
    UPDATE agent_tasks SET lease_until = $4
     WHERE task_id = $1 AND lease_owner = $2 AND lease_until >= $3";

const RELEASE_TASK: &str = "
    UPDATE agent_tasks SET lease_owner = NULL, lease_until = NULL, available_at = $4
     WHERE task_id = $1 AND lease_owner = $2 AND lease_until >= $3";

const UNASSIGN: &str = "
    UPDATE agent_tasks
       SET role = NULL, task_id = NULL, task_version = NULL, tenant = NULL,
           lease_owner = NULL, lease_until = NULL, claims = 0,
           priority = $2, available_at = $3, seq = seq + 1
     WHERE task_id = $1";

const CALL_COLUMNS: &str = "c.id, c.workflow_id, c.subtask, c.tool, c.tenant, c.attempt, \
     c.instruction, c.input, c.deadline, c.claims, c.lease_owner, c.lease_until, c.output, c.error";

const POST_CALL: &str = "
    INSERT INTO tool_calls (id, workflow_id, subtask, tool, tenant, attempt, instruction, input, deadline, posted_at)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
    ON CONFLICT (id) DO NOTHING";

const CLEAR_CALLS: &str = "
    DELETE FROM tool_calls
     WHERE deadline < $1
        OR (workflow_id = $2 AND subtask = $3 AND attempt < $4
            AND output IS NULL AND error IS NULL)";

fn claim_call_sql() -> String {
    format!(
        "WITH ready AS (
            SELECT id FROM tool_calls
             WHERE tool = ANY($1) AND tenant = $2
               AND output IS NULL AND error IS NULL
               AND deadline > $4 AND (lease_until IS NULL OR lease_until < $4)
             ORDER BY posted_at
             LIMIT 1
             FOR UPDATE SKIP LOCKED)
        UPDATE tool_calls c
           SET lease_owner = $3, lease_until = $5, claims = c.claims + 1
          FROM ready
         WHERE c.id = ready.id
        RETURNING {CALL_COLUMNS}"
    )
}

const ANSWER_CALL: &str = "
    UPDATE tool_calls SET output = $4, error = $5
     WHERE id = $1 AND lease_owner = $2 AND lease_until >= $3
       AND deadline > $3 AND output IS NULL AND error IS NULL";

fn posted_call(row: &tokio_postgres::Row) -> PostedCall {
    let owner: Option<String> = row.get(10);
    let until: Option<DateTime<Utc>> = row.get(11);
    let output: Option<String> = row.get(12);
    let error: Option<String> = row.get(13);
    PostedCall {
        id: row.get(0),
        workflow: row.get(1),
        subtask: row.get(2),
        tool: row.get(3),
        tenant: row.get(4),
        attempt: u8::try_from(row.get::<_, i16>(5)).unwrap_or(u8::MAX),
        instruction: row.get(6),
        input: row.get(7),
        deadline: row.get(8),
        claims: row.get(9),
        lease: owner.zip(until),
        result: match (output, error) {
            (Some(output), _) => Some(CallResult::Output(output)),
            (None, Some(error)) => Some(CallResult::Error(error)),
            (None, None) => None,
        },
    }
}

fn task_claim(row: &tokio_postgres::Row) -> Result<TaskClaim, QueueError> {
    let role: String = row.get(1);
    let role = AgentRole::parse(&role)
        .ok_or_else(|| QueueError::Unavailable(format!("unknown role {role:?} in agent_tasks")))?;
    let owner: Option<String> = row.get(7);
    let until: Option<DateTime<Utc>> = row.get(8);
    Ok(TaskClaim {
        workflow: row.get(0),
        assignment: Assignment {
            role,
            task: row.get(2),
            version: u64::try_from(row.get::<_, i64>(3)).unwrap_or(0),
            tenant: row.get(4),
        },
        priority: priority_from_code(row.get(5)),
        attempt: row.get(6),
        lease: owner.zip(until),
    })
}

#[async_trait]
impl WorkQueue for PostgresWorkQueue {
    async fn enqueue(
        &self,
        workflow: Uuid,
        priority: Priority,
        available_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<(), QueueError> {
        let client = self.client().await?;
        let statement = client.prepare_cached(ENQUEUE).await.map_err(unavailable)?;
        client
            .execute(
                &statement,
                &[&workflow, &priority_code(priority), &available_at, &now],
            )
            .await
            .map_err(unavailable)?;
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
        let client = self.client().await?;
        let statement = client
            .prepare_cached(ENQUEUE_CLAIMED)
            .await
            .map_err(unavailable)?;
        let row = client
            .query_opt(
                &statement,
                &[
                    &workflow,
                    &priority_code(priority),
                    &now,
                    &owner,
                    &lease_end(now, lease),
                ],
            )
            .await
            .map_err(unavailable)?
            .ok_or(QueueError::Held(workflow))?;
        Ok(Claim {
            workflow,
            priority: priority_from_code(row.get(3)),
            seq: row.get(0),
            claims: row.get(1),
            enqueued_at: row.get(2),
        })
    }

    async fn claim(
        &self,
        owner: &str,
        max: usize,
        now: DateTime<Utc>,
        lease: Duration,
    ) -> Result<Vec<Claim>, QueueError> {
        let client = self.client().await?;
        let statement = client.prepare_cached(CLAIM).await.map_err(unavailable)?;
        let limit = i64::try_from(max).unwrap_or(i64::MAX);
        let rows = client
            .query(&statement, &[&owner, &now, &lease_end(now, lease), &limit])
            .await
            .map_err(unavailable)?;
        let mut claims: Vec<(Claim, DateTime<Utc>)> = rows
            .iter()
            .map(|row| {
                (
                    Claim {
                        workflow: row.get(0),
                        priority: priority_from_code(row.get(1)),
                        seq: row.get(2),
                        claims: row.get(3),
                        enqueued_at: row.get(4),
                    },
                    row.get(5),
                )
            })
            .collect();
        // RETURNING does not keep the claim order.
        claims.sort_by(|(a, a_at), (b, b_at)| {
            b.priority
                .cmp(&a.priority)
                .then(a_at.cmp(b_at))
                .then(a.workflow.cmp(&b.workflow))
        });
        Ok(claims.into_iter().map(|(c, _)| c).collect())
    }

    async fn renew(
        &self,
        owner: &str,
        workflows: &[Uuid],
        until: DateTime<Utc>,
    ) -> Result<Vec<Uuid>, QueueError> {
        let client = self.client().await?;
        let statement = client.prepare_cached(RENEW).await.map_err(unavailable)?;
        let rows = client
            .query(&statement, &[&owner, &workflows, &until])
            .await
            .map_err(unavailable)?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    async fn release(
        &self,
        owner: &str,
        workflow: Uuid,
        priority: Option<Priority>,
        available_at: DateTime<Utc>,
    ) -> Result<(), QueueError> {
        let client = self.client().await?;
        let statement = client.prepare_cached(RELEASE).await.map_err(unavailable)?;
        let priority = priority.map(priority_code);
        client
            .execute(&statement, &[&owner, &workflow, &priority, &available_at])
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn complete(
        &self,
        owner: &str,
        workflow: Uuid,
        seq: i64,
        now: DateTime<Utc>,
    ) -> Result<bool, QueueError> {
        let client = self.client().await?;
        let statement = client.prepare_cached(COMPLETE).await.map_err(unavailable)?;
        let removed = client
            .execute(&statement, &[&owner, &workflow, &seq])
            .await
            .map_err(unavailable)?;
        if removed > 0 {
            return Ok(false);
        }
        // Newer work came (or the lease is lost, and this finds nothing).
        let statement = client
            .prepare_cached(RELEASE_HELD)
            .await
            .map_err(unavailable)?;
        let released = client
            .execute(&statement, &[&owner, &workflow, &now])
            .await
            .map_err(unavailable)?;
        Ok(released > 0)
    }

    async fn remove(&self, workflow: Uuid) -> Result<(), QueueError> {
        let client = self.client().await?;
        client
            .execute(
                "DELETE FROM agent_tasks WHERE workflow_id = $1",
                &[&workflow],
            )
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn waiting(&self) -> Result<usize, QueueError> {
        let client = self.client().await?;
        let row = client
            .query_one("SELECT count(*) FROM agent_tasks", &[])
            .await
            .map_err(unavailable)?;
        Ok(usize::try_from(row.get::<_, i64>(0)).unwrap_or(0))
    }

    async fn unqueued(&self, before: DateTime<Utc>, max: usize) -> Result<Vec<Uuid>, QueueError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT s.workflow_id FROM workflow_status s
                  WHERE s.state IN ('SUBMITTED', 'ANALYSING', 'GATING', 'EXECUTING', 'REVIEWING')
                    AND s.updated_at < $1
                    AND NOT EXISTS (SELECT 1 FROM agent_tasks t WHERE t.workflow_id = s.workflow_id)
                  ORDER BY s.updated_at
                  LIMIT $2",
                &[&before, &(i64::try_from(max).unwrap_or(i64::MAX))],
            )
            .await
            .map_err(unavailable)?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    async fn assign(
        &self,
        owner: &str,
        workflow: Uuid,
        assignment: &Assignment,
        now: DateTime<Utc>,
    ) -> Result<bool, QueueError> {
        let client = self.client().await?;
        let statement = client.prepare_cached(ASSIGN).await.map_err(unavailable)?;
        let version = i64::try_from(assignment.version).unwrap_or(i64::MAX);
        let assigned = client
            .execute(
                &statement,
                &[
                    &owner,
                    &workflow,
                    &assignment.role.as_str(),
                    &assignment.task,
                    &version,
                    &assignment.tenant,
                    &now,
                ],
            )
            .await
            .map_err(unavailable)?;
        Ok(assigned > 0)
    }

    async fn claim_task(
        &self,
        role: AgentRole,
        tenant: &str,
        holder: &str,
        now: DateTime<Utc>,
        lease: Duration,
    ) -> Result<Option<TaskClaim>, QueueError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(&claim_task_sql())
            .await
            .map_err(unavailable)?;
        let row = client
            .query_opt(
                &statement,
                &[
                    &role.as_str(),
                    &tenant,
                    &holder,
                    &now,
                    &lease_end(now, lease),
                ],
            )
            .await
            .map_err(unavailable)?;
        row.as_ref().map(task_claim).transpose()
    }

    async fn task(&self, task: Uuid) -> Result<Option<TaskClaim>, QueueError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(&format!(
                "SELECT {TASK_COLUMNS} FROM agent_tasks t WHERE t.task_id = $1"
            ))
            .await
            .map_err(unavailable)?;
        let row = client
            .query_opt(&statement, &[&task])
            .await
            .map_err(unavailable)?;
        row.as_ref().map(task_claim).transpose()
    }

    async fn renew_task(
        &self,
        task: Uuid,
        holder: &str,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<bool, QueueError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(RENEW_TASK)
            .await
            .map_err(unavailable)?;
        let renewed = client
            .execute(&statement, &[&task, &holder, &now, &until])
            .await
            .map_err(unavailable)?;
        Ok(renewed > 0)
    }

    async fn release_task(
        &self,
        task: Uuid,
        holder: &str,
        now: DateTime<Utc>,
        available_at: DateTime<Utc>,
    ) -> Result<bool, QueueError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(RELEASE_TASK)
            .await
            .map_err(unavailable)?;
        let released = client
            .execute(&statement, &[&task, &holder, &now, &available_at])
            .await
            .map_err(unavailable)?;
        Ok(released > 0)
    }

    async fn post_call(&self, call: &PostedCall, now: DateTime<Utc>) -> Result<(), QueueError> {
        let client = self.client().await?;
        let (post, clear) = tokio::try_join!(
            client.prepare_cached(POST_CALL),
            client.prepare_cached(CLEAR_CALLS)
        )
        .map_err(unavailable)?;
        let attempt = i16::from(call.attempt);
        let cleared = now - CALL_GRACE;
        let post_params: [&(dyn tokio_postgres::types::ToSql + Sync); 10] = [
            &call.id,
            &call.workflow,
            &call.subtask,
            &call.tool,
            &call.tenant,
            &attempt,
            &call.instruction,
            &call.input,
            &call.deadline,
            &now,
        ];
        let clear_params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
            [&cleared, &call.workflow, &call.subtask, &attempt];
        tokio::try_join!(
            client.execute(&post, &post_params),
            client.execute(&clear, &clear_params)
        )
        .map_err(unavailable)?;
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
        let client = self.client().await?;
        let statement = client
            .prepare_cached(&claim_call_sql())
            .await
            .map_err(unavailable)?;
        let row = client
            .query_opt(
                &statement,
                &[&tools, &tenant, &holder, &now, &lease_end(now, lease)],
            )
            .await
            .map_err(unavailable)?;
        Ok(row.as_ref().map(posted_call))
    }

    async fn call(&self, id: Uuid) -> Result<Option<PostedCall>, QueueError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(&format!(
                "SELECT {CALL_COLUMNS} FROM tool_calls c WHERE c.id = $1"
            ))
            .await
            .map_err(unavailable)?;
        let row = client
            .query_opt(&statement, &[&id])
            .await
            .map_err(unavailable)?;
        Ok(row.as_ref().map(posted_call))
    }

    async fn answer_call(
        &self,
        id: Uuid,
        holder: &str,
        now: DateTime<Utc>,
        result: &CallResult,
    ) -> Result<bool, QueueError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(ANSWER_CALL)
            .await
            .map_err(unavailable)?;
        let (output, error) = match result {
            CallResult::Output(o) => (Some(o.as_str()), None),
            CallResult::Error(e) => (None, Some(e.as_str())),
        };
        let answered = client
            .execute(&statement, &[&id, &holder, &now, &output, &error])
            .await
            .map_err(unavailable)?;
        Ok(answered > 0)
    }

    async fn clear_calls(&self, before: DateTime<Utc>) -> Result<u64, QueueError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(CLEAR_CALLS)
            .await
            .map_err(unavailable)?;
        client
            .execute(&statement, &[&before])
            .await
            .map_err(unavailable)
    }

    async fn remove_call(&self, id: Uuid) -> Result<(), QueueError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached("DELETE FROM tool_calls WHERE id = $1")
            .await
            .map_err(unavailable)?;
        client
            .execute(&statement, &[&id])
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn finish_task(
        &self,
        task: Uuid,
        next: Option<Priority>,
        now: DateTime<Utc>,
    ) -> Result<bool, QueueError> {
        let client = self.client().await?;
        let finished = match next {
            Some(priority) => {
                let statement = client.prepare_cached(UNASSIGN).await.map_err(unavailable)?;
                client
                    .execute(&statement, &[&task, &priority_code(priority), &now])
                    .await
            }
            None => {
                client
                    .execute("DELETE FROM agent_tasks WHERE task_id = $1", &[&task])
                    .await
            }
        }
        .map_err(unavailable)?;
        Ok(finished > 0)
    }
}
