"""`ango delete BATCH_ID [--purge]`: clean up a batch that is over."""

from __future__ import annotations

import json
import time
from datetime import timedelta

import psycopg
import pytest
from click.testing import CliRunner

import ango
from ango.audit import violations
from ango.batches import delete_batch
from ango.cli import EXIT_NOT_FOUND, main
from tests.helpers import make_batch


def cli(dsn: str, *args: str, input: str | None = None):
    return CliRunner().invoke(main, [*args, "--dsn", dsn], input=input, catch_exceptions=False)


def counts(db) -> tuple:
    return db.execute(
        "SELECT (SELECT count(*) FROM ango.batches), (SELECT count(*) FROM ango.codes), "
        "(SELECT count(*) FROM ango.issues), (SELECT count(*) FROM ango.leases), "
        "(SELECT count(*) FROM ango.lease_cursors), (SELECT count(*) FROM ango.slots)"
    ).fetchone()


def test_delete_refuses_a_live_batch_and_bad_input_changing_nothing(dsn, db):
    batch = make_batch(dsn, 3)
    before = counts(db)
    with pytest.raises(ango.InvalidInput, match="is live: expire it first"):
        delete_batch(db, batch)
    with pytest.raises(ango.InvalidInput, match="is live"):
        delete_batch(db, batch, purge=True)
    with pytest.raises(ango.BatchNotFound):
        delete_batch(db, "5f0c6e2a-3b7d-4c1e-9a8f-2d4b6c8e0a1f")
    with pytest.raises(ango.InvalidInput, match="batch id"):
        delete_batch(db, "x")
    result = cli(dsn, "delete", batch)
    assert result.exit_code == 1 and "is live" in result.output
    assert counts(db) == before


def test_delete_keeps_the_issued_codes_and_drops_the_rest(dsn, db):
    batch = make_batch(dsn, 200, {"maxpercustomer": 1, "timelimit": 3}, prefix="del")
    other = make_batch(dsn, 20)
    with ango.SyncAllocator(dsn, shards=2) as alloc:
        given = [alloc.claim(batch, f"c-{n}") for n in range(5)]
        assert db.execute("SELECT count(*) FROM ango.leases").fetchone()[0] > 0
        alloc.expire(batch)
        result = alloc.delete(batch)
        assert result == {"batch_id": batch, "purged": False, "codes_deleted": 195,
                          "issues_deleted": 0}
        assert alloc.delete(batch)["codes_deleted"] == 0  # idempotent
        assert alloc.lookup(given[0])["status"] == "issued"
        assert alloc.customer_codes("c-1", batch)[0]["code"] == given[1]
        unissued = next(f"del-{n:07d}" for n in range(200) if f"del-{n:07d}" not in given)
        assert alloc.lookup(unissued)["status"] == "never_imported"
        listed = {b["id"]: b for b in alloc.batches()}
        assert (listed[batch]["total"], listed[batch]["available"]) == (5, 0)
        with pytest.raises(ango.BatchExpired):
            alloc.claim(batch, "late")
        alloc.claim(other, "still-served")
    assert db.execute("SELECT count(*) FROM ango.codes c JOIN ango.batches b "
                      "ON b.key = c.batch_key WHERE b.id = %s", (batch,)).fetchone() == (5,)
    assert db.execute("SELECT count(*) FROM ango.leases l JOIN ango.batches b "
                      "ON b.key = l.batch_key WHERE b.id = %s", (batch,)).fetchone() == (0,)
    assert violations(db) == []


def test_a_batch_past_its_scheduled_end_can_be_deleted_while_shards_hold_its_codes(dsn, db):
    batch = make_batch(dsn, 100)
    with ango.SyncAllocator(dsn, shards=2) as alloc:
        alloc.claim(batch, "ann")
        (now,) = db.execute("SELECT clock_timestamp()").fetchone()
        alloc.set_schedule(batch, keep_start=True, expires_at=now + timedelta(seconds=0.5))
        time.sleep(0.7)
        assert alloc.delete(batch)["codes_deleted"] == 99
        with pytest.raises(ango.BatchExpired):
            alloc.claim(batch, "bob")
    assert violations(db) == []


def test_purge_asks_for_confirmation_and_removes_every_trace(dsn, db):
    batch = make_batch(dsn, 10, {"maxpercustomer": 2, "timelimit": 1})
    keep = make_batch(dsn, 4)
    with ango.SyncAllocator(dsn, shards=1) as alloc:
        code = alloc.claim(batch, "ann")
        alloc.claim(keep, "ann")
        alloc.expire(batch)
    before = counts(db)
    refused = cli(dsn, "delete", batch, "--purge", input="n\n")
    assert refused.exit_code == 1 and counts(db) == before
    result = cli(dsn, "delete", batch, "--purge", input="y\n", )
    assert result.exit_code == 0 and "purged" in result.output
    assert counts(db)[:3] == (1, 4, 1)
    assert json.loads(cli(dsn, "lookup", code, "--json").stdout)["status"] == "never_imported"
    again = cli(dsn, "delete", batch, "--purge", "--yes", "--json")
    assert again.exit_code == EXIT_NOT_FOUND and "no batch" in again.output
    with psycopg.connect(dsn) as conn:
        assert violations(conn) == []
