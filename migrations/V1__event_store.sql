-- The event store: one append-only table, hash-chained per stream.
--
-- Positions are assigned under a transaction-scoped advisory lock (see
-- ARCHITECTURE.md, "Global order"), so they are gap-free and commit in
-- position order; no sequence is involved.

CREATE TABLE events (
    global_position bigint      NOT NULL PRIMARY KEY CHECK (global_position > 0),
    stream_id       text        NOT NULL,
    stream_version  bigint      NOT NULL CHECK (stream_version >= 0),
    event_id        uuid        NOT NULL,
    event_type      text        NOT NULL,
    schema_version  integer     NOT NULL,
    payload         jsonb       NOT NULL CHECK (jsonb_typeof(payload) = 'object'),
    metadata        jsonb       NOT NULL CHECK (jsonb_typeof(metadata) = 'object'),
    recorded_at     timestamptz NOT NULL,
    hash_version    smallint    NOT NULL,
    prev_hash       bytea       NOT NULL CHECK (octet_length(prev_hash) = 32),
    hash            bytea       NOT NULL CHECK (octet_length(hash) = 32),
    -- Reading a stream in order and finding its head.
    CONSTRAINT events_stream_version_key UNIQUE (stream_id, stream_version),
    -- Idempotent appends: an event id is unique within its stream.
    CONSTRAINT events_stream_event_id_key UNIQUE (stream_id, event_id)
);

COMMENT ON TABLE events IS
    'Append-only ledger. UPDATE, DELETE and TRUNCATE are refused by triggers; hash = SHA-256(prev_hash || canonical(event)).';

CREATE FUNCTION events_refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the events table is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;

CREATE TRIGGER events_no_update_or_delete
    BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION events_refuse_change();

CREATE TRIGGER events_no_truncate
    BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_refuse_change();

-- Takes the append lock for the rest of the transaction, then returns the
-- head position. VOLATILE and PL/pgSQL, so the SELECT runs with a snapshot
-- taken after the lock was granted: every earlier holder has committed and
-- is visible (in READ COMMITTED, which the writer sets). An INSERT numbers
-- its rows from this value in the same statement.
CREATE FUNCTION events_lock_head(lock_key bigint) RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(lock_key);
    RETURN (SELECT coalesce(max(global_position), 0) FROM events);
END;
$$;

-- The service's least-privileged role: it may add and read events, nothing
-- else. Roles are cluster-wide and several databases may be migrated at once
-- (tests do), so creation tolerates a concurrent creator.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'agentledger_service') THEN
        BEGIN
            CREATE ROLE agentledger_service LOGIN;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL; -- created meanwhile by another migration
        END;
    END IF;
END;
$$;

GRANT SELECT, INSERT ON events TO agentledger_service;
GRANT EXECUTE ON FUNCTION events_lock_head(bigint) TO agentledger_service;
