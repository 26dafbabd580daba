"""Schedules: a batch hands out codes only in [starts_at, expires_at), exact to the
issuing transaction's timestamp, judged by the database's clock."""

from __future__ import annotations

import asyncio
import io
import json
import time
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from click.testing import CliRunner

import ango
from ango.audit import violations
from ango.cli import main
from ango.importer import import_codes
from ango.schedules import UNCHANGED, set_schedule
from tests.helpers import CLIENT, make_batch
from tests.servers import TOKEN, InProcessServer


def cli(dsn: str, *args: str):
    return CliRunner().invoke(main, [*args, "--dsn", dsn], catch_exceptions=False)


def scheduled_batch(dsn: str, count: int, starts_at=None, expires_at=None) -> str:
    body = "code\n" + "".join(f"s{time.monotonic_ns()}-{i}\n" for i in range(count))
    return str(import_codes(dsn, io.BytesIO(body.encode()), CLIENT, "scheduled",
                            starts_at=starts_at, expires_at=expires_at).batch_id)


def db_now(db) -> datetime:
    return db.execute("SELECT clock_timestamp()").fetchone()[0]


def test_a_claim_before_the_start_is_refused_with_its_own_error(dsn, db):
    batch = scheduled_batch(dsn, 5, starts_at=db_now(db) + timedelta(hours=1))
    with ango.SyncAllocator(dsn, shards=1) as alloc:
        for _ in range(3):
            with pytest.raises(ango.BatchNotStarted, match="has not started"):
                alloc.claim(batch, "ann")
        schedule = alloc.set_schedule(batch, None, keep_end=True)  # start now
        assert schedule == {"batch_id": batch, "starts_at": None, "expires_at": None}
        assert alloc.claim(batch, "ann")  # at once: shards cache nothing of a start
    assert db.execute("SELECT count(*) FROM ango.issues").fetchone() == (1,)
    assert violations(db) == []


def test_after_the_end_a_claim_is_refused_exactly_like_an_expired_batch(dsn, db):
    batch = scheduled_batch(dsn, 5, expires_at=db_now(db) + timedelta(days=1))
    with ango.SyncAllocator(dsn, shards=1) as alloc:
        end = db_now(db) + timedelta(seconds=1)
        alloc.set_schedule(batch, keep_start=True, expires_at=end)
        assert alloc.claim(batch, "ann")
        while db_now(db) < end:
            time.sleep(0.1)
        for who in ("bob", "cy"):
            with pytest.raises(ango.BatchExpired):
                alloc.claim(batch, who)
        (unissued,) = db.execute("SELECT code FROM ango.codes WHERE NOT EXISTS "
                                 "(SELECT 1 FROM ango.issues i WHERE i.code = codes.code) "
                                 "LIMIT 1").fetchone()
        assert alloc.lookup(unissued)["status"] == "expired"
        with pytest.raises(ango.BatchExpired, match="stays ended"):
            alloc.set_schedule(batch, keep_start=True,
                               expires_at=datetime.now(UTC) + timedelta(days=1))
    assert violations(db) == []


def test_expires_at_reached_mid_run_with_claims_in_flight(dsn, db):
    """Every code issued has issued_at (its transaction's instant) before the end;
    every claim sent after the end (by the database's clock) is refused as expired."""
    batch = make_batch(dsn, 60_000)
    outcomes: list[tuple[float, object]] = []
    end = None

    async def go():
        nonlocal end
        async with ango.Allocator(dsn, shards=2) as alloc:
            await alloc.claim(batch, "warm-up")
            end = db_now(db) + timedelta(seconds=1.5)
            await alloc.set_schedule(batch, keep_start=True, expires_at=end)

            async def stream(n: int) -> None:
                for k in range(10_000):
                    sent = time.time()
                    try:
                        outcomes.append((sent, await alloc.claim(batch, f"c-{n}-{k}")))
                    except ango.AngoError as exc:
                        outcomes.append((sent, exc))
                        if sent > end.timestamp() + 0.5:
                            return
            await asyncio.gather(*(stream(n) for n in range(64)))

    asyncio.run(go())
    codes = [r for _, r in outcomes if isinstance(r, str)]
    errors = [r for _, r in outcomes if not isinstance(r, str)]
    assert codes and errors
    assert all(isinstance(e, ango.BatchExpired) for e in errors), errors[:3]
    latest = db.execute("SELECT max(issued_at), count(*) FROM ango.issues").fetchone()
    assert latest[0] < end and latest[1] == len(codes) + 1
    assert all(not isinstance(r, str) for sent, r in outcomes if sent >= end.timestamp())
    assert violations(db) == []


