"""Property-based: random interleavings of claims, retries, expiries and shard
kills, then the database is checked against every invariant."""

from __future__ import annotations

import asyncio

import psycopg
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import ango
from ango.audit import violations
from tests.helpers import make_batch, run

CUSTOMERS = 5

claim_op = st.tuples(st.just("claim"), st.integers(0, 40))
op = st.one_of(
    claim_op, claim_op, claim_op, claim_op,
    st.tuples(st.just("expire"), st.just(0)),
    st.tuples(st.just("kill"), st.integers(0, 1)),
    st.tuples(st.just("pause"), st.integers(1, 30)),
)
rules_strategy = st.sampled_from(
    [None, {"maxpercustomer": 1}, {"maxpercustomer": 3}, {"maxpercustomer": 2, "timelimit": 7}])


@settings(max_examples=8, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(ops=st.lists(op, min_size=5, max_size=80), rules=rules_strategy,
       size=st.integers(3, 60))
def test_any_interleaving_keeps_every_invariant(dsn, ops, rules, size):
    batch = make_batch(dsn, size, rules)

    async def scenario():
        outcomes: list[tuple[int, bool, object]] = []  # (request, started after expiry, result)
        expired = False
        async with ango.Allocator(dsn, shards=2) as alloc:
            tasks = []
            for kind, arg in ops:
                if kind == "claim":
                    customer = f"cust-{arg % CUSTOMERS}"
                    coro = alloc.claim(batch, customer, request_id=f"req-{arg}")
                    tasks.append((arg, expired, asyncio.ensure_future(coro)))
                elif kind == "expire":
                    await alloc.expire(batch)
                    expired = True
                elif kind == "kill":
                    alloc.kill_shard(arg)
                else:
                    await asyncio.sleep(arg / 1000)
            for request, after_expiry, task in tasks:
                try:
                    outcomes.append((request, after_expiry, await task))
                except ango.AngoError as exc:
                    outcomes.append((request, after_expiry, exc))
        return outcomes

    outcomes = run(scenario())
    code_of_request: dict[int, str] = {}
    for request, after_expiry, result in outcomes:
        if after_expiry:
            assert isinstance(result, (ango.BatchExpired, ango.Unavailable)), result
        if isinstance(result, str):
            # I6: a request id always gets the same code.
            assert code_of_request.setdefault(request, result) == result
        else:
            assert isinstance(result, (ango.BatchExpired, ango.BatchExhausted,
                                       ango.RuleViolation, ango.Unavailable)), result
    # I1: different requests never share a code.
    assert len(set(code_of_request.values())) == len(code_of_request)
    # I4 within this run: per customer at most the limit (the window is a week).
    if rules:
        per_customer: dict[int, int] = {}
        for request in code_of_request:
            per_customer[request % CUSTOMERS] = per_customer.get(request % CUSTOMERS, 0) + 1
        assert max(per_customer.values(), default=0) <= rules["maxpercustomer"]
    with psycopg.connect(dsn) as conn:
        issued = dict(conn.execute(
            "SELECT request_id, code FROM ango.issues i JOIN ango.batches b ON b.key = i.batch_key"
            " WHERE b.id = %s", (batch,)).fetchall())
        # I2: every acknowledged code is recorded as issued, for that request.
        for request, code in code_of_request.items():
            assert issued[f"req-{request}"] == code
        # I7: "exhausted" only when nothing is left.
        if any(isinstance(r, ango.BatchExhausted) for _, _, r in outcomes):
            assert len(issued) == size
        assert violations(conn, stale_seconds=60) == []
