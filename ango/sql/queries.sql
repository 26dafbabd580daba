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

-- name: connection_budget
-- What bounds the connections we may open: the server's max_connections less
-- its reserved slots, the login role's and the database's CONNECTION LIMIT
-- (-1: none), and the client connections already open against each (this
-- one not counted). Superusers may use the reserved slots and ignore the
-- role and database limits.
SELECT current_setting('max_connections')::integer,
       current_setting('superuser_reserved_connections')::integer
           + coalesce(current_setting('reserved_connections', true)::integer, 0),
       r.rolsuper, r.rolconnlimit, d.datconnlimit,
       count(a.pid),
       count(a.pid) FILTER (WHERE a.usename = session_user),
       count(a.pid) FILTER (WHERE a.datname = current_database())
FROM pg_roles r
JOIN pg_database d ON d.datname = current_database()
LEFT JOIN pg_stat_activity a
       ON a.backend_type = 'client backend' AND a.pid <> pg_backend_pid()
WHERE r.rolname = session_user
GROUP BY r.rolsuper, r.rolconnlimit, d.datconnlimit;

-- name: applied_migrations
-- Versions already applied.
SELECT version FROM ango.schema_migrations;

-- name: record_migration
-- Mark a migration applied.
INSERT INTO ango.schema_migrations (version, name) VALUES (%s, %s);

-- name: ensure_client
-- Register a client on its first batch.
INSERT INTO ango.clients (id) VALUES (%s) ON CONFLICT (id) DO NOTHING;

-- name: import_try_lock
-- Take the import lock if no other import holds it (true), without waiting.
SELECT pg_try_advisory_xact_lock(%s);

-- name: import_lock
-- Imports run one at a time: two that share codes would otherwise each wait on a code the other inserted.
SELECT pg_advisory_xact_lock(%s);

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
-- Every batch (of one client, unless %(client)s is null) with its counts;
-- available = total - issued.
SELECT b.id, b.name, b.client_id, b.rules, b.expired, b.total,
       (SELECT count(*) FROM ango.issues i WHERE i.batch_key = b.key) AS issued,
       b.created_at, b.starts_at, b.expires_at
FROM ango.batches b
WHERE %(client)s::uuid IS NULL OR b.client_id = %(client)s::uuid
ORDER BY b.created_at, b.key;

-- name: lock_batch_for_expiry
-- FOR UPDATE waits for every group commit holding FOR KEY SHARE on the batch,
-- so once expiry commits no claim of the batch can commit (I5).
-- A batch of another client than %(client)s (when not null) is not found.
SELECT key, expired FROM ango.batches
WHERE id = %(id)s AND (%(client)s::uuid IS NULL OR client_id = %(client)s::uuid)
FOR UPDATE;

-- name: expire_batch
-- Mark a batch expired (idempotent) and drop its leases: nothing more is issued.
WITH gone AS (DELETE FROM ango.leases WHERE batch_key = %(key)s)
UPDATE ango.batches SET expired = true, expired_at = coalesce(expired_at, clock_timestamp())
WHERE key = %(key)s;

-- name: batch_meta
-- What a shard needs to know of batches it sees claims for (a batch past its
-- scheduled end is expired).
SELECT id, key, client_id, rules, expired OR coalesce(expires_at <= now(), false)
FROM ango.batches WHERE id = ANY(%s);

-- name: register_owner
-- A shard process announces itself; its heartbeat keeps its leases.
INSERT INTO ango.owners (id, instance, shard, pid, host, parts) VALUES (%s, %s, %s, %s, %s, %s);

-- name: heartbeat
-- Still alive; no row updated means another process reaped us.
UPDATE ango.owners SET heartbeat = now() WHERE id = %s;

-- name: adopt_leases
-- Take over the leases of our own previous incarnation (the supervisor saw it
-- exit) and of any owner whose heartbeat is stale or which is gone.
UPDATE ango.leases SET owner = %(me)s
WHERE owner <> %(me)s
  AND (owner IN (SELECT id FROM ango.owners
                 WHERE instance = %(instance)s AND shard = %(shard)s AND id <> %(me)s)
       OR owner NOT IN (SELECT id FROM ango.owners
                        WHERE heartbeat > now() - make_interval(secs => %(stale)s)))
RETURNING id, batch_key, lo, hi;

