"""A shard's PostgreSQL: its connections and every query it runs.

The only module of the shard that touches ``ango.sql.queries``. Each query is
a typed method returning named rows (or, where a row per code would cost a
Python object per claim, the structure its caller builds from them anyway).
Connections are autocommit; a database error propagates as psycopg's
``OperationalError`` for the caller's retry policy to handle.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import Callable
from typing import Any, NamedTuple

import psycopg
import psycopg.errors

from ango.sql import queries


class BatchRow(NamedTuple):
    """A batch as a shard sees it (``batch_meta``)."""

    id: uuid.UUID
    key: int
    client_id: uuid.UUID
    rules: dict | None
    expired: bool  # expired, or past its scheduled end


class BatchState(NamedTuple):
    """A batch's state read after a group commit (``expired_batches``)."""

    key: int
    state: str | None  # "expired", "not_started", or None (issuing)
    rules: dict | None


class SlotRow(NamedTuple):
    """A rule slot a customer holds (``customer_slots``)."""

    batch_key: int
    customer_id: str
    slot: int
    issued_at: float


class LeaseCodes(NamedTuple):
    """The unissued codes of one lease (``unissued_codes_of_leases``)."""

    lease_id: int
    batch_key: int
    codes: list[str]


class LeasedBlock(NamedTuple):
    """A new lease (``lease_block``): its codes may be fewer than its size (see the query)."""

    lease_id: int
    size: int
    codes: list[str]


class IssuedGroup(NamedTuple):
    """What a group commit's statement did."""

    issued: dict[str, float]  # code -> when it was issued (epoch seconds)
    taken: set[str]  # codes whose windowed rule slot was taken


class RequestIssue(NamedTuple):
    """An earlier issue recorded for a request id (``issued_by_request``)."""

    batch_key: int
    request_id: str
    code: str
    customer_id: str


