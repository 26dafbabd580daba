"""Connections to PostgreSQL, the schema they need, and what their errors mean.

Every synchronous connection Ango makes outside the shards goes through
:func:`connect`, the one place that turns ``psycopg.Error`` into Ango's own
errors (as procrastinate's connector does): a database that cannot be reached,
is starting or shutting down, or has no connection slot left becomes
``DatabaseUnavailable`` (``unavailable``, retryable); a refused user or
password ``DatabaseRefused``; a missing database ``DatabaseMissing``; a
malformed DSN ``ConfigurationError``. Each says where (host and port, never
the password).
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psycopg
from psycopg.conninfo import conninfo_to_dict

from ango.config import DEFAULT_PARTITIONS, resolve_dsn
from ango.errors import (
    AngoError,
    ConfigurationError,
    DatabaseError,
    DatabaseMissing,
    DatabaseRefused,
    DatabaseUnavailable,
)
from ango.sql import migrations, queries

log = logging.getLogger("ango.database")

# Serialises concurrent `migrate` calls across processes.
_MIGRATE_LOCK = 0x616E676F
# A connection attempt to a host that drops packets gives up after this long
# (unless the DSN or PGCONNECT_TIMEOUT says otherwise), instead of TCP's minutes.
CONNECT_TIMEOUT = 10

# SQLSTATEs that mean "not now" rather than "never": connection exceptions (08),
# insufficient resources such as too many clients (53), an administrator or a
# crash shutting the server down or a server still starting (57P01-57P04), a
# cancelled statement (57014), a read-only standby (25006), a system error
# (58), and a transaction rolled back to break a deadlock or a serialization
# conflict (40001, 40P01): the same request may succeed when retried.
_UNAVAILABLE_CLASSES = ("08", "53", "58")
_UNAVAILABLE_STATES = {"57P01", "57P02", "57P03", "57P04", "57014", "25006", "40001", "40P01"}
_REFUSED_CLASSES = ("28",)
_REFUSED_STATES = {"42501"}
_MISSING_STATES = {"3D000"}
# A failed connection attempt carries no SQLSTATE, only libpq's text.
_REFUSED_TEXT = re.compile(
    r"password authentication failed|role \".*\" does not exist|no pg_hba\.conf entry"
    r"|not permitted to log in|authentication failed|no password supplied|permission denied",
    re.IGNORECASE,
)
_MISSING_TEXT = re.compile(r"database \".*\" does not exist", re.IGNORECASE)
_LIBPQ_PREFIX = re.compile(
    r"^(connection failed: )?(connection to server (at|on socket) .*? failed: )?"
    r"((FATAL|ERROR): +)?"
)


def _params(dsn: str) -> dict[str, str]:
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.Error as exc:
        # libpq quotes the piece it could not parse, which may be part of a
        # password: keep only option keywords and punctuation it quotes.
        reason = re.sub(r'"([^"]*)"', _keep_keyword, str(exc).strip().splitlines()[0])
        raise ConfigurationError(f"the database DSN is malformed: {reason}") from None
    port = str(params.get("port", ""))
    if port and not all(p.strip().isdigit() for p in port.split(",")):
        raise ConfigurationError(
            f"the database DSN is malformed: port {port[:20]!r} is not a number")
    return params


def _keep_keyword(match: re.Match[str]) -> str:
    keywords = {"host", "hostaddr", "port", "dbname", "user", "sslmode", "connect_timeout"}
    kept = match.group(1) in keywords or match.group(1) in ("", "=", "&", "?", "/", ":", "@")
    return match.group(0) if kept else '"…"'


def where(dsn: str) -> str:
    """``host:port`` of a DSN, as error messages name it (never the password)."""
    params = _params(dsn)
    host = params.get("host") or params.get("hostaddr") or os.environ.get("PGHOST") or "localhost"
    port = params.get("port") or os.environ.get("PGPORT") or "5432"
    return f"{host}:{port}"


def _reason(exc: psycopg.Error) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return _LIBPQ_PREFIX.sub("", lines[0]) if lines else type(exc).__name__


def translate(exc: psycopg.Error, dsn: str) -> AngoError:
    """The Ango error for a psycopg error met on a connection to ``dsn``."""
    at = where(dsn)
    reason = _reason(exc)
    state = exc.sqlstate or ""
    if state:
        if state.startswith(_UNAVAILABLE_CLASSES) or state in _UNAVAILABLE_STATES:
            return DatabaseUnavailable(f"PostgreSQL at {at} is unavailable: {reason}")
        if state.startswith(_REFUSED_CLASSES) or state in _REFUSED_STATES:
            return DatabaseRefused(f"PostgreSQL at {at} refused: {reason}")
        if state in _MISSING_STATES:
            return DatabaseMissing(f"PostgreSQL at {at}: {reason}")
        return DatabaseError(f"PostgreSQL at {at} failed: {reason} (SQLSTATE {state})")
    if isinstance(exc, psycopg.OperationalError):
        if _MISSING_TEXT.search(reason):
            return DatabaseMissing(f"PostgreSQL at {at}: {reason}")
        if _REFUSED_TEXT.search(reason):
            return DatabaseRefused(f"PostgreSQL at {at} refused the connection: {reason}")
        return DatabaseUnavailable(f"PostgreSQL at {at} is unavailable: {reason}")
    return DatabaseError(f"PostgreSQL at {at} failed: {reason}")


@contextmanager
def translated(dsn: str) -> Iterator[None]:
    """Raise the Ango error (see :func:`translate`) for any psycopg error within."""
    try:
        yield
    except psycopg.Error as exc:
        raise translate(exc, dsn) from exc


@contextmanager
def connect(dsn: str, **kwargs) -> Iterator[psycopg.Connection]:
    """A synchronous connection, closed on leaving; psycopg errors become Ango's."""
    params = _params(dsn)
    if "connect_timeout" not in params and not os.environ.get("PGCONNECT_TIMEOUT"):
        kwargs.setdefault("connect_timeout", CONNECT_TIMEOUT)
    with translated(dsn), psycopg.connect(dsn, **kwargs) as conn:
        yield conn