-- name: forget_dead_owners
-- Owner rows whose leases have been adopted.
DELETE FROM ango.owners
WHERE id <> %(me)s
  AND ((instance = %(instance)s AND shard = %(shard)s)
       OR heartbeat < now() - make_interval(secs => %(stale)s));

-- name: retire_owner
-- Clean shutdown: our leases become adoptable at once.
DELETE FROM ango.owners WHERE id = %s;

-- name: lease_block
-- Advance a batch's cursor by up to n codes (fewer near the end, so the last
-- codes spread over the shards) and record the block as our lease. One row per
-- code with the block's size; the codes may be fewer than the size (a row with
-- a null code when none): a statement that waited for the cursor's row lock
-- while a top-up committed sees the new cursor but not the new codes (its
-- snapshot predates them), so the caller then reads the block again.
WITH cur AS (
    SELECT batch_key, leased_upto, total FROM ango.lease_cursors
    WHERE batch_key = %(key)s FOR UPDATE
), adv AS (
    UPDATE ango.lease_cursors c
    SET leased_upto = LEAST(cur.leased_upto
                            + GREATEST(LEAST(%(n)s, (cur.total - cur.leased_upto) / %(split)s),
                                       %(min)s),
                            cur.total)
    FROM cur
    WHERE c.batch_key = cur.batch_key AND cur.leased_upto < cur.total
    RETURNING cur.leased_upto AS lo, c.leased_upto AS hi
), lease AS (
    INSERT INTO ango.leases (owner, batch_key, lo, hi)
    SELECT %(me)s, %(key)s, lo, hi FROM adv
    RETURNING id, lo, hi
)
SELECT lease.id, c.code, lease.hi - lease.lo
FROM lease LEFT JOIN ango.codes c
  ON c.batch_key = %(key)s AND c.seq > lease.lo AND c.seq <= lease.hi;

-- name: steal_lease
-- The cursor is exhausted: take another owner's lease of the batch (I7).
-- Its old holder can no longer issue from it (the issue statement checks owner).
WITH victim AS (
    SELECT id FROM ango.leases
    WHERE batch_key = %(key)s AND owner <> %(me)s
    ORDER BY id LIMIT 1
    FOR UPDATE SKIP LOCKED
)
UPDATE ango.leases l SET owner = %(me)s FROM victim WHERE l.id = victim.id
RETURNING l.id;

-- name: other_leases_exist
-- Whether any other owner still holds a lease of the batch.
SELECT EXISTS (SELECT 1 FROM ango.leases WHERE batch_key = %(key)s AND owner <> %(me)s);

-- name: unissued_codes_of_leases
-- The codes of adopted or stolen leases that are still unissued.
SELECT l.id, l.batch_key, c.code
FROM ango.leases l
JOIN ango.codes c ON c.batch_key = l.batch_key AND c.seq > l.lo AND c.seq <= l.hi
WHERE l.id = ANY(%s)
  AND NOT EXISTS (SELECT 1 FROM ango.issues i WHERE i.code = c.code);

-- name: delete_leases
-- Leases whose codes have all been issued (or that are not worth keeping).
DELETE FROM ango.leases WHERE id = ANY(%s) AND owner = %s;

-- name: issue_group
-- One group commit, a single autocommitted call: the fast path, and on a
-- conflict the careful path, are in the function (migration 0006).
-- Rows: (1, code, epoch of the issue) for each code issued, (2, code, NULL) for
-- each windowed slot taken.
WITH g AS (
    SELECT * FROM ango.issue_group_v1(
        %(me)s, %(spent)s, %(batch_keys)s, %(codes)s, %(bkeys)s, %(customers)s, %(requests)s,
        %(leases)s, %(slots)s, %(window_slots)s)
)
SELECT 1, unnest(issued), epoch FROM g
UNION ALL
SELECT 2, unnest(taken), NULL FROM g;

-- name: release_phantom_slots
-- A slot taken for a code that a concurrent transaction issued first (a race
-- between two owners) is given back.
DELETE FROM ango.slots s
USING unnest(%s::integer[], %s::text[], %s::integer[], %s::text[])
      AS u(batch_key, customer_id, slot, code)
WHERE s.batch_key = u.batch_key AND s.customer_id = u.customer_id
  AND s.slot = u.slot AND s.code = u.code;

