-- The queue of workflows waiting for an agent (design §6): a workflow has a
-- row while some agent has work to do on it. Workers claim rows with
-- FOR UPDATE SKIP LOCKED, highest priority first, under a lease; a lease
-- that runs out (its worker died) makes the row claimable again. The event
-- store stays the truth: a claimer folds the workflow's stream to see what
-- to do, and its appends are guarded by the expected version.

CREATE TABLE agent_tasks (
    workflow_id  uuid PRIMARY KEY,
    -- 0 LOW, 1 NORMAL, 2 HIGH, 3 CRITICAL.
    priority     smallint    NOT NULL CHECK (priority BETWEEN 0 AND 3),
    -- Not claimable before this time.
    available_at timestamptz NOT NULL,
    enqueued_at  timestamptz NOT NULL,
    -- Bumped by every enqueue, so that a worker finishing an older claim
    -- does not delete work queued meanwhile.
    seq          bigint      NOT NULL DEFAULT 0,
    -- Claims so far (a workflow claimed again and again is visible here).
    claims       integer     NOT NULL DEFAULT 0,
    lease_owner  text,
    lease_until  timestamptz
);

-- Claim order.
CREATE INDEX agent_tasks_claim_order ON agent_tasks (priority DESC, available_at, workflow_id);

GRANT SELECT, INSERT, UPDATE, DELETE ON agent_tasks TO agentledger_service;
