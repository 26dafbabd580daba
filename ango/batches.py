"""Listing and expiring batches."""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import psycopg

from ango.errors import BatchNotFound
from ango.importer import parse_uuid
from ango.sql import queries


@dataclass(frozen=True)
class BatchInfo:
    """A batch and its counts."""

    id: str
    name: str
    client_id: str
    rules: dict[str, Any] | None
    expired: bool
    total: int
    issued: int
    available: int
    created_at: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields, as `ango batches --json` prints them."""
        return asdict(self)


def _info(row: tuple) -> BatchInfo:
    batch_id, name, client_id, rules, expired, total, issued, created_at = row
    created = created_at.isoformat() if isinstance(created_at, datetime) else str(created_at)
    return BatchInfo(
        id=str(batch_id),
        name=name,
        client_id=str(client_id),
        rules=rules,
        expired=expired,
        total=total,
        issued=issued,
        available=total - issued,
        created_at=created,
    )


def list_batches(conn: psycopg.Connection, client_id: str | None = None) -> list[BatchInfo]:
    """Every batch (of ``client_id`` only, when given), oldest first, with its counts."""
    return [_info(row) for row in conn.execute(queries["list_batches"], {"client": client_id})]


def expire_batch(conn: psycopg.Connection, batch_id: str | uuid.UUID,
                 client_id: str | None = None) -> bool:
    """Mark a batch expired; return False if it already was. Idempotent.

    When this returns, no claim of the batch can succeed any more (I5). With
    ``client_id``, a batch of another client is not found.
    """
    bid = parse_uuid(batch_id, "batch id")
    with conn.transaction():
        row = conn.execute(queries["lock_batch_for_expiry"],
                           {"id": bid, "client": client_id}).fetchone()
        if row is None:
            raise BatchNotFound(f"no batch with id {bid}")
        key, already = row
        conn.execute(queries["expire_batch"], {"key": key})
    return not already
