"""Top-up: `ango import FILE --into BATCH_ID` adds codes to a running batch."""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time

import psycopg
import pytest
from click.testing import CliRunner

import ango
from ango.audit import violations
from ango.cli import main
from ango.errors import ImportFailed
from ango.importer import top_up
from tests.helpers import CLIENT, make_batch

OTHER_CLIENT = "c0ffee00-0000-4000-8000-000000000002"


def cli(dsn: str, *args: str):
    return CliRunner().invoke(main, [*args, "--dsn", dsn], catch_exceptions=False)


def codes_file(codes: list[str], client: str = CLIENT) -> io.BytesIO:
    return io.BytesIO(("client_id,code\n" + "".join(f"{client},{c}\n" for c in codes)).encode())


def state(db) -> tuple:
    return db.execute(
        "SELECT (SELECT count(*) FROM ango.codes), (SELECT sum(total) FROM ango.batches), "
        "(SELECT sum(total) FROM ango.lease_cursors)").fetchone()


def test_top_up_numbers_new_codes_after_the_batch_and_grows_its_total(dsn, db):
    batch = make_batch(dsn, 3, prefix="t")
    result = top_up(dsn, codes_file(["n-1", "n-2"]), batch)
    assert (str(result.batch_id), result.imported) == (batch, 2)
    rows = db.execute("SELECT code, seq FROM ango.codes ORDER BY seq").fetchall()
    assert rows == [("t-0000000", 1), ("t-0000001", 2), ("t-0000002", 3), ("n-1", 4), ("n-2", 5)]
    assert state(db) == (5, 5, 5)
    [listed] = json.loads(cli(dsn, "batches", "--json").stdout)
    assert (listed["total"], listed["available"]) == (5, 5)


def test_top_up_bad_input_is_a_typed_error_and_changes_nothing(dsn, db):
    batch = make_batch(dsn, 2, prefix="own")
    other = make_batch(dsn, 2, prefix="oth")
    before = state(db)
    with pytest.raises(ImportFailed, match=rf"line 3: code 'oth-0000001' is already in the "
                                           rf"database \(batch {other}\)"):
        top_up(dsn, codes_file(["new-1", "oth-0000001"]), batch)
    with pytest.raises(ImportFailed, match="line 3: code 'x' is repeated in the file"):
        top_up(dsn, codes_file(["x", "x"]), batch)
    with pytest.raises(ImportFailed, match="line 2: client_id"):
        top_up(dsn, codes_file(["y"], OTHER_CLIENT), batch)
    with pytest.raises(ango.InvalidInput, match="belongs to client"):
        top_up(dsn, codes_file(["y"]), batch, OTHER_CLIENT)
    with pytest.raises(ango.BatchNotFound):
        top_up(dsn, codes_file(["y"]), "5f0c6e2a-3b7d-4c1e-9a8f-2d4b6c8e0a1f")
    with pytest.raises(ango.InvalidInput, match="batch id"):
        top_up(dsn, codes_file(["y"]), "nope")
    with pytest.raises(ImportFailed, match="no codes"):
        top_up(dsn, io.BytesIO(b"code\n"), batch)
    with ango.SyncAllocator(dsn, shards=1) as alloc:
        alloc.expire(other)
    with pytest.raises(ango.BatchExpired):
        top_up(dsn, codes_file(["z"]), other)
    assert state(db) == before


def test_cli_import_into(dsn, db, tmp_path):
    batch = make_batch(dsn, 1)
    path = tmp_path / "more.csv"
    path.write_text("code\nm-1\nm-2\n")
    result = cli(dsn, "import", str(path), "--into", batch, "--json")
    assert result.exit_code == 0 and json.loads(result.stdout) == {"batch_id": batch,
                                                                   "imported": 2}
    assert result.stderr == ""
    again = cli(dsn, "import", str(path), "--into", batch)
    assert again.exit_code == 1 and "line 2: code 'm-1' is already in the database" in again.output
    bad = cli(dsn, "import", str(path), "--into", batch, "--rules", "{}")
    assert bad.exit_code == 2 and "--into" in bad.output
    bad = cli(dsn, "import", str(path), "--batch", "x")
    assert bad.exit_code == 2 and "--client and --batch" in bad.output
    assert db.execute("SELECT total FROM ango.batches").fetchone() == (3,)


