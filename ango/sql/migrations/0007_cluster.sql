-- Cluster membership and routing-slot ownership (issue 13).
--
-- Ownership only decides which instance's shards keep a customer's counters
-- in memory; it never decides whether a claim is correct. PostgreSQL still
-- arbitrates every claim (leases, rule slots, unique indexes), so two
-- instances that both believe they own a slot cost a retry, never a duplicate.

-- Routing slots: a fixed space, independent of the codes table's hash partitions
-- (see docs/SCALING.md). Recorded once; never changed afterwards.
INSERT INTO ango.meta (key, value) VALUES ('routing_slots', '1024') ON CONFLICT (key) DO NOTHING;

-- One row per `ango serve` instance: where peers and clients reach it, and the
-- PostgreSQL session its heartbeat runs on (so a dead session is seen at once,
-- without waiting for the heartbeat to go stale).
CREATE TABLE IF NOT EXISTS ango.instances (
    name           text PRIMARY KEY,
    address        text NOT NULL,
    backend_pid    integer NOT NULL,
    backend_start  timestamptz NOT NULL,
    started_at     timestamptz NOT NULL DEFAULT now(),
    heartbeat      timestamptz NOT NULL DEFAULT now()
);

-- The owner of each routing slot. ``epoch`` grows by one on every change of
-- owner (taken, handed over or released), so a map's version is the sum of epochs.
-- The owner's liveness is its instance row: one row written per beat, not one per slot.
CREATE TABLE IF NOT EXISTS ango.routing_slots (
    slot      integer PRIMARY KEY,
    owner     text,
    epoch     bigint NOT NULL DEFAULT 0,
    taken_at  timestamptz
);

INSERT INTO ango.routing_slots (slot)
SELECT s FROM generate_series(0, (SELECT value::integer FROM ango.meta
                                  WHERE key = 'routing_slots') - 1) AS s
ON CONFLICT (slot) DO NOTHING;

-- Live instances: heartbeat within the last 3 s and their PostgreSQL session
-- still open (a killed process's session ends with its socket). Another role's
-- sessions show their pid but not their start (without pg_read_all_stats):
-- then the pid alone says the session is there.
CREATE OR REPLACE VIEW ango.live_instances AS
SELECT i.name, i.address
FROM ango.instances i
WHERE i.heartbeat > now() - interval '3 seconds'
  AND EXISTS (SELECT 1 FROM pg_stat_activity a
              WHERE a.pid = i.backend_pid
                AND (a.backend_start IS NULL OR a.backend_start = i.backend_start));
