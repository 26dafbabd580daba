"""pytest-benchmark: the embedded allocator at 1, 2 and 4 shards (100 claims in
flight, rule maxpercustomer 2) and the original's per-claim transaction, on the
same server in the same session. Claims/s are in each benchmark's extra_info.

    .venv/bin/python -m pytest benchmarks/test_bench_allocator.py --benchmark-enable \
        --benchmark-columns=min,median,rounds
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from ango.importer import import_codes
from benchmarks._db import CLIENT, fresh_database, server_dsn, write_codes_csv
from benchmarks.allocator import measure_allocator
from benchmarks.load import SeedSide, find_pgbench

SECONDS = 3.0
INFLIGHT = 100


@pytest.fixture(scope="module")
def bench_db():
    with tempfile.TemporaryDirectory() as tmp, fresh_database(server_dsn()) as db:
        path = write_codes_csv(Path(tmp) / "codes.csv", 600_000)
        batch = import_codes(db, path, CLIENT, "bench", {"maxpercustomer": 2})
        yield db, str(batch.batch_id), Path(tmp)


@pytest.mark.parametrize("shards", [1, 2, 4])
def test_allocator_claims_per_second(benchmark, bench_db, shards):
    db, batch, _ = bench_db
    figures = benchmark.pedantic(measure_allocator, args=(db, batch, shards, SECONDS, INFLIGHT),
                                 rounds=1, iterations=1)
    benchmark.extra_info.update(figures)
    assert figures["errors"] == 0


def test_original_per_claim_transaction(benchmark, bench_db):
    db, _, tmp = bench_db
    seed = SeedSide(db, 150_000, find_pgbench(), tmp)
    figures = benchmark.pedantic(seed.run, args=(SECONDS, 1.0, INFLIGHT, None, 0),
                                 rounds=1, iterations=1)
    benchmark.extra_info.update({k: figures[k] for k in ("claims_per_s", "p50_ms", "p99_ms")})
