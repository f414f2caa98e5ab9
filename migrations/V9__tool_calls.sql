-- Calls of tools served by external workers. The executor posts one row per
-- attempt (after recording the attempt's start), a worker serving the tool
-- claims it under a lease and answers it with an output or an error, and
-- the executor takes the answer and removes the row. The row is only a
-- mailbox: what the ledger records is the executor's SubtaskCompleted or
-- SubtaskFailed, under the executor's deadline and retry rules. A row whose
-- deadline passed cannot be claimed or answered; rows a crashed executor
-- left behind are cleared by later posts.

CREATE TABLE tool_calls (
    id          uuid PRIMARY KEY,
    workflow_id uuid        NOT NULL,
    subtask     text        NOT NULL,
    tool        text        NOT NULL,
    tenant      text        NOT NULL,
    attempt     smallint    NOT NULL CHECK (attempt BETWEEN 1 AND 100),
    instruction text        NOT NULL,
    input       text        NOT NULL,
    deadline    timestamptz NOT NULL,
    posted_at   timestamptz NOT NULL,
    claims      integer     NOT NULL DEFAULT 0,
    lease_owner text,
    lease_until timestamptz,
    -- The answer: exactly one of them once answered.
    output      text,
    error       text,
    CHECK (output IS NULL OR error IS NULL)
);

-- Claim order: unanswered calls of a tool in a tenant, oldest first.
CREATE INDEX tool_calls_claim_order ON tool_calls (tool, tenant, posted_at)
    WHERE output IS NULL AND error IS NULL;
CREATE INDEX tool_calls_deadline ON tool_calls (deadline);

GRANT SELECT, INSERT, UPDATE, DELETE ON tool_calls TO agentledger_service;
