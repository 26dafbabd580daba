"""Database trouble becomes Ango's errors at one boundary (``ango.database.connect``).

Real servers made unusable: a closed port, a database that does not exist or
refuses connections, an unknown role, a role over its connection limit.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import ango
from ango import database
from ango.errors import (
    ConfigurationError,
    DatabaseMissing,
    DatabaseRefused,
    DatabaseUnavailable,
    Unavailable,
)
from tests.conftest import with_dbname
from tests.helpers import make_batch, run
from tests.servers import TOKEN, InProcessServer


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def refusing_connections(server_dsn: str, dsn: str) -> Iterator[None]:
    """New connections to ``dsn``'s database are refused; existing ones live on."""
    name = conninfo_to_dict(dsn)["dbname"]
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        try:
            yield
        finally:
            conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')


@contextmanager
def role(server_dsn: str, limit: int) -> Iterator[str]:
    """A login role (not a superuser) with a connection limit; its DSN."""
    name = f"ango_r_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE ROLE "{name}" LOGIN CONNECTION LIMIT {int(limit)}')
        try:
            params = conninfo_to_dict(server_dsn)
            params["user"] = name
            yield make_conninfo(**params)
        finally:
            conn.execute(f'DROP ROLE "{name}"')


def connect_error(dsn: str) -> Exception:
    with pytest.raises(ango.AngoError) as info, database.connect(dsn):
        pass
    return info.value


def test_allocator_batches_and_expire_answer_unavailable_when_the_database_refuses_connections(
    server_dsn, dsn
):
    batch = make_batch(dsn, 3)

    async def go():
        async with ango.Allocator(dsn, shards=1) as alloc:
            with refusing_connections(server_dsn, dsn):
                with pytest.raises(Unavailable) as listed:
                    await alloc.batches()
                with pytest.raises(Unavailable) as expired:
                    await alloc.expire(batch)
            return listed.value, expired.value

    listed, expired = run(go())
    for exc in (listed, expired):
        assert exc.retryable and exc.code == "unavailable"
        assert "not currently accepting connections" in str(exc)


def test_server_answers_batch_list_and_expire_with_retryable_unavailable_in_a_database_outage(
    server_dsn, dsn
):
    batch = make_batch(dsn, 3)
    with InProcessServer(lambda: ango.Allocator(dsn, shards=1)) as served:
        with ango.Client(port=served.port, token=TOKEN, timeout=0.5) as client:
            with refusing_connections(server_dsn, dsn):
                # The client retries `unavailable` until its timeout, then raises it;
                # an "internal error" would be raised at once as a plain AngoError.
                with pytest.raises(Unavailable):
                    client.batches()
                with pytest.raises(Unavailable):
                    client.expire(batch)
            assert client.expire(batch) is True


def test_a_closed_port_is_unavailable_and_names_host_and_port():
    port = closed_port()
    exc = connect_error(f"postgresql://ango:s3cret-pw@127.0.0.1:{port}/ango")
    assert isinstance(exc, DatabaseUnavailable) and exc.retryable
    assert f"127.0.0.1:{port}" in str(exc)
    assert "s3cret" not in str(exc)


def test_a_missing_database_is_named(server_dsn):
    exc = connect_error(with_dbname(server_dsn, "ango_no_such_db"))
    assert isinstance(exc, DatabaseMissing)
    assert 'database "ango_no_such_db" does not exist' in str(exc)


def test_an_unknown_user_is_refused(server_dsn):
    params = conninfo_to_dict(server_dsn)
    params["user"] = "ango_no_such_role"
    exc = connect_error(make_conninfo(**params))
    assert isinstance(exc, DatabaseRefused)
    assert "ango_no_such_role" in str(exc)


def test_too_many_clients_is_unavailable(server_dsn):
    with role(server_dsn, 0) as limited:
        exc = connect_error(limited)
    assert type(exc) is DatabaseUnavailable
    assert "too many connections" in str(exc)


@pytest.mark.parametrize("dsn", [
    "host=db password=sec ret",
    "postgresql://ango:s3cret@db:notaport/ango",
    "postgresql://ango:s3cret@db/ango?sslmode",
])
def test_a_malformed_dsn_is_a_configuration_error_without_the_password(dsn):
    exc = connect_error(dsn)
    assert isinstance(exc, ConfigurationError)
    assert str(exc).startswith("the database DSN is malformed")
    assert "ret" not in str(exc).replace("after", "") and "s3cret" not in str(exc)


@pytest.mark.parametrize(("text", "kind"), [
    ('connection to server at "db", port 5432 failed: FATAL:  password authentication failed '
     'for user "ango"', DatabaseRefused),
    ('connection to server at "db", port 5432 failed: FATAL:  no pg_hba.conf entry for host '
     '"10.0.0.9", user "ango", database "ango", no encryption', DatabaseRefused),
    ('connection to server at "db", port 5432 failed: FATAL:  permission denied for database '
     '"ango"', DatabaseRefused),
    ('connection to server at "db", port 5432 failed: FATAL:  sorry, too many clients already',
     DatabaseUnavailable),
    ('connection to server at "db", port 5432 failed: FATAL:  the database system is starting up',
     DatabaseUnavailable),
    ('connection to server at "db", port 5432 failed: FATAL:  the database system is shutting '
     'down', DatabaseUnavailable),
])
def test_connection_failures_libpq_reports_in_words_are_told_apart(text, kind):
    # Connection failures carry no SQLSTATE, only libpq's text (these are its words for
    # cases the test server cannot produce: it trusts every local user, with room to spare).
    exc = database.translate(psycopg.OperationalError(f"connection failed: {text}"),
                             "postgresql://ango:pw@db:5432/ango")
    assert type(exc) is kind
    assert str(exc).startswith("PostgreSQL at db:5432") and "FATAL" not in str(exc)
