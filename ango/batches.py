"""Listing and expiring batches."""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from ango.errors import BatchNotFound, InvalidInput
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
    starts_at: str | None = None
    expires_at: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields, as `ango batches --json` prints them."""
        return asdict(self)


def _info(row: tuple) -> BatchInfo:
    batch_id, name, client_id, rules, expired, total, issued, created_at, starts, ends = row
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
        starts_at=starts.isoformat() if starts is not None else None,
        expires_at=ends.isoformat() if ends is not None else None,
    )


def list_batches(conn: psycopg.Connection, client_id: str | None = None) -> list[BatchInfo]:
    """Every batch (of ``client_id`` only, when given), oldest first, with its counts."""
    return [_info(row) for row in conn.execute(queries["list_batches"], {"client": client_id})]


def lock_batch(conn: psycopg.Connection, query: str, bid: uuid.UUID,
               params: dict[str, Any] | None = None) -> tuple:
    """The row of ``queries[query]`` (which locks the batch ``bid``) or BatchNotFound.

    ``params``, when given, are the query's named parameters (``bid`` among them).
    """
    row = conn.execute(queries[query], params if params is not None else (bid,)).fetchone()
    if row is None:
        raise BatchNotFound(f"no batch with id {bid}")
    return row


def expire_batch(conn: psycopg.Connection, batch_id: str | uuid.UUID,
                 client_id: str | None = None) -> bool:
    """Mark a batch expired; return False if it already was. Idempotent.

    When this returns, no claim of the batch can succeed any more (I5). With
    ``client_id``, a batch of another client is not found.
    """
    bid = parse_uuid(batch_id, "batch id")
    with conn.transaction():
        key, already = lock_batch(conn, "lock_batch_for_expiry", bid,
                                  {"id": bid, "client": client_id})
        conn.execute(queries["expire_batch"], {"key": key})
    return not already


def set_rules(conn: psycopg.Connection, batch_id: str | uuid.UUID,
              rules: str | dict | None) -> dict[str, Any] | None:
    """Replace a live batch's rules; return them in canonical form (None: no limit).

    The batch row is locked ``FOR UPDATE`` (in-flight group commits finish
    first; later ones wait), the rules and their rule slots are rebuilt from the
    batch's issues in the same transaction, and the group commit reads the rule
    from the row it locks: every claim committed after this returns is judged
    by the new rules. A customer already above a tightened limit keeps the codes
    received and gets no more until below it (with a window: until enough of
    those issues are older than the window). Shards re-read rules within a
    second, so a loosened rule may still be refused from memory for that long.
    Raises InvalidInput (bad rules), BatchNotFound or BatchExpired; nothing
    changes then.
    """
    from ango.rules import parse_rules
    from ango.schedules import lock_live_batch

    bid = parse_uuid(batch_id, "batch id")
    parsed = parse_rules(rules)
    canonical = parsed.to_json()
    rule = parsed.per_customer
    with conn.transaction():
        key, *_ = lock_live_batch(conn, bid)
        conn.execute(queries["set_batch_rules"], {"key": key, "rules": Jsonb(canonical)})
        conn.execute(queries["clear_rule_slots"], {"key": key})
        if rule is not None and rule.window_days is None:
            conn.execute(queries["number_fixed_slots"], {"key": key})
        elif rule is not None:
            conn.execute(queries["fill_window_slots"], {"key": key, "limit": rule.limit})
    return canonical


def delete_batch(conn: psycopg.Connection, batch_id: str | uuid.UUID,
                 purge: bool = False) -> dict[str, Any]:
    """Delete a batch that is over (expired, or past its scheduled end).

    Without ``purge``: its unissued codes, leases and lease cursor go; its
    issued codes and their issues stay (lookups and exports still find them),
    and the batch stays listed, expired, with a total of what was issued. With
    ``purge``: the batch and every issue of it go too. Idempotent. Returns the
    counts removed. Raises BatchNotFound, or InvalidInput for a live batch;
    nothing changes then.
    """
    bid = parse_uuid(batch_id, "batch id")
    with conn.transaction():
        key, over = lock_batch(conn, "lock_batch_for_delete", bid)
        if not over:
            raise InvalidInput(f"batch {bid} is live: expire it first (ango expire {bid})")
        if purge:
            codes, issues = conn.execute(queries["purge_batch"], {"key": key}).fetchone()
        else:
            (codes,) = conn.execute(queries["delete_unissued"], {"key": key}).fetchone()
            issues = 0
    return {"batch_id": str(bid), "purged": purge, "codes_deleted": codes,
            "issues_deleted": issues}