def test_top_up_while_1000_claims_run_against_the_exhausted_batch(dsn, db):
    """Claims answered exhausted before the top-up commits are truthful; every claim
    sent after it returns gets a code, from running shards that were never restarted."""
    batch = make_batch(dsn, 50, prefix="old")
    added: dict[str, float] = {}

    def add() -> None:
        codes = [f"new-{n:05d}" for n in range(1000)]
        top_up(dsn, codes_file(codes), batch)
        added["at"] = time.monotonic()

    async def go():
        async with ango.Allocator(dsn, shards=2) as alloc:
            pids = alloc.shard_pids()
            first = await asyncio.gather(*(alloc.claim(batch, f"c-{n}") for n in range(50)))
            with pytest.raises(ango.BatchExhausted):
                await alloc.claim(batch, "late")
            thread = threading.Thread(target=add)
            outcomes: list[tuple[float, object]] = []

            async def one(n: int) -> None:
                sent = time.monotonic()
                try:
                    outcomes.append((sent, await alloc.claim(batch, f"d-{n}")))
                except ango.AngoError as exc:
                    outcomes.append((sent, exc))

            tasks = []
            for n in range(1000):
                if n == 200:
                    thread.start()
                tasks.append(asyncio.ensure_future(one(n)))
                await asyncio.sleep(0.002)
            await asyncio.gather(*tasks)
            thread.join()
            assert alloc.shard_pids() == pids  # no restart
            assert await alloc.top_up(codes_file(["last"]), batch) == 1  # the library call
            await alloc.claim(batch, "last")
            return first, outcomes

    first, outcomes = asyncio.run(go())
    codes = [r for _, r in outcomes if isinstance(r, str)]
    errors = [r for _, r in outcomes if not isinstance(r, str)]
    assert all(isinstance(e, ango.BatchExhausted) for e in errors), errors[:3]
    assert all(c.startswith("new-") for c in codes)
    assert len(set(codes + first)) == len(codes) + 50  # nothing twice
    after = [r for sent, r in outcomes if sent > added["at"]]
    assert after and all(isinstance(r, str) for r in after)
    assert len(codes) >= len(after)
    assert errors  # some were sent while the batch was exhausted, and were told so
    issued = db.execute("SELECT count(*) FROM ango.issues").fetchone()[0]
    assert issued == 50 + len(codes) + 1
    with psycopg.connect(dsn) as conn:
        assert violations(conn) == []


def test_a_lease_that_waited_for_a_committing_top_up_holds_its_new_codes(dsn, db):
    """The lease statement waits for the cursor row while the top-up commits: it
    then sees the new cursor but, in its older snapshot, not the new codes. Before
    the fix the shard recorded the lease, held none of its codes and answered
    exhausted with a code left (I7)."""
    from ango.sql import queries

    batch = make_batch(dsn, 1, prefix="one")
    key = db.execute("SELECT key FROM ango.batches WHERE id = %s", (batch,)).fetchone()[0]

    async def go():
        async with ango.Allocator(dsn, shards=1) as alloc:
            await alloc.claim(batch, "a")  # the only code: the cursor is spent
            with psycopg.connect(dsn) as top:  # a top-up, held open until the lease waits
                top.execute("INSERT INTO ango.codes (code, batch_key, seq) "
                            "VALUES ('late-1', %s, 2)", (key,))
                top.execute(queries["grow_batch"], {"added": 1, "key": key})
                waiting = asyncio.ensure_future(alloc.claim(batch, "b"))
                await asyncio.sleep(1.0)  # the shard's lease now waits for the cursor row
                blocked = not waiting.done()
                top.commit()
            return blocked, await asyncio.wait_for(waiting, 30)

    blocked, code = asyncio.run(go())
    assert blocked and code == "late-1"
    with psycopg.connect(dsn) as conn:
        assert violations(conn) == []
