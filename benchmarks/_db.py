"""Throwaway databases for benchmarks, on the server Ango is configured for."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from ango.config import resolve_dsn
from ango.database import migrate

CLIENT = "c0ffee00-0000-4000-8000-000000000001"
# Multiplying by an odd constant modulo 2**64 is a bijection: codes look random
# and are unique without keeping a set of a million of them.
_MIX = 0x9E3779B97F4A7C15


def server_dsn(dsn: str | None = None) -> str:
    """``--dsn`` > ``ANGO_BENCH_DSN`` > Ango's own lookup (ANGO_DSN, DATABASE_URL, embedded)."""
    return resolve_dsn(dsn or os.environ.get("ANGO_BENCH_DSN"))


def with_dbname(dsn: str, dbname: str) -> str:
    """The same server, another database."""
    params = conninfo_to_dict(dsn)
    params["dbname"] = dbname
    return make_conninfo(**params)


@contextmanager
def fresh_database(server: str) -> Iterator[str]:
    """A new, migrated database on ``server``; dropped afterwards."""
    name = f"ango_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    dsn = with_dbname(server, name)
    try:
        migrate(dsn)
        yield dsn
    finally:
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def write_codes_csv(path: Path, count: int, client: str = CLIENT, first: int = 1) -> Path:
    """The original's CSV (``client_id,code``) with ``count`` unique 16-character codes.

    Files with ranges ``first .. first + count - 1`` that do not overlap share no code.
    """
    mask = (1 << 64) - 1
    with open(path, "w", buffering=1 << 20) as out:
        out.write("client_id,code\n")
        step = 100_000
        for start in range(first - 1, first - 1 + count, step):
            out.write("".join(
                f"{client},{(i * _MIX) & mask:016X}\n"
                for i in range(start + 1, min(start + step, first - 1 + count) + 1)
            ))
    return path


_PLAIN_TABLE = "CREATE TABLE bench_plain_copy (client_id text, code text)"
_PLAIN_COPY = "COPY bench_plain_copy (client_id, code) FROM STDIN (FORMAT csv, HEADER)"


def create_plain_table(dsn: str) -> None:
    """The baseline's table: no index, no constraint."""
    with psycopg.connect(dsn) as conn:
        conn.execute(_PLAIN_TABLE)
        conn.commit()


def plain_copy(dsn: str, path: Path, chunk_bytes: int = 1 << 20) -> int:
    """The baseline: COPY the file's raw bytes into the plain table in one transaction."""
    with psycopg.connect(dsn) as conn, open(path, "rb") as stream:
        with conn.cursor() as cur:
            with cur.copy(_PLAIN_COPY) as copy:
                while chunk := stream.read(chunk_bytes):
                    copy.write(chunk)
            rows = cur.rowcount
        conn.commit()
    return rows


def write_codes_copy(csv_path: Path, path: Path, batch_key: int = 1) -> Path:
    """The codes of ``csv_path`` as ``ango.codes`` COPY text (code, batch key, seq)."""
    with open(csv_path) as src, open(path, "w", buffering=1 << 20) as out:
        next(src)
        for seq, line in enumerate(src, 1):
            out.write(f"{line.rstrip().split(',')[1]}\t{batch_key}\t{seq}\n")
    return path


def create_floor_batch(dsn: str) -> int:
    """A batch to COPY pre-made rows into; returns its key."""
    with psycopg.connect(dsn) as conn:
        conn.execute("INSERT INTO ango.clients (id) VALUES (%s)", (CLIENT,))
        (key,) = conn.execute(
            "INSERT INTO ango.batches (id, client_id, name) VALUES (%s, %s, 'floor') RETURNING key",
            (uuid.uuid4(), CLIENT),
        ).fetchone()
        conn.commit()
    return key


def floor_copy(dsn: str, path: Path, chunk_bytes: int = 1 << 20) -> int:
    """The server's share of an import: pre-made rows COPYed straight into ``ango.codes``."""
    with psycopg.connect(dsn) as conn, open(path, "rb") as stream:
        with conn.cursor() as cur:
            with cur.copy("COPY ango.codes (code, batch_key, seq) FROM STDIN") as copy:
                while chunk := stream.read(chunk_bytes):
                    copy.write(chunk)
            rows = cur.rowcount
        conn.commit()
    return rows
