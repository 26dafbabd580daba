"""The group commit driven in-process, without a shard process, on a real PostgreSQL.

Each test registers one or two owners the way a shard does, hands ``GroupCommit``
groups of claims, commits what ``prepare`` returns on a group-commit connection
and checks each claim's answer and what PostgreSQL recorded.
"""

from __future__ import annotations

import itertools
import time
import uuid

import psycopg

from ango.audit import violations
from ango.batches import expire_batch
from ango.errors import (
    AngoError,
    BatchExhausted,
    BatchExpired,
    InvalidInput,
    RuleViolation,
)
from ango.shards.claims import Pending
from ango.shards.group_commit import GroupCommit
from ango.shards.store import ShardStore
from tests.helpers import CLIENT, make_batch, run

_tags = itertools.count(1)


class Owner:
    """A group commit with its store, registered as a shard's owner; answers collected."""

    def __init__(self, dsn: str, count: int = 1, ahead: bool = False) -> None:
        self.store = ShardStore(dsn, str(uuid.uuid4()), commits=1)
        self.group_commit = GroupCommit(self.store.control, count, self.answer,
                                        ahead=self.store.beat if ahead else None)
        self.answers: dict[int, tuple[str | None, AngoError | None]] = {}

    def answer(self, p: Pending, code: str | None, error: AngoError | None = None) -> None:
        self.answers[p.tag] = (code, error)
        for follower in p.followers:
            self.answer(follower, code, error)

    async def open(self) -> Owner:
        await self.store.open()
        await self.store.beat.register_owner(str(uuid.uuid4()), 0, [])
        return self

    async def prepare(self, group: list[Pending]):
        return await self.group_commit.prepare(group)

    async def commit(self, issuing, verify) -> None:
        await self.group_commit.commit(issuing, verify, self.store.commits[0])

    async def decide(self, group: list[Pending]) -> list[tuple[str | None, AngoError | None]]:
        """Prepare and commit one group; the answers of its claims (None: not answered)."""
        issuing, verify = await self.prepare(group)
        if issuing or verify:
            await self.commit(issuing, verify)
        return [self.answers.get(p.tag) for p in group]

    async def retry_parked(self) -> list[Pending]:
        """The parked claims, decided again as the shard's loop does after a group."""
        parked = self.group_commit.take_parked()
        await self.decide(parked)
        return parked

    async def close(self) -> None:
        await self.store.close()


def claim(batch: str, customer: str, request_id: str | None = None) -> Pending:
    return Pending(next(_tags), batch, customer, CLIENT, request_id or uuid.uuid4().hex,
                   time.monotonic())


