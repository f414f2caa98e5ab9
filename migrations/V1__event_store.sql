-- The event store: one append-only table, hash-chained per stream.
--
-- Global order (see ARCHITECTURE.md, "Global order without skipped events"):
-- appends run in parallel and take positions from a sequence, so positions
-- are strictly increasing but may commit out of order (and an aborted
-- append leaves a hole). Readers of $all therefore read only up to a
-- low-water mark below which every position is settled (committed or
-- aborted): events_safe_position() below.

CREATE SEQUENCE events_position_seq AS bigint START 1 NO CYCLE;

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
    -- Reading a stream in order, finding its head, and optimistic concurrency.
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

-- The low-water mark uses two kinds of advisory lock (keys are per database):
-- * the gate, key 7018697727012175875 (0x6167_6c65_6467_0003), a mutex held
--   for microseconds: by an appender while it takes a block of positions and
--   marks it, by a reader while it computes the mark; so no appender is ever
--   between "has positions" and "has marked them" when a mark is computed;
-- * a transaction-level shared lock keyed by the first position of an
--   appending transaction (keys below 2^62 are positions), held until it
--   commits or aborts: the in-flight marker that readers find in pg_locks.

-- Takes `n` consecutive positions for the calling transaction, marks them in
-- flight and returns the first. The gate makes nextval + setval a block no
-- other appender can interleave with. Session locks survive errors, so the
-- gate is released on every path.
CREATE FUNCTION events_reserve(n integer) RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    first bigint;
BEGIN
    BEGIN
        PERFORM pg_advisory_lock(7018697727012175875);
        first := nextval('events_position_seq');
        IF n > 1 THEN
            PERFORM setval('events_position_seq', first + n - 1);
        END IF;
        PERFORM pg_advisory_xact_lock_shared(first);
    EXCEPTION WHEN OTHERS OR query_canceled THEN
        -- Harmless (a warning) when the lock was never granted.
        PERFORM pg_advisory_unlock(7018697727012175875);
        RAISE;
    END;
    PERFORM pg_advisory_unlock(7018697727012175875);
    RETURN first;
END;
$$;

-- The low-water mark: the largest position P such that no event with a
-- position <= P can still commit. Every position up to it belongs to a
-- transaction that has finished, so a snapshot taken afterwards sees all of
-- them that committed.
CREATE FUNCTION events_safe_position() RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    in_flight bigint;
    allocated bigint;
BEGIN
    BEGIN
        PERFORM pg_advisory_lock(7018697727012175875);
        SELECT min((l.classid::bigint << 32) | l.objid::bigint) INTO in_flight
        FROM pg_locks l
        WHERE l.locktype = 'advisory' AND l.objsubid = 1 AND l.granted AND l.mode = 'ShareLock'
          AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
          AND l.classid::bigint < 1073741824;  -- keys below 2^62 are positions
        SELECT CASE WHEN is_called THEN last_value ELSE 0 END INTO allocated FROM events_position_seq;
    EXCEPTION WHEN OTHERS OR query_canceled THEN
        -- A gate left held by a pooled connection would stop every append.
        PERFORM pg_advisory_unlock(7018697727012175875);
        RAISE;
    END;
    PERFORM pg_advisory_unlock(7018697727012175875);
    RETURN coalesce(in_flight - 1, allocated);
END;
$$;

-- The position of the last event at or below the low-water mark (0 if none):
-- the head a reader can rely on. Positions taken by aborted appends are not
-- events, so they never count as a head that readers lag behind.
CREATE FUNCTION events_head_position() RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    safe bigint;
BEGIN
    safe := events_safe_position();
    RETURN (SELECT coalesce(max(global_position), 0) FROM events WHERE global_position <= safe);
END;
$$;

-- Up to `max_events` events from position `from_position` on, never past the
-- low-water mark. PL/pgSQL runs each statement with a fresh snapshot in READ
-- COMMITTED, so the read sees everything settled when the mark was taken;
-- under a stricter isolation the snapshot would be older, hence the check.
CREATE FUNCTION events_read_all(from_position bigint, max_events integer) RETURNS SETOF events
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    safe bigint;
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'events_read_all needs READ COMMITTED, not %', current_setting('transaction_isolation');
    END IF;
    safe := events_safe_position();
    RETURN QUERY
        SELECT * FROM events
        WHERE global_position >= from_position AND global_position <= safe
        ORDER BY global_position
        LIMIT max_events;
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
-- setval in events_reserve needs UPDATE on the sequence. Stored events stay
-- untouchable, but a role that bypasses events_reserve (setval backwards, or
-- an INSERT at a position it did not reserve) could place an event where
-- readers of $all have already passed: the service must append only through
-- the store. SECURITY DEFINER functions would take this away from the role;
-- measured at ~5 % of append throughput, not done yet (see ARCHITECTURE.md).
GRANT USAGE, SELECT, UPDATE ON SEQUENCE events_position_seq TO agentledger_service;
GRANT EXECUTE ON FUNCTION events_reserve(integer), events_safe_position(), events_head_position(),
    events_read_all(bigint, integer)
    TO agentledger_service;
