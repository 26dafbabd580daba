"""Batch schedules: ``starts_at`` and ``expires_at``, set at import or changed later.

A batch hands out codes only in ``[starts_at, expires_at)``. The group commit
enforces it (``issue_group``: the batch row, locked ``FOR KEY SHARE``, must
be within its schedule at the issuing transaction's timestamp, which is
recorded as ``issued_at``), so it is exact to that instant and judged by the
database's clock alone. A claim before the start raises BatchNotStarted; one
after the end BatchExpired, as for an expired batch.

Changes take the batch row ``FOR UPDATE`` (as ``expire`` does), so every
claim committed after a change returns is judged by the new schedule. What may
change is limited so that no issue already made falls outside its batch's
schedule: a started batch's start may only move earlier or be cleared, the end
must stay in the future (to end a batch now, expire it), and a batch that has
ended stays ended.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import psycopg

from ango.errors import BatchExpired, InvalidInput
from ango.importer import parse_uuid
from ango.sql import queries

#: Passed for a field that keeps its value.
UNCHANGED: Any = object()


@dataclass(frozen=True)
class Schedule:
    """A batch's schedule; None means no start (open now) or no end."""

    batch_id: str
    starts_at: str | None
    expires_at: str | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields, as `ango schedule --json` prints them."""
        return asdict(self)


def parse_instant(value: str | datetime | None, what: str) -> datetime | None:
    """An aware datetime from ISO 8601 text (``Z`` or an offset is required), or None.

    The empty string and ``none`` mean no value. Raises InvalidInput.
    """
    if value is None or isinstance(value, str) and value.strip().lower() in ("", "none"):
        return None
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.strip())
        except ValueError:
            raise InvalidInput(
                f"{what} must be an ISO 8601 time such as 2026-12-01T09:00:00Z, "
                f"got {value[:80]!r}") from None
    if not isinstance(value, datetime):
        raise InvalidInput(f"{what} must be a time, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidInput(f"{what} needs a time zone (Z or an offset such as +02:00)")
    return value


def check_order(starts_at: datetime | None, expires_at: datetime | None) -> None:
    """Raise InvalidInput when the end does not come after the start."""
    if starts_at is not None and expires_at is not None and expires_at <= starts_at:
        raise InvalidInput(
            f"expires_at ({expires_at.isoformat()}) must come after starts_at "
            f"({starts_at.isoformat()})")


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def lock_live_batch(conn: psycopg.Connection, bid: uuid.UUID
                    ) -> tuple[int, datetime | None, datetime | None, datetime]:
    """Lock a batch ``FOR UPDATE`` for a change, in the caller's transaction.

    Returns its key, start, end and the database's clock once locked. Raises
    BatchNotFound, or BatchExpired when it is expired or past its end.
    """
    from ango.batches import lock_batch

    key, expired, starts_at, expires_at = lock_batch(conn, "lock_batch_for_change", bid)
    (now,) = conn.execute(queries["db_clock"]).fetchone()
    if expired or (expires_at is not None and expires_at <= now):
        raise BatchExpired(f"batch {bid} has ended; a batch that ended stays ended")
    return key, starts_at, expires_at, now


def set_schedule(conn: psycopg.Connection, batch_id: str | uuid.UUID,
                 starts_at: str | datetime | None = UNCHANGED,
                 expires_at: str | datetime | None = UNCHANGED) -> Schedule:
    """Change a batch's start and/or end (None clears one); return the new schedule.

    Raises BatchNotFound, BatchExpired (the batch has ended) or InvalidInput
    (a malformed time, an end before the start or not in the future, a start
    moved later once the batch started); nothing changes then.
    """
    bid = parse_uuid(batch_id, "batch id")
    start = UNCHANGED if starts_at is UNCHANGED else parse_instant(starts_at, "starts_at")
    end = UNCHANGED if expires_at is UNCHANGED else parse_instant(expires_at, "expires_at")
    with conn.transaction():
        key, old_start, old_end, now = lock_live_batch(conn, bid)
        start = old_start if start is UNCHANGED else start
        end = old_end if end is UNCHANGED else end
        started = old_start is None or old_start <= now
        if started and start is not None and (old_start is None or start > old_start):
            raise InvalidInput(
                f"batch {bid} has started; its start can only move earlier or be cleared")
        if end is not None and end <= now:
            raise InvalidInput(
                f"expires_at must be in the future (the database's clock says "
                f"{now.isoformat()}); to end the batch now, expire it")
        check_order(start, end)
        conn.execute(queries["set_batch_schedule"],
                     {"key": key, "starts_at": start, "expires_at": end})
    return Schedule(str(bid), _iso(start), _iso(end))