def test_schedule_bad_input_is_a_typed_error_and_changes_nothing(dsn, db):
    now = db_now(db)
    with pytest.raises(ango.InvalidInput, match="must come after starts_at"):
        scheduled_batch(dsn, 2, starts_at=now + timedelta(days=2), expires_at=now)
    with pytest.raises(ango.InvalidInput, match="time zone"):
        scheduled_batch(dsn, 2, starts_at="2030-01-01T00:00:00")
    with pytest.raises(ango.InvalidInput, match="ISO 8601"):
        scheduled_batch(dsn, 2, expires_at="next tuesday")
    assert db.execute("SELECT count(*) FROM ango.batches").fetchone() == (0,)
    live = make_batch(dsn, 2)
    future = scheduled_batch(dsn, 2, starts_at=now + timedelta(days=1),
                             expires_at=now + timedelta(days=3))
    schedules = "SELECT id, starts_at, expires_at FROM ango.batches ORDER BY key"
    before = db.execute(schedules).fetchall()
    with pytest.raises(ango.InvalidInput, match="in the future"):
        set_schedule(db, live, UNCHANGED, now - timedelta(seconds=1))
    with pytest.raises(ango.InvalidInput, match="start can only move earlier"):
        set_schedule(db, live, now + timedelta(hours=1))
    with pytest.raises(ango.InvalidInput, match="must come after"):
        set_schedule(db, future, now + timedelta(days=4))
    with pytest.raises(ango.BatchNotFound):
        set_schedule(db, "5f0c6e2a-3b7d-4c1e-9a8f-2d4b6c8e0a1f", None)
    with pytest.raises(ango.InvalidInput, match="batch id"):
        set_schedule(db, "x", None)
    assert db.execute(schedules).fetchall() == before
    # A batch not started yet may move its start anywhere before its end.
    moved = set_schedule(db, future, now + timedelta(days=2))
    assert moved.starts_at is not None and moved.expires_at is not None


def test_cli_import_with_a_schedule_and_ango_schedule(dsn, db, tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("code\nA\nB\n")
    result = cli(dsn, "import", str(path), "--client", CLIENT, "--batch", "x",
                 "--starts-at", "2031-01-01T00:00:00Z", "--expires-at", "2031-02-01T00:00:00+01:00",
                 "--json")
    assert result.exit_code == 0, result.output
    batch = json.loads(result.stdout)["batch_id"]
    row = db.execute("SELECT starts_at, expires_at FROM ango.batches").fetchone()
    assert row == (datetime(2031, 1, 1, tzinfo=UTC), datetime(2031, 1, 31, 23, tzinfo=UTC))
    [listed] = json.loads(cli(dsn, "batches", "--json").stdout)
    assert [datetime.fromisoformat(listed[k]) for k in ("starts_at", "expires_at")] == list(row)
    result = cli(dsn, "schedule", batch, "--expires-at", "none", "--json")
    assert json.loads(result.stdout)["expires_at"] is None
    bad = cli(dsn, "schedule", batch, "--expires-at", "yesterday")
    assert bad.exit_code == 1 and "ISO 8601" in bad.output and "Traceback" not in bad.output
    bad = cli(dsn, "import", str(path), "--client", CLIENT, "--batch", "y",
              "--starts-at", "2031-01-02T00:00:00Z", "--expires-at", "2031-01-01T00:00:00Z")
    assert bad.exit_code == 1 and "must come after" in bad.output
    assert db.execute("SELECT count(*) FROM ango.batches").fetchone() == (1,)


def test_not_started_over_the_protocol_is_its_own_error_class(dsn, db):
    batch = scheduled_batch(dsn, 2, starts_at=db_now(db) + timedelta(hours=1))
    with InProcessServer(lambda: ango.Allocator(dsn, shards=1)) as srv:
        with ango.Client(port=srv.port, token=TOKEN, timeout=30) as client:
            with pytest.raises(ango.BatchNotStarted):
                client.claim(batch, "ann")
    with psycopg.connect(dsn) as conn:
        assert violations(conn) == []
