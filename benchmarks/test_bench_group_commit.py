"""pytest-benchmark: one group commit of 1,000 (and of 50) claims, on a real PostgreSQL.

    .venv/bin/python -m pytest benchmarks/test_bench_group_commit.py --benchmark-enable

Each round runs a shard's ``ango.shards.group_commit.GroupCommit.commit``
itself, answering through ``Shard.answer`` — the ``issue_group`` call of
``ango.sql.queries`` (the function ``ango.issue_group_v1``) with the parameters
it builds, one autocommitted statement — for 1,000 claims of 1,000 fresh
customers (and for 50, the group size a shard commits at C = 100 with two
shards), on codes leased beforehand with ``lease_block`` (outside the timing).
The server is ``ANGO_BENCH_DSN``, else Ango's own lookup; the database is made for the module
(``benchmarks._db.fresh_database``) and dropped afterwards.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import time
import uuid

import psycopg
import pytest

from ango.importer import import_codes
from ango.shards.claims import BatchMeta, Pending
from ango.shards.worker import Shard
from ango.sql import queries
from benchmarks._db import CLIENT, fresh_database, server_dsn, write_codes_csv

GROUP = 1000
# The group a shard commits at C = 100 with two shards is about 50 claims.
SIZES = [GROUP, 50]
ROUNDS = 20


@pytest.fixture(scope="module")
def bench_db(tmp_path_factory):
    """A fresh database with two batches: rule ``maxpercustomer 1`` and no rule."""
    codes = sum(SIZES) * (ROUNDS + 5)
    with fresh_database(server_dsn()) as db:
        folder = tmp_path_factory.mktemp("group")
        ruled = import_codes(db, write_codes_csv(folder / "a.csv", codes), CLIENT, "ruled",
                             {"maxpercustomer": 1})
        plain_csv = folder / "b.csv"
        with open(plain_csv, "w") as out:  # other codes than a.csv's
            out.write("code\n" + "".join(f"B{i:015d}\n" for i in range(codes)))
        plain = import_codes(db, plain_csv, CLIENT, "plain", None)
        with psycopg.connect(db, autocommit=True) as conn:
            keys = {str(k): v for k, v in conn.execute("SELECT id, key FROM ango.batches")}
        yield db, {True: (str(ruled.batch_id), keys[str(ruled.batch_id)]),
                   False: (str(plain.batch_id), keys[str(plain.batch_id)])}


_tags = itertools.count(1)


@pytest.mark.parametrize("size", SIZES, ids=[f"{n}_claims" for n in SIZES])
@pytest.mark.parametrize("ruled", [True, False], ids=["rule_maxpercustomer_1", "no_rule"])
def test_bench_group_commit(benchmark, bench_db, ruled, size):
    db, batches = bench_db
    batch_id, key = batches[ruled]
    meta = BatchMeta(key, CLIENT, 1 if ruled else None, None, False)
    loop = asyncio.new_event_loop()
    shard = Shard(db, 0, 1, str(uuid.uuid4()), [])
    sync = psycopg.connect(db, autocommit=True)
    sync.execute(queries["register_owner"], (shard.owner, shard.instance, 0, os.getpid(),
                                            socket.gethostname(), []))
    group_commit, conn = shard.group_commit, shard.store.control
    loop.run_until_complete(conn.connect())

    def setup():
        rows = sync.execute(queries["lease_block"], {"key": key, "n": size, "min": size,
                                                     "split": 2, "me": shard.owner}).fetchall()
        assert len(rows) == size
        lease = rows[0][0]
        group_commit.pool.add_lease(lease, key, [row[1] for row in rows])
        now = time.monotonic()
        group = []
        for _ in range(size):
            tag = next(_tags)
            p = Pending(tag, batch_id, f"customer-{tag}", None, uuid.uuid4().hex, now)
            p.meta = meta
            p.slot = 0 if ruled else None
            p.code, p.lease = group_commit.pool.take(key)
            group.append(p)
        shard.results = []
        return (group,), {}

    def commit(group):
        loop.run_until_complete(group_commit.commit(group, [], conn))
        return sum(1 for r in shard.results if r.code is not None and r.error is None)

    try:
        issued = benchmark.pedantic(commit, setup=setup, rounds=ROUNDS, iterations=1)
    finally:
        loop.run_until_complete(conn.close(2.0))
        loop.close()
        sync.close()
    assert issued == size
