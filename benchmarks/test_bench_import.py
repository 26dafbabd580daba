"""pytest-benchmark: import 20,000 codes vs a plain COPY of the same file.

    .venv/bin/python -m pytest benchmarks/test_bench_import.py --benchmark-enable

Not part of the test suite (testpaths = tests, and benchmarks are disabled by
default). The server is ``ANGO_BENCH_DSN``, else Ango's own lookup (ANGO_DSN,
DATABASE_URL, else the embedded PostgreSQL); each round gets a fresh database.
"""

from __future__ import annotations

from contextlib import ExitStack

import pytest

from ango.importer import import_codes
from benchmarks._db import (
    CLIENT,
    create_plain_table,
    fresh_database,
    plain_copy,
    server_dsn,
    write_codes_csv,
)

CODES = 20_000
ROUNDS = 5


@pytest.fixture(scope="module")
def server() -> str:
    return server_dsn()


@pytest.fixture(scope="module")
def codes_csv(tmp_path_factory):
    return write_codes_csv(tmp_path_factory.mktemp("bench") / "codes.csv", CODES)


def _rounds(benchmark, server, target):
    """Run ``target(dsn)`` once per round, each in a fresh database made outside the timing."""
    with ExitStack() as databases:

        def setup():
            dsn = databases.enter_context(fresh_database(server))
            create_plain_table(dsn)
            return (dsn,), {}

        return benchmark.pedantic(target, setup=setup, rounds=ROUNDS, iterations=1)


def test_bench_import_20k_codes(benchmark, server, codes_csv):
    result = _rounds(benchmark, server, lambda dsn: import_codes(dsn, codes_csv, CLIENT, "bench"))
    assert result.imported == CODES


def test_bench_plain_copy_20k_codes(benchmark, server, codes_csv):
    assert _rounds(benchmark, server, lambda dsn: plain_copy(dsn, codes_csv)) == CODES
