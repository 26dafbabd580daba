"""Connections to PostgreSQL and the schema they need."""

from __future__ import annotations

from dataclasses import dataclass

import psycopg

from ango.config import DEFAULT_PARTITIONS, resolve_dsn
from ango.sql import migrations, queries

# Serialises concurrent `migrate` calls across processes.
_MIGRATE_LOCK = 0x616E676F


def connect(dsn: str, **kwargs) -> psycopg.Connection:
    """A synchronous connection; the caller closes it."""
    return psycopg.connect(dsn, **kwargs)


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


def ready_dsn(dsn: str | None = None, data_dir: str | None = None) -> str:
    """Resolve the DSN and make sure the schema is there."""
    found = resolve_dsn(dsn, data_dir)
    migrate(found)
    return found


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
