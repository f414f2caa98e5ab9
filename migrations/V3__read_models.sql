-- Read models (design §4). Each projection writes its rows and its
-- checkpoint in one transaction; every time in a row comes from the events'
-- recorded_at, never from now(), so that a rebuild equals the live tables.

-- One row per projection: the last applied position and the lease token of
-- the runner allowed to advance it (compare-and-set on both: a runner that
-- lost its lease cannot commit a batch).
CREATE TABLE projection_checkpoints (
    name        text PRIMARY KEY,
    position    bigint NOT NULL DEFAULT 0,
    lease_token uuid
);

-- workflow_status: one row per workflow, one per subtask of its current plan.
CREATE TABLE workflow_status (
    workflow_id    uuid PRIMARY KEY,
    state          text        NOT NULL,
    priority       text        NOT NULL,
    request        text        NOT NULL,
    round          smallint    NOT NULL,
    progress_done  integer     NOT NULL,
    progress_total integer     NOT NULL,
    verdict        text,
    risk           double precision,
    -- RUNE's review: {"transparency":…, "passed":…, "findings":[…]}.
    ethics         jsonb,
    owner          text        NOT NULL,
    tenant         text        NOT NULL,
    created_at     timestamptz NOT NULL,
    updated_at     timestamptz NOT NULL,
    completed_at   timestamptz,
    last_position  bigint      NOT NULL,
    version        bigint      NOT NULL
);
-- `workflows(state, first, after)`: newest first, keyset pages.
CREATE INDEX workflow_status_newest ON workflow_status (created_at DESC, workflow_id DESC);
CREATE INDEX workflow_status_state_newest ON workflow_status (state, created_at DESC, workflow_id DESC);

CREATE TABLE workflow_subtasks (
    workflow_id uuid        NOT NULL,
    subtask_id  text        NOT NULL,
    ordinal     integer     NOT NULL,
    title       text        NOT NULL,
    tool        text        NOT NULL,
    depends_on  text[]      NOT NULL,
    state       text        NOT NULL,
    attempts    smallint    NOT NULL,
    output      text,
    started_at  timestamptz,
    finished_at timestamptz,
    PRIMARY KEY (workflow_id, subtask_id)
);

-- audit_trail: one row per event, in a reviewer's words.
CREATE TABLE audit_trail (
    position           bigint PRIMARY KEY,
    workflow_id        uuid        NOT NULL,
    version            bigint      NOT NULL,
    event_type         text        NOT NULL,
    kind               text        NOT NULL,
    actor_kind         text        NOT NULL,
    actor              text        NOT NULL,
    actor_version      text        NOT NULL,
    role               text,
    summary            text        NOT NULL,
    rationale          text        NOT NULL,
    policy_fingerprint text,
    recorded_at        timestamptz NOT NULL,
    hash               text        NOT NULL
);
-- "everything about workflow X in order", "all decisions by Lubit between
-- T1 and T2", by role, by kind, by time range.
CREATE INDEX audit_trail_workflow ON audit_trail (workflow_id, position);
CREATE INDEX audit_trail_actor_time ON audit_trail (actor, recorded_at, position);
CREATE INDEX audit_trail_role_time ON audit_trail (role, recorded_at, position);
CREATE INDEX audit_trail_kind_time ON audit_trail (kind, recorded_at, position);
CREATE INDEX audit_trail_time ON audit_trail (recorded_at, position);

-- agent_metrics: per agent and minute. Latency is kept as fixed histogram
-- buckets (upper bounds in ms: 1 2 5 10 20 50 100 200 500 1000 2000 5000
-- 10000 +inf), which add up across minutes and processes; a p95 is read
-- from them. Sums are integers (microseconds, millionths of a score), so
-- that adding batches in any grouping gives the same row: a rebuild equals
-- the live table exactly.
CREATE TABLE agent_metrics (
    agent              text        NOT NULL,
    bucket             timestamptz NOT NULL,
    decisions          bigint      NOT NULL,
    approvals          bigint      NOT NULL,
    rejections         bigint      NOT NULL,
    revisions          bigint      NOT NULL,
    escalations        bigint      NOT NULL,
    retries            bigint      NOT NULL,
    failures           bigint      NOT NULL,
    flagged            bigint      NOT NULL,
    latency_count      bigint      NOT NULL,
    latency_sum_us     bigint      NOT NULL,
    latency_max_us     bigint      NOT NULL,
    latency_buckets    bigint[]    NOT NULL,
    ethics_count       bigint      NOT NULL,
    transparency_sum   bigint      NOT NULL,
    collaboration_sum  bigint      NOT NULL,
    autonomy_sum       bigint      NOT NULL,
    fairness_sum       bigint      NOT NULL,
    PRIMARY KEY (agent, bucket)
);
CREATE INDEX agent_metrics_bucket ON agent_metrics (bucket);

GRANT SELECT, INSERT, UPDATE, DELETE ON projection_checkpoints, workflow_status,
    workflow_subtasks, audit_trail, agent_metrics TO agentledger_service;
