"""`ango rules BATCH_ID --set JSON`: a changed rule holds for every claim committed
after the change returns; customers above a tightened limit keep what they have."""

from __future__ import annotations

import asyncio
import json
import time

import psycopg
import pytest
from click.testing import CliRunner

import ango
from ango.audit import violations
from ango.batches import set_rules
from ango.cli import main
from tests.helpers import make_batch


def cli(dsn: str, *args: str):
    return CliRunner().invoke(main, [*args, "--dsn", dsn], catch_exceptions=False)


def count(db, customer: str) -> int:
    return db.execute("SELECT count(*) FROM ango.issues WHERE customer_id = %s",
                      (customer,)).fetchone()[0]


def claim_until(alloc, batch: str, customer: str, seconds: float = 5.0) -> str:
    """A loosened rule reaches the shards' memory within a second: retry until then."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return alloc.claim(batch, customer)
        except ango.RuleViolation:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.mark.parametrize("window", [None, 30], ids=["no window", "30-day window"])
def test_a_tightened_rule_holds_at_once_and_a_loosened_one_soon(dsn, db, window):
    def rule(n):
        return {"maxpercustomer": n} | ({"timelimit": window} if window else {})

    batch = make_batch(dsn, 50, rule(3))
    with ango.SyncAllocator(dsn, shards=2) as alloc:
        for _ in range(3):
            alloc.claim(batch, "ann")
        alloc.claim(batch, "bob")
        assert alloc.set_rules(batch, rule(1)) == rule(1)
        for who in ("ann", "bob"):  # at or above the new limit: no more
            with pytest.raises(ango.RuleViolation):
                alloc.claim(batch, who)
        alloc.claim(batch, "cy")
        with pytest.raises(ango.RuleViolation):
            alloc.claim(batch, "cy")
        assert count(db, "ann") == 3  # above the tightened limit: keeps what she has
        assert violations(db) == []
        alloc.set_rules(batch, rule(4))
        claim_until(alloc, batch, "ann")
        with pytest.raises(ango.RuleViolation):
            alloc.claim(batch, "ann")
        for _ in range(3):
            claim_until(alloc, batch, "bob")
        alloc.set_rules(batch, None)  # no limit at all
        for _ in range(3):
            claim_until(alloc, batch, "ann")
        alloc.set_rules(batch, rule(2))  # the rule comes back, counting every issue
        with pytest.raises(ango.RuleViolation):
            alloc.claim(batch, "ann")
    assert (count(db, "ann"), count(db, "bob"), count(db, "cy")) == (7, 4, 1)
    assert violations(db) == []


def test_switching_between_a_fixed_and_a_windowed_rule_counts_earlier_issues(dsn, db):
    batch = make_batch(dsn, 20, {"maxpercustomer": 2})
    with ango.SyncAllocator(dsn, shards=1) as alloc:
        alloc.claim(batch, "ann")
        alloc.claim(batch, "ann")
        alloc.set_rules(batch, {"maxpercustomer": 2, "timelimit": 1})
        with pytest.raises(ango.RuleViolation):  # both issues are within the day
            alloc.claim(batch, "ann")
        alloc.set_rules(batch, {"maxpercustomer": 3})
        claim_until(alloc, batch, "ann")
        with pytest.raises(ango.RuleViolation):
            alloc.claim(batch, "ann")
    assert violations(db) == []


def test_rules_tightened_mid_run(dsn, db):
    """20 customers claim as fast as they can under a limit of 50; the limit drops to 2
    mid-run. Nobody who already had 2 gets another code committed after the change."""
    batch = make_batch(dsn, 5000, {"maxpercustomer": 50})
    changed_at = {}

    async def go():
        async with ango.Allocator(dsn, shards=2) as alloc:
            stop = asyncio.Event()

            async def customer(n: int) -> None:
                while not stop.is_set():
                    try:
                        await alloc.claim(batch, f"c-{n}")
                    except ango.RuleViolation:
                        await asyncio.sleep(0.01)

            tasks = [asyncio.ensure_future(customer(n)) for n in range(20)]
            await asyncio.sleep(0.3)
            await alloc.set_rules(batch, {"maxpercustomer": 2})
            changed_at["t"] = db.execute(
                "SELECT rules_changed_at FROM ango.batches").fetchone()[0]
            await asyncio.sleep(1.5)
            stop.set()
            await asyncio.gather(*tasks)

    asyncio.run(go())
    before = dict(db.execute(
        "SELECT customer_id, count(*) FROM ango.issues WHERE issued_at < %s GROUP BY 1",
        (changed_at["t"],)).fetchall())
    after = dict(db.execute(
        "SELECT customer_id, count(*) FROM ango.issues WHERE issued_at >= %s GROUP BY 1",
        (changed_at["t"],)).fetchall())
    assert sum(before.values()) > 20  # the run was under way
    for who, n in after.items():
        assert before.get(who, 0) + n <= 2, (who, before.get(who), n)
    assert violations(db) == []


def test_rule_change_bad_input_is_a_typed_error_and_changes_nothing(dsn, db):
    batch = make_batch(dsn, 3, {"maxpercustomer": 2})
    gone = make_batch(dsn, 3)
    db.execute("UPDATE ango.batches SET expired = true, expired_at = now() WHERE id = %s",
               (gone,))
    before = db.execute("SELECT id, rules, rules_changed_at FROM ango.batches").fetchall()
    with pytest.raises(ango.InvalidInput, match="not valid JSON"):
        set_rules(db, batch, "{maxpercustomer: 1")
    with pytest.raises(ango.InvalidInput, match="unknown key"):
        set_rules(db, batch, {"perday": 1})
    with pytest.raises(ango.InvalidInput, match="whole number"):
        set_rules(db, batch, {"maxpercustomer": "1"})
    with pytest.raises(ango.BatchNotFound):
        set_rules(db, "5f0c6e2a-3b7d-4c1e-9a8f-2d4b6c8e0a1f", None)
    with pytest.raises(ango.BatchExpired):
        set_rules(db, gone, None)
    assert db.execute("SELECT id, rules, rules_changed_at FROM ango.batches").fetchall() == before
    result = cli(dsn, "rules", batch, "--set", '{"maxpercustomer": 5}', "--json")
    assert json.loads(result.stdout) == {"batch_id": batch, "rules": {"maxpercustomer": 5}}
    bad = cli(dsn, "rules", batch, "--set", "[1]")
    assert bad.exit_code == 1 and "must be a JSON object" in bad.output
    assert "Traceback" not in bad.output
    with psycopg.connect(dsn) as conn:
        assert violations(conn) == []