-- name: issued_among
-- Which of these codes are issued.
SELECT code FROM ango.issues WHERE code = ANY(%s);

-- name: expired_batches
-- Which of these batches are expired or past their end ('expired'), or not
-- started yet ('not_started'); and the rules of each (a claim refused for a
-- stale rule is retried under the current one).
SELECT key,
       CASE WHEN expired OR expires_at <= now() THEN 'expired'
            WHEN starts_at > now() THEN 'not_started' END,
       rules
FROM ango.batches WHERE key = ANY(%s);

-- name: issued_by_request
-- Earlier outcomes of retried requests (I6).
SELECT i.batch_key, i.request_id, i.code, i.customer_id
FROM ango.issues i
JOIN unnest(%s::integer[], %s::text[]) AS u(batch_key, request_id)
  ON i.batch_key = u.batch_key AND i.request_id = u.request_id;

-- name: leases_still_mine
-- Which of these leases we still own.
SELECT id FROM ango.leases WHERE id = ANY(%s) AND owner = %s;

-- name: customer_slots
-- The rule slots of customers whose in-memory counter was missing or stale:
-- windowed slots from ango.slots, fixed ones from ango.issues.
SELECT s.batch_key, s.customer_id, s.slot, extract(epoch FROM s.issued_at)::float8
FROM ango.slots s
JOIN unnest(%(keys)s::integer[], %(customers)s::text[]) AS u(batch_key, customer_id)
  ON s.batch_key = u.batch_key AND s.customer_id = u.customer_id
UNION ALL
SELECT i.batch_key, i.customer_id, i.slot, extract(epoch FROM i.issued_at)::float8
FROM ango.issues i
JOIN unnest(%(keys)s::integer[], %(customers)s::text[]) AS u(batch_key, customer_id)
  ON i.batch_key = u.batch_key AND i.customer_id = u.customer_id AND i.slot IS NOT NULL;

-- name: audit_issued_codes_exist
-- I1: every issue names a code of its own batch.
SELECT i.code FROM ango.issues i
LEFT JOIN ango.codes c ON c.code = i.code AND c.batch_key = i.batch_key
WHERE c.code IS NULL LIMIT 10;

-- name: audit_orphaned_codes
-- I3: an unissued code that was leased out must be in a lease held by an owner
-- whose heartbeat is fresh (%s seconds), or released by a retired owner (then
-- any shard adopts it at once); codes of expired batches do not count.
SELECT c.code, b.id FROM ango.codes c
JOIN ango.batches b ON b.key = c.batch_key AND NOT b.expired
                   AND (b.expires_at IS NULL OR b.expires_at > now())
JOIN ango.lease_cursors lc ON lc.batch_key = c.batch_key AND c.seq <= lc.leased_upto
WHERE NOT EXISTS (SELECT 1 FROM ango.issues i WHERE i.code = c.code)
  AND NOT EXISTS (
      SELECT 1 FROM ango.leases l LEFT JOIN ango.owners o ON o.id = l.owner
      WHERE l.batch_key = c.batch_key AND c.seq > l.lo AND c.seq <= l.hi
        AND (o.id IS NULL OR o.heartbeat > now() - make_interval(secs => %s)))
LIMIT 10;

-- name: audit_rules
-- I4: no customer holds more codes of a batch than its rule allows in any
-- window: with a limit of N, the N-th issue after any issue must fall outside
-- the window that starts at it (any N+1 issues are too many without a window).
SELECT id, customer_id, issued_at FROM (
    SELECT b.id, i.customer_id, i.issued_at,
           lead(i.issued_at, (b.rules ->> 'maxpercustomer')::integer)
               OVER (PARTITION BY i.batch_key, i.customer_id ORDER BY i.issued_at) AS nth,
           -- 24-hour days, as the claim statements count them.
           (b.rules ->> 'timelimit')::integer * interval '24 hours' AS win,
           b.rules_changed_at
    FROM ango.issues i
    JOIN ango.batches b ON b.key = i.batch_key AND b.rules ? 'maxpercustomer'
) x
-- The issue that made one too many is judged by the rules in force when it was
-- made: those after the last rule change (`ango rules`), all of them otherwise.
WHERE nth IS NOT NULL AND (win IS NULL OR nth - issued_at <= win)
  AND (rules_changed_at IS NULL OR nth > rules_changed_at)