class ShardConnection:
    """One of a shard's PostgreSQL connections, and the queries the shard runs on it."""

    def __init__(self, dsn: str, owner: str) -> None:
        self.dsn = dsn
        self.owner = owner
        self.conn: psycopg.AsyncConnection | None = None

    async def connect(self) -> None:
        """Open the connection (autocommit)."""
        self.conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)

    # Database errors are info here: the server's DatabaseWatch (ango/health.py)
    # writes the one warning an outage deserves, not one per shard and group.
    async def reconnect(self, while_down: Callable[[], None] = lambda: None) -> None:
        """A fresh connection, retried until the database answers (``while_down``
        runs between attempts)."""
        if self.conn is not None and not self.conn.closed:
            await self.conn.close()
        while True:
            try:
                await self.connect()
                return
            except psycopg.OperationalError:
                while_down()
                await asyncio.sleep(0.5)

    async def reconnect_once(self) -> None:
        """Try one fresh connection; on failure keep the old (broken) one, to retry later."""
        try:
            await self.conn.close()
            await self.connect()
        except psycopg.OperationalError:
            pass

    async def close(self, timeout: float) -> None:
        """Close, giving up after ``timeout`` seconds."""
        if self.conn is not None:
            try:
                await asyncio.wait_for(self.conn.close(), timeout)
            except (psycopg.Error, TimeoutError):
                pass

    async def _rows(self, query: str, params: Any) -> list[tuple]:
        return await (await self.conn.execute(queries[query], params)).fetchall()

    # -- owners ---------------------------------------------------------------------

    async def register_owner(self, instance: str, shard: int, parts: list[int]) -> None:
        """Announce this shard process; its heartbeat keeps its leases."""
        await self.conn.execute(queries["register_owner"], (
            self.owner, instance, shard, os.getpid(), socket.gethostname(), parts))

    async def heartbeat(self) -> bool:
        """Beat; False when another process reaped us."""
        cur = await self.conn.execute(queries["heartbeat"], (self.owner,))
        return cur.rowcount != 0

    async def adopt_leases(self, instance: str, shard: int, stale: float) -> list[int]:
        """Take over the leases of dead owners (silent for ``stale`` seconds, or our
        own previous incarnation) and forget those owners; the lease ids taken."""
        params = {"me": self.owner, "instance": instance, "shard": shard, "stale": stale}
        async with self.conn.transaction():
            rows = await self._rows("adopt_leases", params)
            await self.conn.execute(queries["forget_dead_owners"], params)
        return [row[0] for row in rows]

    async def retire_owner(self) -> None:
        """Clean shutdown: our leases become adoptable at once."""
        await self.conn.execute(queries["retire_owner"], (self.owner,))

    # -- leases -----------------------------------------------------------------------

    async def unissued_codes(self, lease_ids: list[int]) -> list[LeaseCodes]:
        """The unissued codes of these leases, per lease; leases without any are left out."""
        rows = await self._rows("unissued_codes_of_leases", (lease_ids,))
        by_lease: dict[int, LeaseCodes] = {}
        for lease_id, batch_key, code in rows:
            lease = by_lease.get(lease_id)
            if lease is None:
                lease = by_lease[lease_id] = LeaseCodes(lease_id, batch_key, [])
            lease.codes.append(code)
        return list(by_lease.values())

    async def delete_leases(self, lease_ids: list[int]) -> None:
        """Delete leases of ours (used up, or empty)."""
        await self.conn.execute(queries["delete_leases"], (lease_ids, self.owner))

    async def lease_block(self, batch_key: int, n: int, minimum: int,
                          split: int) -> LeasedBlock | None:
        """Lease up to ``n`` codes (at least ``minimum`` if the cursor allows; fewer
        near the end, spread over ``split``); None when the cursor is exhausted."""
        params = {"key": batch_key, "n": n, "min": minimum, "split": split, "me": self.owner}
        rows = await self._rows("lease_block", params)
        if not rows:
            return None
        return LeasedBlock(rows[0][0], rows[0][2],
                           [code for _, code, _ in rows if code is not None])

    async def steal_lease(self, batch_key: int) -> list[int]:
        """Take another owner's lease of the batch (I7); the lease ids taken (one or none)."""
        rows = await self._rows("steal_lease", {"key": batch_key, "me": self.owner})
        return [row[0] for row in rows]

    async def other_leases_exist(self, batch_key: int) -> bool:
        """Whether another owner still holds a lease of the batch."""
        rows = await self._rows("other_leases_exist", {"key": batch_key, "me": self.owner})
        return bool(rows[0][0])

    # -- batches and customers --------------------------------------------------------

    async def batch_meta(self, batch_ids: list[uuid.UUID]) -> list[BatchRow]:
        """The batches of these ids (unknown ids are left out)."""
        return [BatchRow(*row) for row in await self._rows("batch_meta", (batch_ids,))]

    async def customer_slots(self, keys: list[tuple[int, str]]) -> list[SlotRow]:
        """The rule slots held by these (batch key, customer) pairs."""
        rows = await self._rows("customer_slots", {
            "keys": [k[0] for k in keys], "customers": [k[1] for k in keys]})
        return [SlotRow(*row) for row in rows]

    # -- the group commit -------------------------------------------------------------

    async def issue_group(self, params: dict[str, Any]) -> IssuedGroup:
        """The group commit: one autocommitted call of ``ango.issue_group_v1``, its
        fast path and, after a conflict, its careful path inside (migration 0006)."""
        rows = await self._rows("issue_group", params)
        issued: dict[str, float] = {}
        taken: set[str] = set()
        for kind, code, at in rows:
            if kind == 1:
                issued[code] = at
            else:
                taken.add(code)
        return IssuedGroup(issued, taken)

    async def release_phantom_slots(self, batch_keys: list[int], customers: list[str],
                                    slots: list[int], codes: list[str]) -> None:
        """Give back windowed slots taken for codes another transaction issued first."""
        await self.conn.execute(queries["release_phantom_slots"],
                                (batch_keys, customers, slots, codes))

    async def batch_states(self, batch_keys: list[int]) -> list[BatchState]:
        """Whether these batches are expired or not started, and their rules."""
        return [BatchState(*row) for row in await self._rows("expired_batches", (batch_keys,))]

    async def leases_still_mine(self, lease_ids: list[int]) -> set[int]:
        """Which of these leases we still own."""
        return {row[0] for row in await self._rows("leases_still_mine",
                                                    (lease_ids, self.owner))}

    async def issued_among(self, codes: list[str]) -> set[str]:
        """Which of these codes are issued (by anyone)."""
        return {row[0] for row in await self._rows("issued_among", (codes,))}

    async def issued_by_request(self, batch_keys: list[int],
                                request_ids: list[str]) -> list[RequestIssue]:
        """Earlier issues of these (batch key, request id) pairs (I6)."""
        rows = await self._rows("issued_by_request", (batch_keys, request_ids))
        return [RequestIssue(*row) for row in rows]


class ShardStore:
    """The PostgreSQL connections a shard holds for its life.

    ``control`` runs checks, leases and loads; ``beat`` the heartbeat and
    adoption (so a slow group does not starve it); ``commits`` are the
    group-commit connections not in use (one per group commit in flight).
    """

    def __init__(self, dsn: str, owner: str, commits: int) -> None:
        self.owner = owner
        self.control = ShardConnection(dsn, owner)
        self.beat = ShardConnection(dsn, owner)
        self.commits = [ShardConnection(dsn, owner) for _ in range(commits)]

    async def open(self) -> None:
        """Connect every connection."""
        for db in (self.control, self.beat, *self.commits):
            await db.connect()

    async def close(self) -> None:
        """Retire (our leases become adoptable at once) and close, bounded in time."""
        # The control connection is idle once the shard's loop has returned; the
        # heartbeat's may have been cancelled mid-query, so it is not used again.
        try:
            await asyncio.wait_for(self.control.retire_owner(), 5.0)
        except (psycopg.Error, TimeoutError):
            pass
        for db in (self.control, self.beat, *self.commits):
            await db.close(2.0)
