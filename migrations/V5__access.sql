-- Who may do what (issue #12): API keys, and the tenant on every read model
-- a caller can list, so that each read is confined to the caller's tenant
-- by an index that leads with it.

-- API keys for applications and workers. The secret is shown once, when the
-- key is created; only its salted SHA-256 is kept (a key holds 256 random
-- bits, so a slow password hash would add nothing). `lookup` is the public
-- part of the key (`alk_<lookup>_<secret>`) that finds the row. Keys are
-- created and revoked by the owner role (`agentledger apikey`); the service
-- only reads them and notes when a key was last used. Rows are never deleted,
-- so that the ledger's `ApiKeyCreated` events keep naming a row.
CREATE TABLE api_keys (
    key_id       uuid PRIMARY KEY,
    name         text        NOT NULL UNIQUE,
    lookup       text        NOT NULL UNIQUE,
    secret_hash  bytea       NOT NULL,
    roles        text[]      NOT NULL,
    tenant       text        NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz,
    revoked_at   timestamptz,
    last_used_at timestamptz,
    CHECK (cardinality(roles) > 0),
    CHECK (length(name) BETWEEN 1 AND 100)
);

GRANT SELECT ON api_keys TO agentledger_service;
GRANT UPDATE (last_used_at) ON api_keys TO agentledger_service;

-- The audit trail's tenant (from each event's envelope); existing rows
-- belong to the default tenant, as every workflow recorded before did.
ALTER TABLE audit_trail ADD COLUMN tenant text NOT NULL DEFAULT 'default';
ALTER TABLE audit_trail ALTER COLUMN tenant DROP DEFAULT;
CREATE INDEX audit_trail_tenant ON audit_trail (tenant, position);

-- `workflows(state, first, after)` within one tenant.
CREATE INDEX workflow_status_tenant_newest ON workflow_status (tenant, created_at DESC, workflow_id DESC);
CREATE INDEX workflow_status_tenant_state_newest ON workflow_status (tenant, state, created_at DESC, workflow_id DESC);
