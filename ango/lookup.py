"""Support look-ups: who has a code, and which codes a customer got.

Both are single indexed reads of committed state (the primary keys of
``ango.codes`` and ``ango.issues``, and ``issues_customer_slot``), so they answer in
milliseconds on any size of table and are exact at the instant they run: a
claim answered before the look-up started is in its result.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import psycopg

from ango.allocator import MAX_CUSTOMER_ID
from ango.errors import InvalidInput
from ango.importer import MAX_CODE_LENGTH, check_text, parse_uuid
from ango.sql import queries

#: Most codes one `customer_codes` call returns.
MAX_CUSTOMER_CODES = 10_000

ISSUED = "issued"
AVAILABLE = "available"          # imported, not issued, its batch live
EXPIRED = "expired"              # imported, never issued, its batch expired
NEVER_IMPORTED = "never_imported"


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


@dataclass(frozen=True)
class CodeInfo:
    """What is known of one code; ``status`` is one of issued, available,
    expired, never_imported (the batch fields are then None)."""

    code: str
    status: str
    batch_id: str | None = None
    batch_name: str | None = None
    client_id: str | None = None
    customer_id: str | None = None
    issued_at: str | None = None
    request_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields, as `ango lookup --json` prints them."""
        return asdict(self)


@dataclass(frozen=True)
class CustomerCode:
    """One code a customer received."""

    code: str
    batch_id: str
    batch_name: str
    issued_at: str
    request_id: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields, as `ango customer --json` prints them."""
        return asdict(self)


def lookup_code(conn: psycopg.Connection, code: str) -> CodeInfo:
    """Who has ``code``; raises InvalidInput for a malformed code."""
    code = check_text(code, "code", MAX_CODE_LENGTH)
    row = conn.execute(queries["lookup_code"], {"code": code}).fetchone()
    batch_id, name, client_id, expired, customer, issued_at, request_id = row
    if batch_id is None:
        return CodeInfo(code, NEVER_IMPORTED)
    if customer is not None:
        status = ISSUED
    else:
        status = EXPIRED if expired else AVAILABLE
    return CodeInfo(code, status, str(batch_id), name, str(client_id), customer,
                    _iso(issued_at), request_id)


def customer_codes(conn: psycopg.Connection, customer_id: str,
                   batch_id: str | uuid.UUID | None = None,
                   limit: int = 1000) -> list[CustomerCode]:
    """The codes ``customer_id`` received (of one batch if given), newest first.

    At most ``limit`` (1 to 10,000); an unknown batch or customer gives an empty
    list. Raises InvalidInput for malformed arguments.
    """
    customer = check_text(customer_id, "customer id", MAX_CUSTOMER_ID)
    batch = None if batch_id is None else parse_uuid(batch_id, "batch id")
    if isinstance(limit, bool) or not isinstance(limit, int) or not (
            1 <= limit <= MAX_CUSTOMER_CODES):
        raise InvalidInput(f"limit must be between 1 and {MAX_CUSTOMER_CODES}, got {limit!r}")
    rows = conn.execute(queries["customer_codes"],
                        {"customer": customer, "batch": batch, "limit": limit})
    return [CustomerCode(code, str(bid), name, _iso(at), rid)
            for code, bid, name, at, rid in rows]