LIMIT 10;

-- name: audit_slots
-- I4's records agree: every taken rule slot holds a code issued to that customer.
SELECT s.batch_key, s.customer_id, s.code FROM ango.slots s
LEFT JOIN ango.issues i ON i.code = s.code AND i.customer_id = s.customer_id
WHERE i.code IS NULL LIMIT 10;

-- name: audit_expired
-- I5: nothing of an expired batch was issued after its expiry committed.
-- With a schedule: nothing issued before its start or at or after its end.
SELECT b.id, count(*) FROM ango.issues i JOIN ango.batches b ON b.key = i.batch_key
WHERE (b.expired AND i.issued_at > b.expired_at)
   OR i.issued_at < b.starts_at OR i.issued_at >= b.expires_at
GROUP BY b.id LIMIT 10;

-- name: lookup_code
-- Who has a code: its batch and, if issued, to whom, when and for which
-- request. Issues are read even without the code row (a purged batch's codes
-- leave nothing behind; a deleted batch keeps its issued codes).
SELECT b.id, b.name, b.client_id, b.expired OR coalesce(b.expires_at <= now(), false),
       i.customer_id, i.issued_at, i.request_id
FROM (SELECT %(code)s::text COLLATE "C" AS code) q
LEFT JOIN ango.codes c ON c.code = %(code)s
LEFT JOIN ango.issues i ON i.code = %(code)s
LEFT JOIN ango.batches b ON b.key = coalesce(c.batch_key, i.batch_key);

-- name: customer_codes
-- A customer's codes, newest first, optionally of one batch (index
-- issues_customer_slot finds them; a customer's few codes are then sorted).
SELECT i.code, b.id, b.name, i.issued_at, i.request_id
FROM ango.issues i JOIN ango.batches b ON b.key = i.batch_key
WHERE i.customer_id = %(customer)s
  AND (%(batch)s::uuid IS NULL OR b.id = %(batch)s::uuid)
ORDER BY i.issued_at DESC, i.code
LIMIT %(limit)s;

-- name: export_batch
-- The batch an export reads, and how many rows each kind of export will have
-- (for the progress display).
SELECT b.key, b.total, (SELECT count(*) FROM ango.issues i WHERE i.batch_key = b.key)
FROM ango.batches b WHERE b.id = %s;

-- name: export_issued_csv
-- A batch's issued codes as CSV with a header, oldest issue first.
COPY (SELECT * FROM ango.issued_codes(%s)) TO STDOUT WITH (FORMAT csv, HEADER);

-- name: export_available_csv
-- A batch's unissued codes as CSV with a header, in import order.
COPY (SELECT * FROM ango.available_codes(%s)) TO STDOUT WITH (FORMAT csv, HEADER);

-- name: export_issued_jsonl
-- The same rows as JSON objects, one a line. CSV with a delimiter and a quote
-- that JSON text never holds (it escapes control characters) writes each
-- object verbatim, where the text format would double its backslashes.
COPY (SELECT row_to_json(e) FROM (SELECT * FROM ango.issued_codes(%s)) e)
TO STDOUT WITH (FORMAT csv, DELIMITER E'\x02', QUOTE E'\x01');

-- name: export_available_jsonl
-- As export_issued_jsonl, for the unissued codes.
COPY (SELECT row_to_json(e) FROM (SELECT * FROM ango.available_codes(%s)) e)
TO STDOUT WITH (FORMAT csv, DELIMITER E'\x02', QUOTE E'\x01');

-- name: batch_for_top_up
-- The batch a top-up adds to, and its client (checked against the file).
SELECT key, client_id FROM ango.batches WHERE id = %s;

-- name: lock_batch_for_top_up
-- FOR NO KEY UPDATE: group commits (FOR KEY SHARE) go on meanwhile; another
-- top-up, an expiry, a rule or schedule change (FOR UPDATE) waits. New codes
-- are numbered after `total`.
SELECT key, client_id, total, expired OR coalesce(expires_at <= clock_timestamp(), false)
FROM ango.batches WHERE id = %s FOR NO KEY UPDATE;

-- name: grow_batch
-- A top-up's codes join the batch and its lease cursor: leasing resumes.
WITH cursor AS (
    UPDATE ango.lease_cursors SET total = total + %(added)s WHERE batch_key = %(key)s
)
UPDATE ango.batches SET total = total + %(added)s WHERE key = %(key)s;