def issues(dsn: str, batch: str) -> dict[str, tuple[str, str]]:
    """code -> (customer, request id) of every issue of the batch."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT i.code, i.customer_id, i.request_id FROM ango.issues i "
            "JOIN ango.batches b ON b.key = i.batch_key WHERE b.id = %s", (batch,)).fetchall()
    return {code: (customer, rid) for code, customer, rid in rows}


def assert_clean(dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        assert violations(conn) == []


def test_a_group_is_issued_one_code_per_claim_and_recorded_for_its_customer(dsn):
    batch = make_batch(dsn, 10)
    group = [claim(batch, f"customer-{i}") for i in range(4)]

    async def go():
        owner = await Owner(dsn).open()
        try:
            return await owner.decide(group)
        finally:
            await owner.close()

    answers = run(go())
    codes = [code for code, error in answers]
    assert all(error is None for _, error in answers)
    assert len(set(codes)) == 4 and None not in codes
    assert issues(dsn, batch) == {p.code: (p.customer_id, p.request_id) for p in group}
    assert_clean(dsn)


def test_a_claim_over_the_rule_is_refused_from_memory_and_by_the_database(dsn):
    batch = make_batch(dsn, 10, {"maxpercustomer": 1})

    async def go():
        first, second = await Owner(dsn).open(), await Owner(dsn).open()
        try:
            [got] = await first.decide([claim(batch, "ann")])
            # The same owner knows ann's slot is taken: refused without an issue.
            [again] = await first.decide([claim(batch, "ann")])
            # Another owner has no counter for ann: the database refuses the slot,
            # the claim is parked, and decided again on the counter now loaded.
            stale = claim(batch, "ann")
            [unanswered] = await second.decide([stale])
            await second.retry_parked()
            return got, again, unanswered, second.answers[stale.tag]
        finally:
            await first.close()
            await second.close()

    got, again, unanswered, after_reload = run(go())
    assert got[0] is not None and got[1] is None
    for code, error in (again, after_reload):
        assert code is None and isinstance(error, RuleViolation)
        assert "customer ann has had 1 code(s) of this batch" in str(error)
    assert unanswered is None
    assert list(issues(dsn, batch)) == [got[0]]
    assert_clean(dsn)


def test_the_batch_is_exhausted_only_once_no_code_is_in_flight(dsn):
    batch = make_batch(dsn, 2)
    group = [claim(batch, f"customer-{i}") for i in range(3)]

    async def go():
        owner = await Owner(dsn).open()
        try:
            first = await owner.decide(group)
            # The third waited: a code in the group commit might have come back.
            parked = await owner.retry_parked()
            return first, parked, owner.answers[group[2].tag]
        finally:
            await owner.close()

    first, parked, last = run(go())
    assert [error for _, error in first[:2]] == [None, None]
    assert first[2] is None and parked == [group[2]]
    assert last[0] is None and isinstance(last[1], BatchExhausted)
    assert len(issues(dsn, batch)) == 2
    assert_clean(dsn)


def test_an_expired_batch_refuses_new_claims_and_replays_a_retried_request_id(dsn):
    batch = make_batch(dsn, 10)

    async def go():
        owner = await Owner(dsn).open()
        try:
            [got] = await owner.decide([claim(batch, "ann", "order-1")])
            with psycopg.connect(dsn, autocommit=True) as conn:
                expire_batch(conn, batch)
            # Whether or not the owner has re-read the batch yet, the answers are the same.
            after = await owner.decide([claim(batch, "ben", "order-2"),
                                        claim(batch, "ann", "order-1")])
            return got, after
        finally:
            await owner.close()

    got, (new, retried) = run(go())
    assert got[0] is not None
    assert new[0] is None and isinstance(new[1], BatchExpired)
    assert retried == (got[0], None)
    assert issues(dsn, batch) == {got[0]: ("ann", "order-1")}
    assert_clean(dsn)


def test_a_replayed_request_id_gets_its_recorded_code_and_is_issued_once(dsn):
    batch = make_batch(dsn, 10)

    async def go():
        owner = await Owner(dsn).open()
        try:
            [got] = await owner.decide([claim(batch, "ann", "order-1")])
            [again] = await owner.decide([claim(batch, "ann", "order-1")])
            return got, again
        finally:
            await owner.close()

    got, again = run(go())
    assert got[0] is not None and got[1] is None
    assert again == got
    assert issues(dsn, batch) == {got[0]: ("ann", "order-1")}
    assert_clean(dsn)


def test_a_request_id_of_another_customer_is_refused(dsn):
    batch = make_batch(dsn, 10)

    async def go():
        owner = await Owner(dsn).open()
        try:
            [got] = await owner.decide([claim(batch, "ann", "order-1")])
            [other] = await owner.decide([claim(batch, "ben", "order-1")])
            return got, other
        finally:
            await owner.close()

    got, (code, error) = run(go())
    assert got[0] is not None
    assert code is None and isinstance(error, InvalidInput)
    assert "request id 'order-1' was already used by another customer" in str(error)
    assert issues(dsn, batch) == {got[0]: ("ann", "order-1")}
    assert_clean(dsn)


def test_a_code_issued_elsewhere_is_not_issued_again_and_its_claim_takes_another(dsn):
    batch = make_batch(dsn, 2)
    mine = [claim(batch, "ann"), claim(batch, "ben")]
    theirs = claim(batch, "cat")

    async def go():
        a, b = await Owner(dsn).open(), await Owner(dsn).open()
        try:
            # a leases both codes and assigns them, but has not committed yet...
            issuing, verify = await a.prepare(mine)
            assigned = {p.code for p in issuing}
            # ...when b, finding the cursor exhausted, steals a's lease and issues one.
            [elsewhere] = await b.decide([theirs])
            await a.commit(issuing, verify)
            before_retry = dict(a.answers)
            await a.retry_parked()  # steals the lease back: one code left
            await a.retry_parked()  # none left anywhere
            return assigned, elsewhere, before_retry, [a.answers[p.tag] for p in mine]
        finally:
            await a.close()
            await b.close()

    assigned, elsewhere, before_retry, (first, second) = run(go())
    assert len(assigned) == 2 and elsewhere[0] in assigned and elsewhere[1] is None
    assert before_retry == {}  # neither was issued a code the other owner held
    assert first[1] is None and first[0] in assigned and first[0] != elsewhere[0]
    assert second[0] is None and isinstance(second[1], BatchExhausted)
    assert issues(dsn, batch) == {elsewhere[0]: ("cat", theirs.request_id),
                                  first[0]: ("ann", mine[0].request_id)}
    assert_clean(dsn)


def test_a_group_commit_that_fails_leaves_no_code_in_flight(dsn):
    """A commit that raises (its connection gone) no longer counts its codes as in flight.

    Otherwise the batch could never be told exhausted (I7 waits for codes in flight).
    """
    batch = make_batch(dsn, 10)
    group = [claim(batch, f"customer-{i}") for i in range(3)]

    async def go():
        owner = await Owner(dsn).open()
        try:
            issuing, verify = await owner.prepare(group)
            in_flight = sum(owner.group_commit.codes_in_flight.values())
            await owner.store.commits[0].conn.close()
            try:
                await owner.commit(issuing, verify)
            except psycopg.OperationalError:
                pass
            else:
                raise AssertionError("a commit on a closed connection returned")
            return in_flight, sum(owner.group_commit.codes_in_flight.values())
        finally:
            await owner.close()

    before, after = run(go())
    assert (before, after) == (3, 0)
    assert issues(dsn, batch) == {}
    assert_clean(dsn)


def test_the_next_lease_is_fetched_ahead_and_the_last_codes_are_still_all_issued(dsn):
    """Codes running low: the next block is leased off the claim path; the batch is
    told exhausted only once every code is issued (I7), never while a lease is on its way."""
    batch = make_batch(dsn, 300)

    async def go():
        owner = await Owner(dsn, ahead=True).open()
        try:
            [first] = await owner.decide([claim(batch, "c-0")])
            await owner.group_commit.stop_prefetching()
            ahead = owner.group_commit.pool.held(first_key(owner))
            leases = leases_of(dsn, owner.store.control.owner)
            tags = []
            for n in range(1, 320, 40):
                group = [claim(batch, f"c-{i}") for i in range(n, n + 40)]
                tags += [p.tag for p in group]
                await owner.decide(group)
                while owner.group_commit.parked:  # decided again, as the loop does
                    await owner.group_commit.stop_prefetching()
                    await owner.decide(owner.group_commit.take_parked())
            return leases, ahead, [first] + [owner.answers[tag] for tag in tags]
        finally:
            await owner.close()

    leases, ahead, answers = run(go())
    # One claim, two leases: the second block was leased ahead, no claim asking for
    # it (128 codes, then half of the 172 left); every code not issued is held.
    assert leases == 2 and ahead == 300 - 1 - 86
    codes = [code for code, error in answers if error is None]
    refused = [error for code, error in answers if error is not None]
    assert len(codes) == len(set(codes)) == 300
    assert refused and all(isinstance(e, BatchExhausted) for e in refused)
    assert len(issues(dsn, batch)) == 300
    assert_clean(dsn)


def leases_of(dsn: str, owner: str) -> int:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT count(*) FROM ango.leases WHERE owner = %s",
                            (owner,)).fetchone()[0]


def first_key(owner: Owner) -> int:
    [meta] = owner.group_commit.batches.values()
    return meta.key
