-- The group commit as one function (issue 12): the fast path, and on a
-- conflict the careful path, in one call, so a shard makes one round trip
-- whichever path its group takes. Versioned: a change makes issue_group_v2 in
-- a new migration, and shards still running the old code keep calling v1.
--
-- Issue each code if its batch is not expired (locked FOR KEY SHARE, so expiry
-- waits for us: I5), its lease is still ours, the code is not issued yet (I1),
-- the request id is new (I6) and the customer's rule slot is free (I4). A rule
-- without a window is held by the unique index on issues (customer, batch,
-- slot); a rule with a window by ango.slots, taken only if free or older than
-- the window. Leases used up by earlier groups are deleted on the way.
--
-- Columns arrive as newline-joined text (none may hold a control character):
-- one parameter each is far cheaper to send than an array of thousands.
-- Returns the codes issued, the codes whose windowed slot was taken (the caller
-- releases a slot whose code was not issued) and the time of the issues.
CREATE OR REPLACE FUNCTION ango.issue_group_v1(
    _me uuid, _spent text, _batch_keys integer[], _codes text, _bkeys text, _customers text,
    _requests text, _leases text, _slots text, _window_slots text,
    OUT issued text[], OUT taken text[], OUT epoch double precision)
LANGUAGE plpgsql AS $fn$
DECLARE
    lease_ids bigint[] := string_to_array(_leases, E'\n')::bigint[];
