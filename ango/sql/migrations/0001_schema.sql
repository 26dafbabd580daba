-- The whole schema of Ango. Idempotent: every statement may run again.
-- The number of code partitions is read from ango.meta ('partitions'),
-- written by `ango migrate` before this file runs; it never changes afterwards.

CREATE TABLE IF NOT EXISTS ango.clients (
    id          uuid PRIMARY KEY,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS ango.batches (
    id          uuid PRIMARY KEY,
    -- A small surrogate key keeps the per-code indexes narrow.
    key         integer GENERATED ALWAYS AS IDENTITY UNIQUE,
    client_id   uuid NOT NULL REFERENCES ango.clients (id),
    name        text NOT NULL,
    rules       jsonb,
    expired     boolean NOT NULL DEFAULT false,
    expired_at  timestamptz,
    total       bigint NOT NULL DEFAULT 0,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Identifiers compare byte-wise (COLLATE "C"): codes, customers and request ids
-- are opaque strings, and byte-wise btree comparisons make imports and issues
-- markedly faster than a linguistic collation.

-- Codes are immutable once imported. `seq` numbers a batch's codes 1..total in
-- file order, so a lease is a range of seq: one row written, not thousands.
DO $$
DECLARE
    parts integer := (SELECT value::integer FROM ango.meta WHERE key = 'partitions');
BEGIN
    IF to_regclass('ango.codes') IS NULL THEN
        CREATE TABLE ango.codes (
            code       text    COLLATE "C" NOT NULL,
            batch_key  integer NOT NULL,
            seq        bigint  NOT NULL,
            PRIMARY KEY (code)
        ) PARTITION BY HASH (code);
        FOR i IN 0 .. parts - 1 LOOP
            EXECUTE format(
                'CREATE TABLE ango.codes_p%s PARTITION OF ango.codes '
                'FOR VALUES WITH (MODULUS %s, REMAINDER %s)', i, parts, i);
        END LOOP;
        CREATE INDEX codes_batch_seq ON ango.codes (batch_key, seq);
    END IF;
END
$$;

-- How far each batch's seq has been handed out in leases.
CREATE TABLE IF NOT EXISTS ango.lease_cursors (
    batch_key    integer PRIMARY KEY,
    leased_upto  bigint NOT NULL DEFAULT 0,
    total        bigint NOT NULL
);

-- One row per shard process incarnation; a stale heartbeat means it is dead.
CREATE TABLE IF NOT EXISTS ango.owners (
    id          uuid PRIMARY KEY,
    instance    uuid NOT NULL,
    shard       integer NOT NULL,
    pid         integer NOT NULL,
    host        text NOT NULL,
    parts       integer[] NOT NULL DEFAULT '{}',
    started_at  timestamptz NOT NULL DEFAULT now(),
    heartbeat   timestamptz NOT NULL DEFAULT now()
);

-- A block of codes (seq in (lo, hi]) held in memory by an owner. A lease row
-- exists while any code in its range may be unissued; a successor recovers it.
CREATE TABLE IF NOT EXISTS ango.leases (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    owner       uuid NOT NULL,
    batch_key   integer NOT NULL,
    lo          bigint NOT NULL,
    hi          bigint NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS leases_owner ON ango.leases (owner);
CREATE INDEX IF NOT EXISTS leases_batch ON ango.leases (batch_key);

-- Append-only record of every issued code. The primary key is I1; the unique
-- (batch, request id) is I6.
CREATE TABLE IF NOT EXISTS ango.issues (
    code         text COLLATE "C" PRIMARY KEY,
    batch_key    integer NOT NULL,
    customer_id  text COLLATE "C" NOT NULL,
    request_id   text COLLATE "C" NOT NULL,
    issued_at    timestamptz NOT NULL DEFAULT now(),
    -- The rule slot taken, for a batch whose rule has no window: the partial
    -- unique index below is then the whole of I4, in the same row as the issue.
    slot         integer,
    UNIQUE (batch_key, request_id)
);
CREATE UNIQUE INDEX IF NOT EXISTS issues_rule_slot
    ON ango.issues (batch_key, customer_id, slot) WHERE slot IS NOT NULL;

-- Rule slots of batches whose rule has a window (I4): a batch with
-- maxpercustomer N has slots 0..N-1 per customer; a slot is taken again only
-- once its last issue is older than the window.
CREATE TABLE IF NOT EXISTS ango.slots (
    batch_key    integer NOT NULL,
    customer_id  text COLLATE "C" NOT NULL,
    slot         integer NOT NULL,
    code         text COLLATE "C" NOT NULL,
    issued_at    timestamptz NOT NULL,
    PRIMARY KEY (batch_key, customer_id, slot)
);
