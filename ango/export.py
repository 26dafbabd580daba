"""Export a batch's issued or available codes, streamed with ``COPY … TO STDOUT``.

PostgreSQL renders every row (CSV with a header, or one JSON object per line);
this side only copies the bytes through to the output as they arrive, so memory
stays constant whatever the batch's size. The export is one statement, hence
one snapshot: exact as of the instant it starts, while claims go on.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import psycopg

from ango.errors import BatchNotFound, InvalidInput
from ango.importer import parse_uuid
from ango.sql import queries

ISSUED = "issued"
AVAILABLE = "available"
FORMATS = ("csv", "jsonl")
_PROGRESS_EVERY = 10_000  # rows between progress calls
_FLUSH_BYTES = 1 << 20    # bytes gathered before a write to the output


@dataclass(frozen=True)
class ExportPlan:
    """What an export will read: the batch's key and the rows to expect."""

    batch_key: int
    expected_rows: int


def plan_export(conn: psycopg.Connection, batch_id: str | uuid.UUID, what: str,
                fmt: str = "csv") -> ExportPlan:
    """Check the arguments and find the batch; raises InvalidInput or BatchNotFound."""
    if what not in (ISSUED, AVAILABLE):
        raise InvalidInput(f"export: choose {ISSUED!r} or {AVAILABLE!r}, got {what!r}")
    if fmt not in FORMATS:
        raise InvalidInput(f"export: format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    bid = parse_uuid(batch_id, "batch id")
    row = conn.execute(queries["export_batch"], (bid,)).fetchone()
    if row is None:
        raise BatchNotFound(f"no batch with id {bid}")
    key, total, issued = row
    return ExportPlan(key, issued if what == ISSUED else max(total - issued, 0))


def export_codes(conn: psycopg.Connection, batch_id: str | uuid.UUID, what: str,
                 out: BinaryIO | str | Path, fmt: str = "csv", *,
                 progress: Callable[[int], None] | None = None) -> int:
    """Write the batch's ``what`` codes (issued or available) to ``out``; return the rows.

    ``out`` is a binary stream or a path (written only once the arguments are
    checked). CSV columns: ``code,customer_id,issued_at,request_id`` for issued
    codes (``issued_at`` ISO 8601 in UTC, oldest first), ``code`` for available
    ones (in import order); JSON lines have the same keys. ``progress`` is
    called now and then with the rows written so far.
    """
    plan = plan_export(conn, batch_id, what, fmt)
    if isinstance(out, (str, Path)):
        with open(out, "wb") as stream:
            return _copy_out(conn, plan, what, fmt, stream, progress)
    return _copy_out(conn, plan, what, fmt, out, progress)


def _copy_out(conn: psycopg.Connection, plan: ExportPlan, what: str, fmt: str,
              out: BinaryIO, progress: Callable[[int], None] | None) -> int:
    rows = 0
    pending = bytearray()  # rows are small: one buffer, not an object per row
    with conn.cursor().copy(queries[f"export_{what}_{fmt}"], (plan.batch_key,)) as copy:
        for data in copy:  # one row per chunk (libpq hands COPY data out row by row)
            pending += data
            rows += 1
            if len(pending) >= _FLUSH_BYTES:
                out.write(pending)
                pending.clear()
            if progress is not None and rows % _PROGRESS_EVERY == 0:
                progress(rows)
    out.write(pending)
    out.flush()
    if fmt == "csv":
        rows -= 1  # the header line
    if progress is not None:
        progress(rows)
    return rows
