-- The ledger's Merkle tree (design §8 leaves, RFC 6962 nodes), kept as
-- C2SP tlog-tiles keep it so that inclusion and consistency proofs are
-- served from a few tiles instead of from the whole ledger. A tile at
-- level L holds up to 256 consecutive hashes of tree level 8·L, 32 bytes
-- each (level 0: the leaves); only the last tile of each level grows.
-- Derived data, like the read models: the builder writes it from the
-- events, and `agentledger verify` checks the stored tree against them.

CREATE TABLE ledger_tiles (
    level  smallint NOT NULL CHECK (level BETWEEN 0 AND 7),
    idx    bigint   NOT NULL CHECK (idx >= 0),
    hashes bytea    NOT NULL CHECK (octet_length(hashes) BETWEEN 32 AND 8192
                                    AND octet_length(hashes) % 32 = 0),
    PRIMARY KEY (level, idx)
);

-- How far the tiles reach: `size` leaves, the last at `position`. One row;
-- a builder moves it in the same transaction as the tiles, from the size
-- it read (FOR UPDATE), so two nodes cannot both extend the tree.
CREATE TABLE ledger_tree (
    id       boolean PRIMARY KEY DEFAULT true CHECK (id),
    size     bigint NOT NULL CHECK (size >= 0),
    position bigint NOT NULL CHECK (position >= 0)
);
INSERT INTO ledger_tree (size, position) VALUES (0, 0);

-- Positions no event took (an append that aborted after taking them):
-- the leaf index of the event at position P is P - 1 - (holes below P).
CREATE TABLE ledger_tree_holes (
    position bigint PRIMARY KEY
);

GRANT SELECT, INSERT, UPDATE ON ledger_tiles, ledger_tree TO agentledger_service;
GRANT SELECT, INSERT ON ledger_tree_holes TO agentledger_service;
