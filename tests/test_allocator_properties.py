"""Property-based: random interleavings of claims, retries, expiries and shard
kills, then the database is checked against every invariant.

Request ids are sometimes reused by another customer (an order id shared by a
split order), and every request recorded is retried once the batch has
expired: a request id yields a code only to the customer it was recorded for,
and always its recorded code (I6)."""

from __future__ import annotations

import asyncio

import psycopg
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

import ango
from ango.audit import violations
from tests.helpers import make_batch, run

CUSTOMERS = 5

# A claim of request req-N, by its own customer (None: N % CUSTOMERS) or by any.
claim_op = st.tuples(st.just("claim"), st.integers(0, 40),
                     st.one_of(st.none(), st.none(), st.integers(0, CUSTOMERS - 1)))
op = st.one_of(
    claim_op, claim_op, claim_op, claim_op,
    st.tuples(st.just("expire"), st.just(0), st.none()),
    st.tuples(st.just("kill"), st.integers(0, 1), st.none()),
    st.tuples(st.just("pause"), st.integers(1, 30), st.none()),
)
rules_strategy = st.sampled_from(
    [None, {"maxpercustomer": 1}, {"maxpercustomer": 3}, {"maxpercustomer": 2, "timelimit": 7}])


async def answer_of(claim) -> object:
    """The code, or the AngoError raised."""
    try:
        return await claim
    except ango.AngoError as exc:
        return exc


async def settled(alloc: ango.Allocator, batch: str, customer: str, request: str) -> object:
    """A claim retried while the answer is Unavailable (a killed shard restarting)."""
    for _ in range(50):
        result = await answer_of(alloc.claim(batch, customer, request_id=request))
        if not isinstance(result, ango.Unavailable):
            return result
        await asyncio.sleep(0.1)
    return result


@settings(max_examples=8, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
# One request id claimed by three customers in one loop pass: two of them
# share a shard (of two), so their claims meet in one group.
@example(ops=[("claim", 7, None), ("claim", 7, 0), ("claim", 7, 1), ("pause", 5, None),
              ("claim", 7, None)], rules=None, size=10)
@given(ops=st.lists(op, min_size=5, max_size=80), rules=rules_strategy,
       size=st.integers(3, 60))
def test_any_interleaving_keeps_every_invariant(dsn, ops, rules, size):
    batch = make_batch(dsn, size, rules)

    def issued() -> dict[str, tuple[str, str]]:
        with psycopg.connect(dsn) as conn:
            return {rid: (code, cust) for rid, code, cust in conn.execute(
                "SELECT request_id, code, customer_id FROM ango.issues i"
                " JOIN ango.batches b ON b.key = i.batch_key WHERE b.id = %s",
                (batch,)).fetchall()}

    async def scenario():
        # (request, customer, started after expiry, result)
        outcomes: list[tuple[str, str, bool, object]] = []
        expired = False
        async with ango.Allocator(dsn, shards=2) as alloc:
            tasks = []
            for kind, arg, who in ops:
                if kind == "claim":
                    customer = f"cust-{arg % CUSTOMERS if who is None else who}"
                    coro = answer_of(alloc.claim(batch, customer, request_id=f"req-{arg}"))
                    tasks.append((f"req-{arg}", customer, expired, asyncio.ensure_future(coro)))
                elif kind == "expire":
                    await alloc.expire(batch)
                    expired = True
                elif kind == "kill":
                    alloc.kill_shard(arg)
                else:
                    await asyncio.sleep(arg / 1000)
            for request, customer, after_expiry, task in tasks:
                outcomes.append((request, customer, after_expiry, await task))
            # Every request recorded, retried after expiry: its code, to its customer only.
            await alloc.expire(batch)
            recorded = issued()
            for request, (_, customer) in recorded.items():
                other = f"other-than-{customer}"
                outcomes.append((request, customer, True,
                                 await settled(alloc, batch, customer, request)))
                outcomes.append((request, other, True,
                                 await settled(alloc, batch, other, request)))
        return outcomes

    outcomes = run(scenario())
    recorded = issued()
    code_of_request: dict[str, str] = {}
    for request, customer, after_expiry, result in outcomes:
        mine = recorded.get(request, (None, None))[1] == customer
        if isinstance(result, str):
            # I2, and a request id yields a code only to the customer it was recorded for.
            assert recorded[request] == (result, customer), (request, customer, result)
            # I6: a request id always gets the same code.
            assert code_of_request.setdefault(request, result) == result
        elif isinstance(result, ango.InvalidInput):
            assert request in recorded and not mine, (request, customer, result)
        else:
            assert isinstance(result, (ango.BatchExpired, ango.BatchExhausted,
                                       ango.RuleViolation, ango.Unavailable)), result
            # I6: a recorded request id gets its code, whatever became of the batch.
            assert isinstance(result, ango.Unavailable) or not mine, (request, customer, result)
            if after_expiry:
                assert isinstance(result, (ango.BatchExpired, ango.Unavailable)), result
    # I1: different requests never share a code.
    assert len(set(code_of_request.values())) == len(code_of_request)
    # I4 within this run: per customer at most the limit (the window is a week).
    if rules:
        per_customer: dict[str, int] = {}
        for _, customer in recorded.values():
            per_customer[customer] = per_customer.get(customer, 0) + 1
        assert max(per_customer.values(), default=0) <= rules["maxpercustomer"]
    # I7: "exhausted" only when nothing is left.
    if any(isinstance(r, ango.BatchExhausted) for *_, r in outcomes):
        assert len(recorded) == size
    with psycopg.connect(dsn) as conn:
        assert violations(conn, stale_seconds=60) == []
