-- name: migrate_lock
-- Serialise migrations across processes for this transaction.
SELECT pg_advisory_xact_lock(%s);

-- name: create_meta
-- Bootstrap: the schema, the settings table and the migration log.
CREATE SCHEMA IF NOT EXISTS ango;
CREATE TABLE IF NOT EXISTS ango.meta (key text PRIMARY KEY, value text NOT NULL);
CREATE TABLE IF NOT EXISTS ango.schema_migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);

-- name: set_partitions
-- Record the partition count the first time only.
INSERT INTO ango.meta (key, value) VALUES ('partitions', %s) ON CONFLICT (key) DO NOTHING;

-- name: get_partitions
-- The partition count fixed at creation.
SELECT value FROM ango.meta WHERE key = 'partitions';

-- name: applied_migrations
-- Versions already applied.
SELECT version FROM ango.schema_migrations;

-- name: record_migration
-- Mark a migration applied.
INSERT INTO ango.schema_migrations (version, name) VALUES (%s, %s);

-- name: ensure_client
-- Register a client on its first batch.
INSERT INTO ango.clients (id) VALUES (%s) ON CONFLICT (id) DO NOTHING;

-- name: insert_batch
-- Create a batch; its codes follow by COPY in the same transaction.
INSERT INTO ango.batches (id, client_id, name, rules) VALUES (%s, %s, %s, %s) RETURNING key;

-- name: copy_codes
-- Stream a batch's codes (text format: code, batch key, seq).
COPY ango.codes (code, batch_key, seq) FROM STDIN;

-- name: set_batch_total
-- Record how many codes the import brought.
UPDATE ango.batches SET total = %s WHERE key = %s;

-- name: insert_lease_cursor
-- Leasing starts at seq 0 of the new batch.
INSERT INTO ango.lease_cursors (batch_key, total) VALUES (%s, %s);

-- name: find_code
-- Which batch already holds a code.
SELECT b.id FROM ango.codes c JOIN ango.batches b ON b.key = c.batch_key WHERE c.code = %s;

-- name: list_batches
-- Every batch with its counts; available = total - issued.
SELECT b.id, b.name, b.client_id, b.rules, b.expired, b.total,
       (SELECT count(*) FROM ango.issues i WHERE i.batch_key = b.key) AS issued,
       b.created_at
FROM ango.batches b
ORDER BY b.created_at, b.key;

-- name: lock_batch_for_expiry
-- FOR UPDATE waits for every group commit holding FOR KEY SHARE on the batch,
-- so once expiry commits no claim of the batch can commit (I5).
SELECT key, expired FROM ango.batches WHERE id = %s FOR UPDATE;

-- name: expire_batch
-- Mark a batch expired (idempotent) and drop its leases: nothing more is issued.
WITH gone AS (DELETE FROM ango.leases WHERE batch_key = %(key)s)
UPDATE ango.batches SET expired = true, expired_at = coalesce(expired_at, now())
WHERE key = %(key)s;
