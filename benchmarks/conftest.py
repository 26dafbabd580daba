"""Under pytest the benchmark suites use the tests' PostgreSQL, not the user's own.

``ANGO_BENCH_DSN``, when set, still wins; otherwise the session's server (the
embedded one in a temporary directory, or ``ANGO_TEST_DSN``) is used, so that
CI's run of every suite (once, benchmark-disabled) leaves nothing behind.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session", autouse=True)
def bench_server(server_dsn: str) -> Iterator[None]:
    """Point ``benchmarks._db.server_dsn`` at the session's PostgreSQL."""
    if os.environ.get("ANGO_BENCH_DSN"):
        yield
        return
    os.environ["ANGO_BENCH_DSN"] = server_dsn
    try:
        yield
    finally:
        del os.environ["ANGO_BENCH_DSN"]
