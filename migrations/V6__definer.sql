-- The service role appends through one function and signs nothing itself
-- (issue #12).
--
-- Before this, the service role held INSERT on events and UPDATE on the
-- position sequence: it could not change a stored event, but code that
-- bypassed the store could insert at a position of its choosing or move
-- the sequence back, placing an event below the mark readers of $all had
-- already passed. Now reserving positions and inserting rows happen only
-- inside events_append, a SECURITY DEFINER function owned by the migration
-- role, which takes the positions itself; the service role keeps SELECT.

CREATE FUNCTION events_append(
    stream_ids text[], stream_versions bigint[], event_ids uuid[], event_types text[],
    schema_versions integer[], payloads jsonb[], metadatas jsonb[],
    recorded_ats timestamptz[], hash_versions smallint[], prev_hashes bytea[], hashes bytea[]
) RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
-- A definer function must not resolve names through the caller's path.
SET search_path FROM CURRENT
AS $$
DECLARE
    first bigint;
BEGIN
    -- PL/pgSQL keeps the insert's plan for the session (an SQL function
    -- that is not inlined would plan it on every call).
    first := events_reserve(cardinality(stream_ids));
    INSERT INTO events (global_position, stream_id, stream_version, event_id, event_type,
        schema_version, payload, metadata, recorded_at, hash_version, prev_hash, hash)
    SELECT first + r.n - 1, r.stream_id, r.stream_version, r.event_id, r.event_type,
        r.schema_version, r.payload, r.metadata, r.recorded_at, r.hash_version,
        r.prev_hash, r.hash
    FROM unnest(stream_ids, stream_versions, event_ids, event_types, schema_versions,
            payloads, metadatas, recorded_ats, hash_versions, prev_hashes, hashes)
            WITH ORDINALITY
        AS r(stream_id, stream_version, event_id, event_type, schema_version, payload,
             metadata, recorded_at, hash_version, prev_hash, hash, n);
    RETURN first;
END;
$$;

REVOKE ALL ON FUNCTION events_append(text[], bigint[], uuid[], text[], integer[], jsonb[],
    jsonb[], timestamptz[], smallint[], bytea[], bytea[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION events_append(text[], bigint[], uuid[], text[], integer[], jsonb[],
    jsonb[], timestamptz[], smallint[], bytea[], bytea[]) TO agentledger_service;

-- events_reserve moves the sequence: only events_append (as the owner) may.
REVOKE INSERT ON events FROM agentledger_service;
REVOKE UPDATE ON SEQUENCE events_position_seq FROM agentledger_service;
REVOKE EXECUTE ON FUNCTION events_reserve(integer) FROM agentledger_service, PUBLIC;

-- The digest signing key: the service reads the public halves only. The
-- secret half is read, and keys are created and rotated, with the owner
-- role (serve holds a small pool of it for signing; `agentledger digest`).
REVOKE SELECT, INSERT, UPDATE ON ledger_keys FROM agentledger_service;
GRANT SELECT (key_id, algorithm, public_key, created_at, retired_at) ON ledger_keys
    TO agentledger_service;
