-- Keys kept apart from the events (issue #6, design §8).

-- The deployment's Ed25519 keys for signed ledger digests. One is active
-- (created on first use under an advisory lock); rotation wipes the active
-- key's secret half and keeps its public half so that the digests it signed
-- still verify. Rows are never deleted.
CREATE TABLE ledger_keys (
    key_id     text PRIMARY KEY,
    algorithm  text        NOT NULL,
    public_key bytea       NOT NULL,
    secret_key bytea,
    created_at timestamptz NOT NULL DEFAULT now(),
    retired_at timestamptz,
    CHECK ((retired_at IS NULL) = (secret_key IS NOT NULL))
);
CREATE UNIQUE INDEX ledger_keys_one_active ON ledger_keys ((true)) WHERE retired_at IS NULL;

GRANT SELECT, INSERT ON ledger_keys TO agentledger_service;
GRANT UPDATE (secret_key, retired_at) ON ledger_keys TO agentledger_service;

-- Crypto-shredding: one AES-256-GCM key per data subject. Events hold the
-- subject's personal text sealed with it and name the key by `key_id` only;
-- the subject id lives here alone. Forgetting a subject deletes its row
-- (and vacuums the table), after which the sealed text cannot be read.
CREATE TABLE subject_keys (
    key_id     uuid PRIMARY KEY,
    subject_id text        NOT NULL UNIQUE,
    secret     bytea       NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Autovacuum acts on any dead row here (a deleted key), not after the
-- default 20 % of the table.
ALTER TABLE subject_keys SET (autovacuum_vacuum_threshold = 0, autovacuum_vacuum_scale_factor = 0);

GRANT SELECT, INSERT, DELETE ON subject_keys TO agentledger_service;

-- Forgetting vacuums subject_keys so that the deleted key does not linger
-- in a dead tuple; PostgreSQL 15 lets only the owner vacuum a table. Where
-- the migrating role may not hand the table over, forgetting still deletes
-- the key and reports that the vacuum was skipped.
DO $$
BEGIN
    ALTER TABLE subject_keys OWNER TO agentledger_service;
EXCEPTION WHEN insufficient_privilege THEN
    RAISE WARNING 'subject_keys stays owned by %: forgetSubject cannot VACUUM it as agentledger_service', current_user;
END
$$;
