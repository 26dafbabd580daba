"""Who has code Y, and which codes customer X got: library, CLI, protocol, indexes."""

from __future__ import annotations

import asyncio
import json
import time

import psycopg
import pytest
from click.testing import CliRunner

import ango
from ango.audit import violations
from ango.cli import main
from ango.lookup import customer_codes, lookup_code
from ango.sql import queries
from tests.helpers import CLIENT, make_batch
from tests.servers import TOKEN, InProcessServer


def cli(dsn: str, *args: str):
    return CliRunner().invoke(main, [*args, "--dsn", dsn], catch_exceptions=False)


def test_lookup_tells_issued_available_expired_and_never_imported(dsn, db):
    live = make_batch(dsn, 3, prefix="live")
    gone = make_batch(dsn, 2, prefix="gone")
    with ango.SyncAllocator(dsn, shards=1) as alloc:
        code = alloc.claim(live, "ann", request_id="order-17")
        alloc.expire(gone)
        info = alloc.lookup(code)
        assert info["status"] == "issued" and info["batch_id"] == live
        assert info["customer_id"] == "ann" and info["request_id"] == "order-17"
        assert info["client_id"] == CLIENT and info["issued_at"]
        others = [c for c in ("live-0000000", "live-0000001", "live-0000002") if c != code]
        assert alloc.lookup(others[0])["status"] == "available"
        assert alloc.lookup(others[0])["customer_id"] is None
        assert alloc.lookup("gone-0000000")["status"] == "expired"
        assert alloc.lookup("nope") == {
            "code": "nope", "status": "never_imported", "batch_id": None, "batch_name": None,
            "client_id": None, "customer_id": None, "issued_at": None, "request_id": None}
    assert violations(db) == []


def test_customer_codes_are_newest_first_and_filtered_by_batch(dsn, db):
    first = make_batch(dsn, 5)
    second = make_batch(dsn, 5)
    with ango.SyncAllocator(dsn, shards=1) as alloc:
        got = [alloc.claim(first, "ann"), alloc.claim(second, "ann"), alloc.claim(first, "ann")]
        alloc.claim(first, "bob")
        listed = alloc.customer_codes("ann")
        assert [r["code"] for r in listed] == got[::-1]
        assert [r["code"] for r in alloc.customer_codes("ann", first)] == [got[2], got[0]]
        assert [r["code"] for r in alloc.customer_codes("ann", limit=1)] == [got[2]]
        assert alloc.customer_codes("nobody") == []
        assert alloc.customer_codes("ann", "5f0c6e2a-3b7d-4c1e-9a8f-2d4b6c8e0a1f") == []
        with pytest.raises(ango.InvalidInput, match="batch id"):
            alloc.customer_codes("ann", "not-a-uuid")
        with pytest.raises(ango.InvalidInput, match="limit"):
            alloc.customer_codes("ann", limit=0)
        with pytest.raises(ango.InvalidInput, match="code"):
            alloc.lookup("bad\ncode")
        with pytest.raises(ango.InvalidInput, match="customer id"):
            alloc.customer_codes("")
    assert violations(db) == []


def test_every_code_answered_to_a_claim_is_found_issued_by_a_lookup_at_once(dsn):
    """Look-ups read committed state, and a claim is answered only after its commit (I2)."""
    batch = make_batch(dsn, 400)

    async def go():
        async with ango.Allocator(dsn, shards=2) as alloc:
            async def claim_then_look(n: int):
                code = await alloc.claim(batch, f"cust-{n}")
                return n, code, await alloc.lookup(code)
            return await asyncio.gather(*(claim_then_look(n) for n in range(300)))

    for n, code, info in asyncio.run(go()):
        assert info["status"] == "issued" and info["customer_id"] == f"cust-{n}", (code, info)


def test_cli_lookup_and_customer(dsn, db):
    batch = make_batch(dsn, 3, prefix="cli")
    with ango.SyncAllocator(dsn, shards=1) as alloc:
        code = alloc.claim(batch, "ann", request_id="r-1")
    out = json.loads(cli(dsn, "lookup", code, "--json").stdout)
    assert out["status"] == "issued" and out["customer_id"] == "ann"
    text = cli(dsn, "lookup", code).stdout
    assert "status:      issued" in text and "customer_id: ann" in text
    assert "never_imported" in cli(dsn, "lookup", "missing").stdout
    listed = json.loads(cli(dsn, "customer", "ann", "--batch", batch, "--json").stdout)
    assert [r["code"] for r in listed] == [code]
    assert code in cli(dsn, "customer", "ann").stdout
    bad = cli(dsn, "customer", "ann", "--batch", "xyz")
    assert bad.exit_code == 1 and "batch id must be a UUID" in bad.output
    assert "Traceback" not in bad.output


def test_lookup_and_customer_codes_over_the_protocol(dsn):
    batch = make_batch(dsn, 3)
    with InProcessServer(lambda: ango.Allocator(dsn, shards=1)) as srv:
        with ango.Client(port=srv.port, token=TOKEN, timeout=30) as client:
            code = client.claim(batch, "ann", request_id="r-9")
            info = client.lookup(code)
            assert info["status"] == "issued" and info["request_id"] == "r-9"
            assert info["batch_id"] == batch
            [row] = client.customer_codes("ann", batch)
            assert row["code"] == code and row["batch_id"] == batch
            with pytest.raises(ango.InvalidInput, match="limit"):
                client.customer_codes("ann", limit=51)
            with pytest.raises(ango.InvalidInput):
                client.lookup("")

        async def go():
            async with await ango.AsyncClient.connect(port=srv.port, token=TOKEN,
                                                      timeout=30) as c:
                return await c.lookup(code), await c.customer_codes("ann")

        info, rows = asyncio.run(go())
        assert info["customer_id"] == "ann" and [r["code"] for r in rows] == [code]


def test_lookups_use_indexes_and_answer_in_milliseconds_on_a_large_table(dsn, db):
    """200k codes, all issued to 50k customers: both look-ups are index scans."""
    batch = make_batch(dsn, 200_000, prefix="big")
    db.execute(
        "INSERT INTO ango.issues (code, batch_key, customer_id, request_id, issued_at) "
        "SELECT code, batch_key, 'cust-' || (seq % 50000), 'r-' || seq, "
        "now() - seq * interval '1 second' FROM ango.codes")
    db.execute("ANALYZE")
    for name, params in (("lookup_code", {"code": "big-0123456"}),
                         ("customer_codes", {"customer": "cust-42", "batch": None,
                                             "limit": 1000}),
                         ("customer_codes", {"customer": "cust-42", "batch": batch,
                                             "limit": 1000})):
        plan = "\n".join(r[0] for r in db.execute("EXPLAIN " + queries[name], params))
        # (batches is a table of one row here: scanning it is right)
        assert "Seq Scan on codes" not in plan and "Seq Scan on issues" not in plan, plan
        assert "Index" in plan, plan
    started = time.perf_counter()
    for n in range(100):
        info = lookup_code(db, f"big-{n * 1999:07d}")
        assert info.status == "issued"
        assert len(customer_codes(db, f"cust-{n}")) == 4
    assert time.perf_counter() - started < 10  # 200 look-ups: milliseconds each, not seconds
    with psycopg.connect(dsn) as conn:
        assert violations(conn) == []