-- name: lock_batch_for_change
-- A rule or schedule change: FOR UPDATE waits for the group commits holding the
-- batch FOR KEY SHARE and holds new ones until the change commits, so every
-- claim committed afterwards is judged by the new values.
SELECT key, expired, starts_at, expires_at FROM ango.batches WHERE id = %s FOR UPDATE;

-- name: db_clock
-- The database's clock, now (not the transaction's start): schedules are
-- judged by the database's time, never a client's.
SELECT clock_timestamp();

-- name: set_batch_schedule
-- A batch's start and end (NULL: none).
UPDATE ango.batches SET starts_at = %(starts_at)s, expires_at = %(expires_at)s
WHERE key = %(key)s;

-- name: set_batch_rules
-- New rules, and when they took over (the audit judges later issues by them).
UPDATE ango.batches SET rules = %(rules)s, rules_changed_at = clock_timestamp()
WHERE key = %(key)s;

-- name: clear_rule_slots
-- Before the rule slots of a batch are rebuilt for its new rules.
WITH cleared AS (DELETE FROM ango.slots WHERE batch_key = %(key)s)
UPDATE ango.issues SET slot = NULL WHERE batch_key = %(key)s AND slot IS NOT NULL;

-- name: number_fixed_slots
-- A rule without a window: each customer's issues take slots 0, 1, 2... in
-- issue order, so one with as many issues as the limit (or more) has every
-- slot below it taken and gets no more.
UPDATE ango.issues i SET slot = n.slot
FROM (SELECT code, (row_number() OVER (PARTITION BY customer_id
                                       ORDER BY issued_at, code) - 1)::integer AS slot
      FROM ango.issues WHERE batch_key = %(key)s) n
WHERE i.code = n.code;

-- name: fill_window_slots
-- A rule with a window: each customer's slots hold their `limit` latest
-- issues, so a slot frees only once fewer than `limit` issues are in the window.
INSERT INTO ango.slots (batch_key, customer_id, slot, code, issued_at)
SELECT batch_key, customer_id, (n - 1)::integer, code, issued_at
FROM (SELECT batch_key, customer_id, code, issued_at,
             row_number() OVER (PARTITION BY customer_id ORDER BY issued_at DESC, code) AS n
      FROM ango.issues WHERE batch_key = %(key)s) r
WHERE n <= %(limit)s;

-- name: lock_batch_for_delete
-- FOR UPDATE: claims of the batch in flight commit (or fail) first. Whether it
-- is over: expired, or past its scheduled end.
SELECT key, expired OR coalesce(expires_at <= clock_timestamp(), false)
FROM ango.batches WHERE id = %s FOR UPDATE;

-- name: delete_unissued
-- `ango delete`: the codes never issued, the leases and the lease cursor go;
-- the issued codes stay with their issues (who got what, for support and
-- finance). The batch is marked expired (at its scheduled end if it had one)
-- and its total shrinks to what was issued.
WITH gone_leases AS (
    DELETE FROM ango.leases WHERE batch_key = %(key)s
), gone_cursor AS (
    DELETE FROM ango.lease_cursors WHERE batch_key = %(key)s
), gone_codes AS (
    DELETE FROM ango.codes c
    WHERE c.batch_key = %(key)s
      AND NOT EXISTS (SELECT 1 FROM ango.issues i WHERE i.code = c.code)
    RETURNING 1
)
UPDATE ango.batches
SET expired = true, expired_at = coalesce(expired_at, expires_at, clock_timestamp()),
    total = total - (SELECT count(*) FROM gone_codes)
WHERE key = %(key)s
RETURNING (SELECT count(*) FROM gone_codes);

-- name: purge_batch
-- `ango delete --purge`: every trace of the batch, issued codes included.
WITH gone_leases AS (
    DELETE FROM ango.leases WHERE batch_key = %(key)s
), gone_cursor AS (
    DELETE FROM ango.lease_cursors WHERE batch_key = %(key)s
), gone_slots AS (
    DELETE FROM ango.slots WHERE batch_key = %(key)s
), gone_issues AS (
    DELETE FROM ango.issues WHERE batch_key = %(key)s RETURNING 1
), gone_codes AS (
    DELETE FROM ango.codes WHERE batch_key = %(key)s RETURNING 1
)
DELETE FROM ango.batches WHERE key = %(key)s
RETURNING (SELECT count(*) FROM gone_codes), (SELECT count(*) FROM gone_issues);

