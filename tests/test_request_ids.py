"""Request ids: a code goes only to the customer its request id was recorded for,
and a retried request id gets its recorded code whatever became of the batch (I6)."""

from __future__ import annotations

import psycopg
import pytest

import ango
from ango.audit import violations
from ango.protocol import Claim, Code, Error
from tests.helpers import gather_outcomes, make_batch, run
from tests.servers import InProcessServer, connect, hello, recv, send


def issues_of(dsn: str, batch_id: str) -> list[tuple[str, str, str]]:
    """(code, customer, request id) of every issue of the batch."""
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT i.code, i.customer_id, i.request_id FROM ango.issues i "
            "JOIN ango.batches b ON b.key = i.batch_key WHERE b.id = %s ORDER BY i.code",
            (batch_id,)).fetchall()


def assert_clean(dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        assert violations(conn) == []


def assert_reused_by_another_customer(outcome: object, request_id: str) -> None:
    assert isinstance(outcome, ango.InvalidInput), outcome
    assert f"request id {request_id!r} was already used by another customer" in str(outcome)


# --- one request id, two customers ---------------------------------------------------------


@pytest.mark.parametrize("rules", [None, {"maxpercustomer": 1, "timelimit": 7}])
def test_two_customers_with_one_request_id_in_one_loop_pass_never_share_a_code(dsn, rules):
    batch = make_batch(dsn, 20, rules)

    async def go():
        async with ango.Allocator(dsn, shards=1) as alloc:
            # Submitted in one loop pass: both reach the shard in one group.
            return await gather_outcomes([alloc.claim(batch, "ann", request_id="order-1"),
                                          alloc.claim(batch, "ben", request_id="order-1"),
                                          alloc.claim(batch, "ann", request_id="order-1")])

    first, second, again = run(go())
    assert isinstance(first, str) and again == first
    assert_reused_by_another_customer(second, "order-1")
    assert issues_of(dsn, batch) == [(first, "ann", "order-1")]
    assert_clean(dsn)


def test_the_customer_a_request_id_is_recorded_for_gets_its_code_behind_another_in_one_group(dsn):
    batch = make_batch(dsn, 20)

    async def go():
        async with ango.Allocator(dsn, shards=1) as alloc:
            code = await alloc.claim(batch, "ann", request_id="order-1")
            # ben's claim comes first in the group: ann's retry must not share its fate.
            both = await gather_outcomes([alloc.claim(batch, "ben", request_id="order-1"),
                                          alloc.claim(batch, "ann", request_id="order-1")])
            return code, both

    code, (ben, ann) = run(go())
    assert_reused_by_another_customer(ben, "order-1")
    assert ann == code
    assert issues_of(dsn, batch) == [(code, "ann", "order-1")]


def test_a_request_id_reused_by_another_customer_is_refused_sequentially_and_after_restart(dsn):
    batch = make_batch(dsn, 20)

    async def first():
        async with ango.Allocator(dsn, shards=2) as alloc:
            code = await alloc.claim(batch, "ann", request_id="order-1")
            return code, await gather_outcomes([alloc.claim(batch, "ben", request_id="order-1")])

    async def after_restart():
        async with ango.Allocator(dsn, shards=1) as alloc:
            return await gather_outcomes([alloc.claim(batch, "ben", request_id="order-1"),
                                          alloc.claim(batch, "ann", request_id="order-1")])

    code, (ben,) = run(first())
    assert_reused_by_another_customer(ben, "order-1")
    ben, ann = run(after_restart())
    assert_reused_by_another_customer(ben, "order-1")
    assert ann == code
    assert issues_of(dsn, batch) == [(code, "ann", "order-1")]


def test_two_customers_with_one_request_id_pipelined_on_one_connection_never_share_a_code(dsn):
    batch = make_batch(dsn, 20)
    with InProcessServer(lambda: ango.Allocator(dsn, shards=1)) as srv:
        with connect(srv.port) as sock:
            hello(sock)
            send(sock, Claim(1, batch, "ann", None, "order-1"),
                 Claim(2, batch, "ben", None, "order-1"),
                 Claim(3, batch, "cat", None, "order-2"),
                 Claim(4, batch, "ann", None, "order-1"))
            answers = {r.id: r for r in (recv(sock) for _ in range(4))}
    assert type(answers[1]) is Code and type(answers[3]) is Code and type(answers[4]) is Code
    assert answers[4].code == answers[1].code != answers[3].code
    assert type(answers[2]) is Error and answers[2].code == "invalid_input"
    assert not answers[2].retryable
    assert "already used by another customer" in answers[2].message
    assert sorted(issues_of(dsn, batch)) == sorted([(answers[1].code, "ann", "order-1"),
                                                    (answers[3].code, "cat", "order-2")])
    assert_clean(dsn)


# --- a retry gets its recorded code whatever became of the batch ----------------------------


def test_a_retry_after_expire_gets_the_recorded_code(dsn):
    batch = make_batch(dsn, 20, {"maxpercustomer": 2})

    async def go():
        async with ango.Allocator(dsn, shards=1) as alloc:
            code = await alloc.claim(batch, "ann", request_id="order-1")
            assert await alloc.expire(batch) is True
            # The shard has not heard of the expiry: its issue finds the batch expired.
            first_retry = await alloc.claim(batch, "ann", request_id="order-1")
            # Now it knows: the retry is answered without trying to issue.
            later = await gather_outcomes([alloc.claim(batch, "ann", request_id="order-1"),
                                           alloc.claim(batch, "ann", request_id="order-2"),
                                           alloc.claim(batch, "ben", request_id="order-1")])
            return code, first_retry, later

    async def after_restart():
        async with ango.Allocator(dsn, shards=2) as alloc:
            return await gather_outcomes([alloc.claim(batch, "ann", request_id="order-1"),
                                          alloc.claim(batch, "ann", request_id="order-3")])

    code, first_retry, (retry, new, other) = run(go())
    assert first_retry == code and retry == code
    assert isinstance(new, ango.BatchExpired)  # never issued: the batch's state
    assert_reused_by_another_customer(other, "order-1")
    retry, new = run(after_restart())
    assert retry == code
    assert isinstance(new, ango.BatchExpired)
    assert issues_of(dsn, batch) == [(code, "ann", "order-1")]
    assert_clean(dsn)


def test_a_retry_gets_the_recorded_code_when_the_batch_is_exhausted_or_the_rule_full(dsn):
    batch = make_batch(dsn, 1, {"maxpercustomer": 1})

    async def go():
        async with ango.Allocator(dsn, shards=1) as alloc:
            code = await alloc.claim(batch, "ann", request_id="order-1")
            return code, await gather_outcomes([alloc.claim(batch, "ann", request_id="order-1"),
                                                alloc.claim(batch, "ann", request_id="order-2"),
                                                alloc.claim(batch, "ben", request_id="order-3")])

    code, (retry, full, exhausted) = run(go())
    assert retry == code
    assert isinstance(full, ango.RuleViolation)
    assert isinstance(exhausted, ango.BatchExhausted)


def test_a_request_never_issued_is_told_the_batch_expired_even_by_a_full_rule(dsn):
    batch = make_batch(dsn, 20, {"maxpercustomer": 1})

    async def go():
        async with ango.Allocator(dsn, shards=1) as alloc:
            await alloc.claim(batch, "ann", request_id="order-1")
            await alloc.expire(batch)
            # The shard's counter says ann is at the limit; it has not heard of the expiry.
            return await gather_outcomes([alloc.claim(batch, "ann", request_id="order-2")])

    (outcome,) = run(go())
    assert isinstance(outcome, ango.BatchExpired), outcome
