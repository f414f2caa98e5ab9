-- Retention (issue #17 §4): read-model rows past the window are written to
-- archive segments (JSONL files, each workflow with its receipt) and then
-- pruned. The ledger (events) is never pruned. One row per segment whose
-- rows were pruned, in the same transaction as the DELETE: a segment file
-- with no row here was written by a run that stopped before pruning, and
-- its rows are in a later segment too.
CREATE TABLE retention_segments (
    name        text PRIMARY KEY,
    -- SHA-256 of the file as written (hex): the copy checked later must
    -- have it.
    sha256      text        NOT NULL,
    cutoff      timestamptz NOT NULL,
    written_at  timestamptz NOT NULL DEFAULT now(),
    workflows   integer     NOT NULL,
    audit_rows  integer     NOT NULL,
    metric_rows integer     NOT NULL
);

-- Finished workflows by completion time: what a retention run looks for.
CREATE INDEX workflow_status_completed ON workflow_status (completed_at)
    WHERE completed_at IS NOT NULL;

GRANT SELECT, INSERT ON retention_segments TO agentledger_service;