def migrate(dsn: str, partitions: int = DEFAULT_PARTITIONS) -> list[str]:
    """Apply the migrations not yet applied; return their names.

    ``partitions`` is used only when the database is created; afterwards the
    number recorded in the database wins.
    """
    if not 1 <= partitions <= 1024:
        raise ValueError(f"partitions must be between 1 and 1024, got {partitions}")
    applied: list[str] = []
    with connect(dsn, autocommit=True) as conn:
        conn.execute("SET client_min_messages = warning")
        with conn.transaction():
            conn.execute(queries["migrate_lock"], (_MIGRATE_LOCK,))
            conn.execute(queries["create_meta"])
            conn.execute(queries["set_partitions"], (str(partitions),))
            done = {row[0] for row in conn.execute(queries["applied_migrations"])}
            for version, name, sql in migrations():
                if version in done:
                    continue
                conn.execute(sql)
                conn.execute(queries["record_migration"], (version, name))
                applied.append(name)
    return applied


def routing_slot_count(conn: psycopg.Connection) -> int:
    """The cluster's routing slot count (migration 0007), fixed once created."""
    return conn.execute(queries["routing_slot_count"]).fetchone()[0]


def ready_dsn(dsn: str | None = None, data_dir: str | None = None) -> str:
    """Resolve the DSN and make sure the schema is there."""
    found = resolve_dsn(dsn, data_dir)
    migrate(found)
    return found


def wait_until_ready(
    dsn: str | None = None,
    data_dir: str | None = None,
    *,
    seconds: float = 25.0,
    report: Callable[[str], None] | None = None,
) -> str:
    """:func:`ready_dsn`, retried while PostgreSQL is unavailable, for up to ``seconds``.

    Attempts are ``seconds / 5`` apart (at most 5 s: 25 s means the original's
    5 × 5 s), and each failed one is passed to ``report`` (else logged). A
    refused user or a missing database is not waited for: time will not fix
    it. Raises the last ``DatabaseUnavailable`` when the time is up.
    """
    interval = min(5.0, max(0.2, seconds / 5))
    deadline = time.monotonic() + seconds
    attempt = 1
    while True:
        try:
            return ready_dsn(dsn, data_dir)
        except DatabaseUnavailable as exc:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DatabaseUnavailable(
                    f"{exc} (gave up after {attempt} attempt{'s' * (attempt > 1)} "
                    f"in {seconds:g} s)") from exc
            pause = min(interval, left)
            (report or log.warning)(f"{exc}; attempt {attempt}, retrying in {pause:.1f} s")
            time.sleep(pause)
            attempt += 1


def partition_count(conn: psycopg.Connection) -> int:
    """The number of code partitions recorded when the database was created."""
    row = conn.execute(queries["get_partitions"]).fetchone()
    return int(row[0])


@dataclass(frozen=True)
class ConnectionBudget:
    """How many more connections PostgreSQL will accept from us, and why.

    A limit of -1 means none (PostgreSQL's convention). Counts of connections
    in use leave out the connection that measured them.
    """

    max_connections: int
    reserved: int
    superuser: bool
    role_limit: int
    database_limit: int
    in_use: int
    role_in_use: int
    database_in_use: int

    @property
    def available(self) -> int:
        """Connections we can still open (the smallest room left under any limit)."""
        # Our own connection is closed before any of these are opened: count it free.
        room = [self.max_connections - self.in_use - (0 if self.superuser else self.reserved)]
        if not self.superuser:  # superusers ignore role and database limits
            if self.role_limit >= 0:
                room.append(self.role_limit - self.role_in_use)
            if self.database_limit >= 0:
                room.append(self.database_limit - self.database_in_use)
        return max(0, min(room))

    def describe(self) -> str:
        """The numbers behind ``available``, for an error message."""
        parts = [f"max_connections {self.max_connections}"]
        if not self.superuser:
            parts.append(f"{self.reserved} reserved")
        parts.append(f"{self.in_use} in use")
        if not self.superuser and self.role_limit >= 0:
            parts.append(f"the role's CONNECTION LIMIT {self.role_limit} "
                         f"({self.role_in_use} in use)")
        if not self.superuser and self.database_limit >= 0:
            parts.append(f"the database's CONNECTION LIMIT {self.database_limit} "
                         f"({self.database_in_use} in use)")
        return ", ".join(parts)


def connection_budget(conn: psycopg.Connection) -> ConnectionBudget:
    """Measure the connections PostgreSQL has room for (see ConnectionBudget)."""
    return ConnectionBudget(*conn.execute(queries["connection_budget"]).fetchone())