-- name: ping
-- Readiness and outage detection: does the database answer at all.
SELECT 1;

-- name: server_version
-- PostgreSQL's version, for the start-up log line.
SELECT current_setting('server_version');

-- name: available_per_batch
-- Codes left in each unexpired batch (the ango_codes_available gauge).
SELECT b.id, b.name, b.total - (SELECT count(*) FROM ango.issues i WHERE i.batch_key = b.key)
FROM ango.batches b
WHERE NOT b.expired
ORDER BY b.key;
-- name: insert_token
-- A new client-scoped token: only its SHA-256 is stored.
INSERT INTO ango.tokens (name, client_id, hash) VALUES (%s, %s, %s) RETURNING created_at;

-- name: list_tokens
-- Every token, live and revoked, oldest first (never the hash).
SELECT name, client_id, created_at, revoked_at FROM ango.tokens ORDER BY created_at, id;

-- name: revoke_token
-- Revoke the live token of that name; no row when there is none.
UPDATE ango.tokens SET revoked_at = clock_timestamp()
WHERE name = %s AND revoked_at IS NULL RETURNING id;

-- name: live_tokens
-- What the server checks tokens against, reloaded every second.
SELECT id, hash, name, client_id FROM ango.tokens WHERE revoked_at IS NULL;

-- name: routing_slot_count
-- The routing slot space (migration 0007): fixed once created.
SELECT value::integer FROM ango.meta WHERE key = 'routing_slots';

-- name: instance_beat
-- An instance's heartbeat: where it listens, and the session it beats on.
-- Returns whether the row was another live session's until now: two live
-- processes use the same instance name.
WITH before AS (
    SELECT EXISTS (
        SELECT 1 FROM ango.live_instances l JOIN ango.instances i ON i.name = l.name
        WHERE i.name = %(name)s AND i.backend_pid <> pg_backend_pid()) AS taken
)
INSERT INTO ango.instances (name, address, backend_pid, backend_start, heartbeat)
SELECT %(name)s, %(address)s, pid, backend_start, now()
FROM pg_stat_activity WHERE pid = pg_backend_pid()
ON CONFLICT (name) DO UPDATE
SET address = EXCLUDED.address, backend_pid = EXCLUDED.backend_pid,
    backend_start = EXCLUDED.backend_start, heartbeat = EXCLUDED.heartbeat
RETURNING (SELECT taken FROM before);

-- name: live_instances
-- The instances alive now, by name.
SELECT name, address FROM ango.live_instances ORDER BY name;

-- name: routing_map
-- Every routing slot with its owner (NULL: none) and epoch.
SELECT slot, owner, epoch FROM ango.routing_slots ORDER BY slot;

-- name: take_slots
-- Take the slots given that have no live owner. Another instance may take the
-- same slot at once: each row goes to one of them, the other sees it next beat.
UPDATE ango.routing_slots SET owner = %(me)s, epoch = epoch + 1, taken_at = now()
WHERE slot = ANY(%(slots)s)
  AND (owner IS NULL OR owner NOT IN (SELECT name FROM ango.live_instances))
RETURNING slot;

-- name: hand_over_slots
-- Hand slots we own to another instance (after draining their claims in flight).
UPDATE ango.routing_slots SET owner = %(to)s, epoch = epoch + 1, taken_at = now()
WHERE slot = ANY(%(slots)s) AND owner = %(me)s
RETURNING slot;

-- name: release_slots
-- Clean shutdown: every slot we own becomes free at once.
UPDATE ango.routing_slots SET owner = NULL, epoch = epoch + 1, taken_at = now()
WHERE owner = %(me)s;

-- name: leave_cluster
-- Clean shutdown: the instance row goes with its slots.
DELETE FROM ango.instances WHERE name = %(me)s;

-- name: forget_old_instances
-- Rows of instances silent for an hour that own nothing.
DELETE FROM ango.instances
WHERE heartbeat < now() - interval '1 hour'
  AND name NOT IN (SELECT owner FROM ango.routing_slots WHERE owner IS NOT NULL);
