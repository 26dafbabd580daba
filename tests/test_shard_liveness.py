"""A shard that hangs or loses its heartbeat is found and replaced; claims never wait on it.

Real shard processes frozen with SIGSTOP (or with a heartbeat made to fail by
the database itself); PostgreSQL arbitrates whatever the frozen one had sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time

import psycopg

import ango
from ango.audit import violations
from ango.shards.supervisor import Deadlines
from tests.helpers import gather_outcomes, make_batch, run

# Tighter than the defaults, so the test is quick; the bound asserted is generous.
DEADLINES = Deadlines(ping_every=0.25, ping_deadline=2.0, claim_deadline=6.0)
ANSWERED_WITHIN_S = 10.0  # before the fix, claims of a frozen shard waited for as long as it was


def recorded(dsn: str, batch_id: str) -> dict[str, tuple[str, str]]:
    """request id -> (code, customer) as PostgreSQL recorded the batch's issues."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT i.request_id, i.code, i.customer_id FROM ango.issues i "
            "JOIN ango.batches b ON b.key = i.batch_key WHERE b.id = %s", (batch_id,)).fetchall()
    return {rid: (code, customer) for rid, code, customer in rows}


async def wait_for_new_pid(alloc: ango.Allocator, index: int, old: int, limit: float) -> bool:
    """True once shard ``index`` runs in another process than ``old`` (and is alive)."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        pid = alloc.shard_pids()[index]
        if pid != old and alloc._shards[index].alive:
            return True
        await asyncio.sleep(0.1)
    return False


def test_a_frozen_shard_is_replaced_and_its_claims_answered_within_a_bound(dsn):
    batch = make_batch(dsn, 20000, {"maxpercustomer": 3})

    async def go():
        async with ango.Allocator(dsn, shards=2, deadlines=DEADLINES) as alloc:
            claim = lambda i: alloc.claim(batch, f"c-{i % 3000}", request_id=f"r{i}")  # noqa: E731
            before = [asyncio.ensure_future(claim(i)) for i in range(3000)]
            await asyncio.sleep(0.05)
            victim = alloc.shard_pids()[0]
            os.kill(victim, signal.SIGSTOP)
            frozen_at = time.monotonic()
            try:
                during = [asyncio.ensure_future(claim(i)) for i in range(3000, 6000)]
                flood = before + during
                done, pending = await asyncio.wait(flood, timeout=ANSWERED_WITHIN_S)
                answered_in = time.monotonic() - frozen_at
                replaced = await wait_for_new_pid(alloc, 0, victim, 10.0)
            finally:
                with contextlib.suppress(ProcessLookupError):  # killed, as it should be
                    os.kill(victim, signal.SIGCONT)  # without the fix nobody else would
            outcomes = await gather_outcomes(flood)
            # Served again: every request, retried with its id, gets a code now.
            retried = await gather_outcomes(claim(i) for i in range(6000))
            return pending, answered_in, replaced, outcomes, retried, alloc.shard_pids(), victim

    pending, answered_in, replaced, outcomes, retried, pids, victim = run(go())
    assert not pending, f"{len(pending)} claims unanswered {answered_in:.1f} s after the freeze"
    assert replaced and victim not in pids
    for o in outcomes:
        assert isinstance(o, (str, ango.Unavailable)), repr(o)
    assert all(isinstance(o, str) for o in retried), [o for o in retried if not isinstance(o, str)]
    # Whatever the frozen shard had committed, PostgreSQL decided: every answer
    # matches the record, retries included, and the audit is clean.
    issues = recorded(dsn, batch)
    for i, (first, again) in enumerate(zip(outcomes, retried, strict=True)):
        if isinstance(first, str):
            assert again == first
        assert issues[f"r{i}"] == (again, f"c-{i % 3000}")
    assert len({code for code, _ in issues.values()}) == len(issues)
    with psycopg.connect(dsn) as conn:
        assert violations(conn) == []


def test_a_shard_whose_heartbeat_task_dies_exits_and_is_restarted(dsn):
    batch = make_batch(dsn, 100)
    with psycopg.connect(dsn, autocommit=True) as conn:
        # The next heartbeat (and only it) fails with an error the heartbeat
        # does not expect: a sequence is not rolled back with the failed UPDATE.
        conn.execute("CREATE SEQUENCE test_beats")
        conn.execute("""
            CREATE FUNCTION test_fail_one_beat() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF nextval('test_beats') = 1 THEN RAISE EXCEPTION 'heartbeat sabotaged'; END IF;
                RETURN NEW;
            END $$""")

    async def go():
        async with ango.Allocator(dsn, shards=1, deadlines=DEADLINES) as alloc:
            first = await alloc.claim(batch, "before")
            old = alloc.shard_pids()[0]
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("CREATE TRIGGER test_fail_one_beat BEFORE UPDATE ON ango.owners "
                             "FOR EACH ROW EXECUTE FUNCTION test_fail_one_beat()")
            replaced = await wait_for_new_pid(alloc, 0, old, 10.0)
            after = await alloc.claim(batch, "after")
            return first, after, replaced, (await alloc.stats())["restarts"]

    first, after, replaced, restarts = run(go())
    assert replaced and restarts == 1
    assert first != after
    with psycopg.connect(dsn) as conn:
        assert violations(conn) == []


def test_claims_past_their_deadline_are_answered_unavailable_while_their_shard_is_frozen(dsn):
    batch = make_batch(dsn, 1000, {"maxpercustomer": 1})
    # The claim deadline is shorter than the ping deadline: claims are answered
    # before the frozen shard is even found.
    deadlines = Deadlines(ping_every=0.25, ping_deadline=4.0, claim_deadline=1.0)

    async def go():
        async with ango.Allocator(dsn, shards=1, deadlines=deadlines) as alloc:
            await alloc.claim(batch, "warm-up")
            victim = alloc.shard_pids()[0]
            os.kill(victim, signal.SIGSTOP)
            try:
                frozen = await asyncio.wait_for(gather_outcomes(
                    alloc.claim(batch, f"c-{i}", request_id=f"r{i}") for i in range(200)),
                    ANSWERED_WITHIN_S)
                still_frozen = alloc.shard_pids()[0] == victim
                replaced = await wait_for_new_pid(alloc, 0, victim, 10.0)
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(victim, signal.SIGCONT)
            retried = await gather_outcomes(
                alloc.claim(batch, f"c-{i}", request_id=f"r{i}") for i in range(200))
            return frozen, still_frozen, replaced, retried

    frozen, still_frozen, replaced, retried = run(go())
    assert still_frozen and replaced
    assert all(isinstance(o, ango.Unavailable) and o.retryable for o in frozen), frozen[:3]
    assert all(isinstance(o, str) for o in retried), retried[:3]
    assert len(set(retried)) == 200
    with psycopg.connect(dsn) as conn:
        assert violations(conn) == []


def test_closing_while_a_shard_restarts_does_not_wait_out_the_stop_timeout(dsn):
    batch = make_batch(dsn, 10)

    async def go():
        alloc = ango.Allocator(dsn, shards=1, deadlines=DEADLINES)
        await alloc.start()
        code = await alloc.claim(batch, "c1")
        # The successor's start-up blocks on the owners table until we let go.
        with psycopg.connect(dsn) as blocker:
            blocker.execute("LOCK TABLE ango.owners IN ACCESS EXCLUSIVE MODE")
            alloc.kill_shard(0)
            await asyncio.sleep(0.5)  # the watcher is starting the successor
            started = time.monotonic()
            closing = asyncio.create_task(alloc.close())
            await asyncio.sleep(0.5)
            blocker.rollback()
            await closing
        return code, time.monotonic() - started

    code, closing = run(go())
    assert code
    # Before, close() waited the whole 15 s stop timeout for the starting process.
    assert closing < 10.0
    with psycopg.connect(dsn) as conn:
        assert violations(conn) == []
