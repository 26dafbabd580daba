"""Ango starts only as many shards as PostgreSQL has connections for, and says why.

A small connection limit is made within the test's own database (a role or a
database CONNECTION LIMIT, which bind non-superusers), never by changing the
server's settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import ango
from ango.allocator import shards_for
from ango.database import ConnectionBudget
from ango.errors import ConfigurationError
from ango.shards.supervisor import (
    ALLOCATOR_CONNECTIONS,
    ShardHandle,
    connections_needed,
    connections_per_shard,
)
from tests.helpers import make_batch, run


@contextlib.contextmanager
def limited_role(dsn: str, connection_limit: int = -1) -> Iterator[str]:
    """A DSN for a new non-superuser role with every right on the test's schema."""
    role = f"ango_r_{uuid.uuid4().hex[:10]}"
    dbname = conninfo_to_dict(dsn)["dbname"]
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN CONNECTION LIMIT {int(connection_limit)}")
        conn.execute(f'GRANT CONNECT, CREATE ON DATABASE "{dbname}" TO {role}')
        conn.execute(f"GRANT USAGE, CREATE ON SCHEMA ango TO {role}")
        conn.execute(f"GRANT ALL ON ALL TABLES IN SCHEMA ango TO {role}")
        conn.execute(f"GRANT ALL ON ALL SEQUENCES IN SCHEMA ango TO {role}")
    try:
        yield make_conninfo(dsn, user=role)
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                         "WHERE usename = %s", (role,))
            conn.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")


def owners(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT count(*) FROM ango.owners").fetchone()[0]


def test_more_shards_than_the_role_may_connect_is_refused_naming_the_numbers(dsn):
    with limited_role(dsn, connection_limit=10) as small:
        with pytest.raises(ConfigurationError) as raised:
            run(ango.Allocator(small, shards=3).start())
    message = str(raised.value)
    assert f"3 shard(s) need {connections_needed(3)} PostgreSQL connections" in message
    assert (f"({connections_per_shard()} per shard + {ALLOCATOR_CONNECTIONS} for the Allocator)"
            in message)
    assert "room for 10 more" in message and "CONNECTION LIMIT 10" in message
    fits = (10 - ALLOCATOR_CONNECTIONS) // connections_per_shard()
    assert f"use at most {fits} shard(s)" in message
    assert owners(dsn) == 0  # refused before any shard started


def test_default_shard_count_fits_the_connections_the_database_allows(dsn):
    batch = make_batch(dsn, 10)
    with psycopg.connect(dsn, autocommit=True) as conn:
        dbname = conninfo_to_dict(dsn)["dbname"]
        conn.execute(f'ALTER DATABASE "{dbname}" CONNECTION LIMIT {connections_needed(1) + 2}')

    async def go(small: str):
        async with ango.Allocator(small) as alloc:
            return alloc.shard_count, await alloc.claim(batch, "fits")

    with limited_role(dsn) as small:
        shards, code = run(go(small))
    assert shards == 1
    assert code


def test_a_shard_that_cannot_connect_says_what_postgresql_said(dsn):
    # Past the Allocator's check (another client took the connections since):
    # the shard's own error names PostgreSQL's reason and what Ango needs.
    with limited_role(dsn, connection_limit=2) as small:
        with psycopg.connect(small), psycopg.connect(small):
            shard = ShardHandle(0, 1, str(uuid.uuid4()), [0], small, lambda reply: None)
            with pytest.raises(ango.Unavailable) as raised:
                run(asyncio.wait_for(shard.start(), 30))
    message = str(raised.value)
    assert message.startswith("shard 0 did not start: ")
    assert "too many connections for role" in message
    assert f"each shard holds {connections_per_shard()} PostgreSQL connections" in message


def test_serve_with_too_many_shards_exits_with_one_line_naming_the_numbers(dsn, tmp_path):
    with limited_role(dsn, connection_limit=6) as small:
        done = subprocess.run(
            [sys.executable, "-m", "ango", "serve", "--dsn", small, "--shards", "2",
             "--port", "0", "--token", "t" * 32, "--data-dir", str(tmp_path)],
            capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert f"2 shard(s) need {connections_needed(2)} PostgreSQL connections" in done.stderr


def test_one_shard_per_core_is_capped_by_the_servers_connections():
    # The case: 25 cores, max_connections 100, nothing else connected.
    server = ConnectionBudget(max_connections=100, reserved=3, superuser=False, role_limit=-1,
                              database_limit=-1, in_use=0, role_in_use=0, database_in_use=0)
    chosen = shards_for(None, server, cores=25)
    assert connections_needed(chosen) + connections_per_shard() <= server.available
    fits = (server.available - ALLOCATOR_CONNECTIONS) // connections_per_shard()
    assert chosen == fits - 1
    assert shards_for(None, server, cores=2) == 2
    with pytest.raises(ConfigurationError, match=f"use at most {fits} shard"):
        shards_for(25, server)
