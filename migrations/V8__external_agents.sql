-- Work for external agents (workers outside the service, serving a role
-- through the API). When a role is served externally, the runtime hands the
-- workflow's row to that role instead of deciding: the row stays in
-- agent_tasks, unleased, with the role, the task's id, the stream version
-- the decision must be appended at, and the tenant whose workers may see
-- it. A worker claims it under a lease (lease_owner is the credential's
-- subject and the worker id); its decision is appended with that version
-- expected, and the row goes back to the runtime (role NULL) or away.
-- Runtimes claim only rows with no role.

ALTER TABLE agent_tasks
    ADD COLUMN role         text CHECK (role IN ('ANALYST', 'GATEKEEPER', 'EXECUTOR', 'ETHICS')),
    ADD COLUMN task_id      uuid UNIQUE,
    ADD COLUMN task_version bigint,
    ADD COLUMN tenant       text,
    ADD CONSTRAINT agent_tasks_assigned
        CHECK ((role IS NULL) = (task_id IS NULL)
           AND (role IS NULL) = (task_version IS NULL)
           AND (role IS NULL) = (tenant IS NULL));

DROP INDEX agent_tasks_claim_order;
CREATE INDEX agent_tasks_claim_order ON agent_tasks (priority DESC, available_at, workflow_id)
    WHERE role IS NULL;
CREATE INDEX agent_tasks_role_order ON agent_tasks (role, tenant, priority DESC, available_at, workflow_id)
    WHERE role IS NOT NULL;
