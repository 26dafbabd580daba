"""Checks the database against the invariants, from PostgreSQL alone.

Used by the tests, the chaos run and `ango audit`: each check returns the
violations it found, so an empty list means the invariant holds.
"""

from __future__ import annotations

import psycopg

from ango.sql import queries


def check_invariants(conn: psycopg.Connection, *, stale_seconds: float = 5.0) -> dict[str, list]:
    """Violations per invariant (I1, I3, I4, I5); all lists empty means all hold.

    I1's uniqueness and I6's (batch, request id) uniqueness are primary and
    unique keys of ``ango.issues``; checked here is that every issue is a real
    code of its batch. I3 counts codes leased out but neither issued nor held
    by an owner with a heartbeat fresher than ``stale_seconds``.
    """
    return {
        "I1 issued codes exist": conn.execute(queries["audit_issued_codes_exist"]).fetchall(),
        "I3 nothing lost": conn.execute(
            queries["audit_orphaned_codes"], (stale_seconds,)).fetchall(),
        "I4 rules hold": conn.execute(queries["audit_rules"]).fetchall(),
        "I4 slots agree": conn.execute(queries["audit_slots"]).fetchall(),
        "I5 expiry exact": conn.execute(queries["audit_expired"]).fetchall(),
    }


def violations(conn: psycopg.Connection, *, stale_seconds: float = 5.0) -> list[str]:
    """Human-readable violations; empty when every invariant holds."""
    found = check_invariants(conn, stale_seconds=stale_seconds)
    return [f"{name}: {rows}" for name, rows in found.items() if rows]
