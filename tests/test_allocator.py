"""The sharded allocator against a real PostgreSQL: every invariant of DESIGN.md."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import psycopg
import pytest

import ango
from ango.audit import violations
from tests.helpers import CLIENT, gather_outcomes, make_batch, run


def issued_rows(dsn: str, batch_id: str) -> list[tuple]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT i.code, i.customer_id, i.request_id FROM ango.issues i "
            "JOIN ango.batches b ON b.key = i.batch_key WHERE b.id = %s", (batch_id,)).fetchall()


def assert_invariants(dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        assert violations(conn) == []


def test_claim_returns_a_code_recorded_as_issued_to_the_customer(dsn):
    batch = make_batch(dsn, 50)

    async def go():
        async with ango.Allocator(dsn, shards=2) as alloc:
            return await alloc.claim(batch, "alice", request_id="r-1")

    code = run(go())
    assert issued_rows(dsn, batch) == [(code, "alice", "r-1")]
    assert_invariants(dsn)


def test_thousand_concurrent_claims_by_one_customer_get_exactly_the_limit(dsn):
    batch = make_batch(dsn, 2000, {"maxpercustomer": 2})

    async def go():
        async with ango.Allocator(dsn, shards=2) as alloc:
            return await gather_outcomes(alloc.claim(batch, "bob") for _ in range(1000))

    outcomes = run(go())
    codes = [o for o in outcomes if isinstance(o, str)]
    refused = [o for o in outcomes if isinstance(o, ango.RuleViolation)]
    assert len(codes) == 2 and len(set(codes)) == 2
    assert len(refused) == 998
    assert len(issued_rows(dsn, batch)) == 2
    assert_invariants(dsn)


def test_rule_window_rolls_and_a_stale_counter_cannot_exceed_the_limit(dsn):
    batch = make_batch(dsn, 100, {"maxpercustomer": 1, "timelimit": 30})

    async def claim_once():
        async with ango.Allocator(dsn, shards=1) as alloc:
            return await gather_outcomes([alloc.claim(batch, "carol")])

    first = run(claim_once())[0]
    assert isinstance(first, str)
    # A fresh allocator has no counter for carol: PostgreSQL must refuse.
    assert isinstance(run(claim_once())[0], ango.RuleViolation)
    with psycopg.connect(dsn) as conn:
        conn.execute("UPDATE ango.slots SET issued_at = now() - interval '31 days'")
        conn.execute("UPDATE ango.issues SET issued_at = now() - interval '31 days'")
    second = run(claim_once())[0]
    assert isinstance(second, str) and second != first
    assert_invariants(dsn)


def test_batch_drains_to_zero_over_all_shards_before_exhausted(dsn):
    batch = make_batch(dsn, 700)

    async def go():
        async with ango.Allocator(dsn, shards=3) as alloc:
            return await gather_outcomes(alloc.claim(batch, f"cust-{i}") for i in range(1000))

    outcomes = run(go())
    codes = [o for o in outcomes if isinstance(o, str)]
    assert len(codes) == 700 and len(set(codes)) == 700
    assert all(isinstance(o, ango.BatchExhausted) for o in outcomes if not isinstance(o, str))
    with psycopg.connect(dsn) as conn:
        assert conn.execute(
            "SELECT available FROM (SELECT b.total - count(i.code) AS available "
            "FROM ango.batches b LEFT JOIN ango.issues i ON i.batch_key = b.key "
            "WHERE b.id = %s GROUP BY b.total) x", (batch,)).fetchone()[0] == 0
    assert_invariants(dsn)


def test_exhausted_only_when_no_partition_holds_a_code(dsn):
    """One shard leases most of a small batch; claims routed to the other still drain it."""
    batch = make_batch(dsn, 300)

    async def go():
        async with ango.Allocator(dsn, shards=2) as alloc:
            # Warm one shard: its leases grow while the other holds little.
            first = [await alloc.claim(batch, f"warm-{i}") for i in range(5)]
            rest = await gather_outcomes(alloc.claim(batch, f"c-{i}") for i in range(400))
            return first, rest

    first, rest = run(go())
    codes = first + [o for o in rest if isinstance(o, str)]
    assert len(set(codes)) == 300
    assert sum(isinstance(o, ango.BatchExhausted) for o in rest) == 105


def test_no_claim_succeeds_once_expire_returns(dsn):
    batch = make_batch(dsn, 20000)

    async def go():
        async with ango.Allocator(dsn, shards=2) as alloc:
            flood = [asyncio.ensure_future(alloc.claim(batch, f"c-{i}")) for i in range(3000)]
            await asyncio.sleep(0.05)
            assert await alloc.expire(batch) is True
            issued_at_expiry = len(issued_rows(dsn, batch))
            outcomes = await gather_outcomes(flood)
            after = await gather_outcomes([alloc.claim(batch, "late")])
            assert await alloc.expire(batch) is False
            return issued_at_expiry, outcomes, after

    at_expiry, outcomes, after = run(go())
    assert len(issued_rows(dsn, batch)) == at_expiry
    assert isinstance(after[0], ango.BatchExpired)
    successes = [o for o in outcomes if isinstance(o, str)]
    assert len(successes) == at_expiry
    assert all(isinstance(o, ango.BatchExpired) for o in outcomes if not isinstance(o, str))
    assert_invariants(dsn)


def test_retry_with_same_request_id_returns_same_code_and_counts_once(dsn):
    batch = make_batch(dsn, 100, {"maxpercustomer": 1})

    async def go():
        async with ango.Allocator(dsn, shards=2) as alloc:
            both = await gather_outcomes(
                [alloc.claim(batch, "dave", request_id="order-1") for _ in range(5)])
            again = await alloc.claim(batch, "dave", request_id="order-1")
            other = await gather_outcomes([alloc.claim(batch, "dave", request_id="order-2")])
            return both, again, other

    both, again, other = run(go())
    assert len(set(both)) == 1 and again == both[0]
    assert isinstance(other[0], ango.RuleViolation)

    async def after_restart():
        async with ango.Allocator(dsn, shards=3) as alloc:
            return await alloc.claim(batch, "dave", request_id="order-1")

    assert run(after_restart()) == both[0]
    assert len(issued_rows(dsn, batch)) == 1


def test_request_id_reused_for_another_customer_is_refused(dsn):
    batch = make_batch(dsn, 10)

    async def go():
        async with ango.Allocator(dsn, shards=1) as alloc:
            await alloc.claim(batch, "erin", request_id="same")
            return await gather_outcomes([alloc.claim(batch, "frank", request_id="same")])

    assert isinstance(run(go())[0], ango.InvalidInput)


def test_unknown_batch_wrong_client_and_bad_input_are_typed_errors(dsn):
    batch = make_batch(dsn, 10)

    async def go():
        async with ango.Allocator(dsn, shards=1) as alloc:
            return await gather_outcomes([
                alloc.claim("00000000-0000-4000-8000-000000000000", "x"),
                alloc.claim(batch, "x", client_id="00000000-0000-4000-8000-000000000009"),
                alloc.claim("not-a-uuid", "x"),
                alloc.claim(batch, ""),
                alloc.claim(batch, "x" * 300),
                alloc.claim(batch, 17),
                alloc.claim(batch, "ok", client_id=CLIENT),
            ])

    out = run(go())
    assert isinstance(out[0], ango.BatchNotFound)
    assert isinstance(out[1], ango.BatchNotFound)
    for bad in out[2:6]:
        assert isinstance(bad, ango.InvalidInput)
    assert isinstance(out[6], str)
    assert len(issued_rows(dsn, batch)) == 1


def test_kill_9_of_a_shard_under_load_loses_nothing_and_issues_nothing_twice(dsn):
    batch = make_batch(dsn, 30000, {"maxpercustomer": 3})

    async def go():
        async with ango.Allocator(dsn, shards=2) as alloc:
            flood = [asyncio.ensure_future(alloc.claim(batch, f"c-{i % 4000}", request_id=f"r{i}"))
                     for i in range(8000)]
            await asyncio.sleep(0.2)
            victim = alloc.shard_pids()[0]
            os.kill(victim, signal.SIGKILL)
            killed_at = time.monotonic()
            outcomes = await gather_outcomes(flood)
            # The restarted shard adopted the dead one's leases: nothing is orphaned.
            while True:
                with psycopg.connect(dsn) as conn:
                    orphans = violations(conn, stale_seconds=60)
                if not orphans or time.monotonic() - killed_at > 5:
                    break
                await asyncio.sleep(0.2)
            stats = await alloc.stats()
            while stats["shards_alive"] < 2 and time.monotonic() - killed_at < 10:
                await asyncio.sleep(0.1)
                stats = await alloc.stats()
            retried = await gather_outcomes(
                alloc.claim(batch, f"c-{i % 4000}", request_id=f"r{i}") for i in range(8000))
            return outcomes, orphans, stats, retried, victim

    outcomes, orphans, stats, retried, victim = run(go())
    assert orphans == []
    assert stats["restarts"] == 1 and stats["shards_alive"] == 2
    assert victim not in [s.get("pid") for s in stats["per_shard"]]
    acknowledged = {f"r{i}": o for i, o in enumerate(outcomes) if isinstance(o, str)}
    rows = issued_rows(dsn, batch)
    by_request = {rid: code for code, _, rid in rows}
    assert len({code for code, _, _ in rows}) == len(rows)
    for rid, code in acknowledged.items():
        assert by_request[rid] == code
    # Retrying every request returns the same code for each acknowledged one.
    for i, o in enumerate(retried):
        if f"r{i}" in acknowledged:
            assert o == acknowledged[f"r{i}"]
    assert_invariants(dsn)


def test_codes_of_a_dead_allocator_become_claimable_within_five_seconds(dsn):
    batch = make_batch(dsn, 40)

    async def hold_and_die():
        alloc = ango.Allocator(dsn, shards=1)
        await alloc.start()
        await alloc.claim(batch, "first")
        for pid in alloc.shard_pids():
            os.kill(pid, signal.SIGKILL)
        for s in alloc._shards:
            s.closing = True
        await asyncio.sleep(0.2)
        await alloc.close()

    run(hold_and_die())
    started = time.monotonic()

    async def drain():
        async with ango.Allocator(dsn, shards=2) as alloc:
            got = []
            while len(got) < 39 and time.monotonic() - started < 10:
                out = await gather_outcomes([alloc.claim(batch, f"d-{len(got)}")])
                if isinstance(out[0], str):
                    got.append(out[0])
                else:
                    assert isinstance(out[0], (ango.BatchExhausted, ango.Unavailable))
                    await asyncio.sleep(0.1)
            return got, time.monotonic() - started

    got, elapsed = run(drain())
    assert len(set(got)) == 39
    assert_invariants(dsn)


def test_sync_allocator_claims_from_many_threads_without_duplicates(dsn):
    from concurrent.futures import ThreadPoolExecutor

    batch = make_batch(dsn, 300, {"maxpercustomer": 1})
    with ango.SyncAllocator(dsn, shards=2) as alloc:
        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(lambda i: alloc.claim(batch, f"t-{i}"), range(200)))
        with pytest.raises(ango.RuleViolation):
            alloc.claim(batch, "t-0")
        assert alloc.expire(batch) is True
        with pytest.raises(ango.BatchExpired):
            alloc.claim(batch, "t-new")
        listed = {b["id"]: b for b in alloc.batches()}
        assert listed[batch]["issued"] == 200 and listed[batch]["expired"] is True
    assert len(set(codes)) == 200


def test_exhausted_is_not_answered_while_a_refused_claim_may_return_the_last_code(dsn):
    batch = make_batch(dsn, 2, {"maxpercustomer": 1})

    async def first():
        async with ango.Allocator(dsn, shards=1) as alloc:
            return await alloc.claim(batch, "a")

    run(first())

    async def second():
        # A fresh allocator does not know "a" is at the limit: "a" takes the last
        # code in the group, PostgreSQL refuses it, and the code must go to "b".
        async with ango.Allocator(dsn, shards=1) as alloc:
            return await gather_outcomes([alloc.claim(batch, "a"), alloc.claim(batch, "b")])

    a, b = run(second())
    assert isinstance(a, ango.RuleViolation)
    assert isinstance(b, str)
    assert_invariants(dsn)