BEGIN
    IF _spent <> '' THEN
        DELETE FROM ango.leases
        WHERE id = ANY(string_to_array(_spent, E'\n')::bigint[]) AND owner = _me;
    END IF;
    BEGIN
        -- The fast path: a plain INSERT raises on any conflict (a replayed
        -- request id, a customer at the limit whose counter was not in memory,
        -- a code issued elsewhere); its effects are then rolled back to the
        -- block's start and the careful path below runs instead. The conflict
        -- handling costs that path about a third more.
        IF _window_slots !~ '[0-9]' THEN
            -- No rule with a window in the group: without ango.slots (a smaller
            -- plan, cheaper to start for every group). The rule and schedule
            -- come from the row as locked: a rule change or an expiry that
            -- committed while we waited for the lock is what holds. The
            -- group's leases still ours are read once for the group.
            WITH ok AS (
                SELECT key, (rules ->> 'maxpercustomer')::integer AS lim,
                       (rules ->> 'timelimit')::integer * interval '24 hours' AS win
                FROM ango.batches
                WHERE key = ANY(_batch_keys) AND NOT expired
                  AND (starts_at IS NULL OR starts_at <= now())
                  AND (expires_at IS NULL OR expires_at > now())
                FOR KEY SHARE
            ), ins AS (
                INSERT INTO ango.issues (code, batch_key, customer_id, request_id, issued_at, slot)
                SELECT u.code, u.batch_key, u.customer_id, u.request_id, now(), u.slot
                FROM unnest(string_to_array(_codes, E'\n'),
                            string_to_array(_bkeys, E'\n')::integer[],
                            string_to_array(_customers, E'\n'),
                            string_to_array(_requests, E'\n'),
                            lease_ids,
                            string_to_array(_slots, E'\n', '')::integer[])
                     AS u(code, batch_key, customer_id, request_id, lease_id, slot)
                JOIN ok ON ok.key = u.batch_key
                WHERE u.lease_id = ANY(ARRAY(SELECT id FROM ango.leases
                                             WHERE id = ANY(lease_ids) AND owner = _me))
                  AND CASE WHEN ok.lim IS NULL THEN u.slot IS NULL
                           WHEN ok.win IS NULL THEN u.slot < ok.lim END
                RETURNING code
            )
            SELECT array_agg(code) INTO issued FROM ins;
        ELSE
            WITH ok AS (
                -- The rule and schedule come from the row as locked: a rule change or
                -- an expiry that committed while we waited for the lock is what holds.
                SELECT key, (rules ->> 'maxpercustomer')::integer AS lim,
                       -- timelimit days of 24 hours (see the slot upsert below)
                       (rules ->> 'timelimit')::integer * interval '24 hours' AS win
                FROM ango.batches
                WHERE key = ANY(_batch_keys) AND NOT expired
                  AND (starts_at IS NULL OR starts_at <= now())
                  AND (expires_at IS NULL OR expires_at > now())
                FOR KEY SHARE
            ), mine AS (
                -- Which of the group's leases are still ours, read once for the group.
                SELECT id FROM ango.leases WHERE id = ANY(lease_ids) AND owner = _me
            ), req AS (
                SELECT u.*
                FROM unnest(string_to_array(_codes, E'\n'),
                            string_to_array(_bkeys, E'\n')::integer[],
                            string_to_array(_customers, E'\n'),
                            string_to_array(_requests, E'\n'),
                            lease_ids,
                            string_to_array(_slots, E'\n', '')::integer[],
                            string_to_array(_window_slots, E'\n', '')::integer[])
                     AS u(code, batch_key, customer_id, request_id, lease_id, slot, window_slot)
                JOIN ok ON ok.key = u.batch_key
                WHERE u.lease_id = ANY(ARRAY(SELECT id FROM mine))
                  -- The slot fits the rule as it is now (a shard's cached rule may be
                  -- stale after `ango rules`: its claim is then refused and retried).
                  AND CASE WHEN ok.lim IS NULL THEN u.slot IS NULL AND u.window_slot IS NULL
                           WHEN ok.win IS NULL THEN u.window_slot IS NULL AND u.slot < ok.lim
                           ELSE u.slot IS NULL AND u.window_slot < ok.lim END
            ), slot AS (
                INSERT INTO ango.slots AS s (batch_key, customer_id, slot, code, issued_at)
                SELECT batch_key, customer_id, window_slot, code, now() FROM req
                WHERE window_slot IS NOT NULL
                ON CONFLICT (batch_key, customer_id, slot) DO UPDATE
                    SET code = EXCLUDED.code, issued_at = EXCLUDED.issued_at
                    -- timelimit days of 24 hours: calendar days would follow the
                    -- session's TimeZone through daylight-saving changes (counters
                    -- and audit agree).
                    WHERE s.issued_at < EXCLUDED.issued_at - (
                        SELECT win FROM ok WHERE ok.key = EXCLUDED.batch_key)
                RETURNING code
            ), ins AS (
                INSERT INTO ango.issues (code, batch_key, customer_id, request_id, issued_at, slot)
                SELECT code, batch_key, customer_id, request_id, now(), slot FROM req
                WHERE window_slot IS NULL OR code IN (SELECT code FROM slot)
                RETURNING code
            )
            -- No joins: they go quadratic on CTEs.
            SELECT (SELECT array_agg(code) FROM ins), (SELECT array_agg(code) FROM slot)
            INTO issued, taken;
        END IF;
    EXCEPTION WHEN unique_violation THEN
        -- The careful path: conflicting claims are skipped, not raised; the
        -- caller explains each one from committed state.
        WITH ok AS (
            SELECT key, (rules ->> 'maxpercustomer')::integer AS lim,
                   (rules ->> 'timelimit')::integer * interval '24 hours' AS win
            FROM ango.batches
            WHERE key = ANY(_batch_keys) AND NOT expired
              AND (starts_at IS NULL OR starts_at <= now())
              AND (expires_at IS NULL OR expires_at > now())
            FOR KEY SHARE
        ), mine AS (
            SELECT id FROM ango.leases WHERE id = ANY(lease_ids) AND owner = _me
        ), req AS (
            SELECT u.*
            FROM unnest(string_to_array(_codes, E'\n'),
                        string_to_array(_bkeys, E'\n')::integer[],
                        string_to_array(_customers, E'\n'),
                        string_to_array(_requests, E'\n'),
                        lease_ids,
                        string_to_array(_slots, E'\n', '')::integer[],
                        string_to_array(_window_slots, E'\n', '')::integer[])
                 AS u(code, batch_key, customer_id, request_id, lease_id, slot, window_slot)
            JOIN ok ON ok.key = u.batch_key
            WHERE u.lease_id = ANY(ARRAY(SELECT id FROM mine))
              AND CASE WHEN ok.lim IS NULL THEN u.slot IS NULL AND u.window_slot IS NULL
                       WHEN ok.win IS NULL THEN u.window_slot IS NULL AND u.slot < ok.lim
                       ELSE u.slot IS NULL AND u.window_slot < ok.lim END
              -- A windowed slot is taken before the issue: skip what would conflict.
              AND (u.window_slot IS NULL
                   OR (NOT EXISTS (SELECT 1 FROM ango.issues i WHERE i.code = u.code)
                       AND NOT EXISTS (SELECT 1 FROM ango.issues i
                                       WHERE i.batch_key = u.batch_key
                                         AND i.request_id = u.request_id)))
        ), slot AS (
            INSERT INTO ango.slots AS s (batch_key, customer_id, slot, code, issued_at)
            SELECT batch_key, customer_id, window_slot, code, now() FROM req
            WHERE window_slot IS NOT NULL
            ON CONFLICT (batch_key, customer_id, slot) DO UPDATE
                SET code = EXCLUDED.code, issued_at = EXCLUDED.issued_at
                WHERE s.issued_at < EXCLUDED.issued_at - (
                    SELECT win FROM ok WHERE ok.key = EXCLUDED.batch_key)
            RETURNING code
        ), ins AS (
            INSERT INTO ango.issues (code, batch_key, customer_id, request_id, issued_at, slot)
            SELECT code, batch_key, customer_id, request_id, now(), slot FROM req
            WHERE window_slot IS NULL OR code IN (SELECT code FROM slot)
            ON CONFLICT DO NOTHING
            RETURNING code
        )
        SELECT (SELECT array_agg(code) FROM ins), (SELECT array_agg(code) FROM slot)
        INTO issued, taken;
    END;
    epoch := extract(epoch FROM now());
END
$fn$;
