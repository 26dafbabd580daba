"""Connections to PostgreSQL and the schema they need."""

from __future__ import annotations

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
