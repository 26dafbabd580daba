"""A shard process: leases codes into memory and issues them by group commit.

Started by the Allocator as ``python -m ango.shards.worker`` with one end of a
socket pair. Claims arrive in batches; while one group commit is in flight the
next group gathers, so the group size follows the load. PostgreSQL enforces
every invariant inside the group's statements; memory only makes the common
case fast.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import signal
import socket
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass

import msgspec
import psycopg

from ango.background import stop_task
from ango.errors import (
    AngoError,
    BatchExhausted,
    BatchExpired,
    BatchNotFound,
    BatchNotStarted,
    InvalidInput,
    RuleViolation,
    Unavailable,
)
from ango.logs import configure_from_env
from ango.rules import parse_rules
from ango.shards import messages as m
from ango.shards.counters import FULL, WAIT, CustomerCounters
from ango.shards.pool import CodePool
from ango.sql import queries

log = logging.getLogger("ango.shard")

MAX_GROUP = 2000          # claims per group commit
GROUPS_IN_FLIGHT = 2      # group commits overlapping, each on its own connection
MIN_OVERLAP = 32          # claims waiting before a group overlaps the one in flight
MAX_BLOCK = 8192          # codes per lease, at most
MAX_ATTEMPTS = 8          # a claim retried more often than this answers Unavailable
HEARTBEAT_S = 1.0
STALE_S = 3.0             # an owner silent this long is dead; its leases are adopted
DB_RETRY_S = 15.0         # how long claims wait for the database to come back
META_REFRESH_S = 1.0      # batch rules and expiry are re-read this often (issue 14)
#: PostgreSQL connections a shard holds for its life (see start): the control
#: connection, the heartbeat's, and one per group commit in flight.
CONNECTIONS = 2 + GROUPS_IN_FLIGHT


@dataclass
class BatchMeta:
    """What the shard knows of a batch."""

    key: int
    client_id: str
    limit: int | None
    window: float | None
    expired: bool


class Pending:
    """A claim in the shard's hands (a plain slotted class: one is made per claim)."""

    __slots__ = ("tag", "batch_id", "customer_id", "client_id", "request_id", "received",
                 "attempts", "meta", "slot", "code", "lease", "followers", "rivals")

    def __init__(self, tag: int, batch_id: str, customer_id: str, client_id: str | None,
                 request_id: str, received: float) -> None:
        self.tag = tag
        self.batch_id = batch_id
        self.customer_id = customer_id
        self.client_id = client_id
        self.request_id = request_id
        self.received = received
        self.attempts = 0
        self.meta: BatchMeta | None = None
        self.slot: int | None = None
        self.code: str | None = None
        self.lease = 0
        self.followers: list[Pending] = []  # same batch, request id and customer
        self.rivals: list[Pending] = []  # same batch and request id, another customer


class Shard:
    """The state and loops of one shard process."""

    def __init__(self, dsn: str, index: int, count: int, instance: str, parts: list[int]) -> None:
        self.dsn = dsn
        self.index = index
        self.count = count
        self.instance = instance
        self.parts = parts
        self.owner = str(uuid.uuid4())
        self.pool = CodePool()
        self.counters = CustomerCounters()
        self.batches: dict[str, BatchMeta] = {}
        self.pending: deque[Pending] = deque()
        self.wake = asyncio.Event()
        self.results: list[m.Result] = []
        self.link: m.FramedProtocol | None = None
        self.encoder = msgspec.msgpack.Encoder()
        self.stopping = False
        self.needs_load: set[tuple[int, str]] = set()
        self.spent_leases: list[int] = []  # used up; deleted with the next group
        self.served = 0
        self.groups = 0
        self.group_reports: list[tuple[int, float]] = []  # (claims, seconds), sent with results
        self.parked: list[Pending] = []  # waiting for a group in flight to finish
        self.codes_in_flight: Counter[int] = Counter()  # per batch, in group commits
        self.conn: psycopg.AsyncConnection | None = None  # checks, leases, loads
        self.commit_conns: list[psycopg.AsyncConnection] = []  # idle group-commit connections
        self.hb_conn: psycopg.AsyncConnection | None = None
        self.meta_loaded = time.monotonic()  # when batch meta was last re-read

    # -- start-up and recovery -------------------------------------------------

    async def start(self) -> int:
        """Register, adopt the leases of dead owners, and load their codes."""
        self.conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
        self.hb_conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
        for _ in range(GROUPS_IN_FLIGHT):
            self.commit_conns.append(
                await psycopg.AsyncConnection.connect(self.dsn, autocommit=True))
        await self.hb_conn.execute(
            queries["register_owner"],
            (self.owner, self.instance, self.index, os.getpid(), socket.gethostname(), self.parts),
        )
        return await self.adopt(self.hb_conn)

    async def adopt(self, conn: psycopg.AsyncConnection) -> int:
        """Take over leases of dead owners; hold their unissued codes. Returns codes gained."""
        params = {"me": self.owner, "instance": self.instance, "shard": self.index,
                  "stale": STALE_S}
        async with conn.transaction():
            leases = await (await conn.execute(queries["adopt_leases"], params)).fetchall()
            await conn.execute(queries["forget_dead_owners"], params)
        if not leases:
            return 0
        return await self.load_leases(conn, [row[0] for row in leases])

    async def load_leases(self, conn: psycopg.AsyncConnection, lease_ids: list[int]) -> int:
        """Hold the unissued codes of leases now ours; delete the empty ones."""
        cur = await conn.execute(queries["unissued_codes_of_leases"], (lease_ids,))
        rows = await cur.fetchall()
        by_lease: dict[int, tuple[int, list[str]]] = {}
        for lease_id, batch_key, code in rows:
            by_lease.setdefault(lease_id, (batch_key, []))[1].append(code)
        for lease_id, (batch_key, codes) in by_lease.items():
            self.pool.drop_lease(lease_id)
            self.pool.add_lease(lease_id, batch_key, codes)
        empty = [lid for lid in lease_ids if lid not in by_lease]
        if empty:
            await conn.execute(queries["delete_leases"], (empty, self.owner))
        return len(rows)

    # -- the claim path ---------------------------------------------------------

    def receive(self, message: m.ToShard) -> None:
        """Handle a message from the Allocator."""
        if isinstance(message, m.Claims):
            now = time.monotonic()
            for c in message.claims:
                self.pending.append(
                    Pending(c.tag, c.batch_id, c.customer_id, c.client_id, c.request_id, now))
            self.wake.set()
        elif isinstance(message, m.Ping):
            self.send(m.Pong(message.seq))
        elif isinstance(message, m.StatsRequest):
            self.send(m.StatsReply(message.tag_id, self.stats()))
        elif isinstance(message, m.Shutdown):
            self.stopping = True
            self.wake.set()

    def send(self, message: m.FromShard) -> None:
        if self.link is not None:
            self.link.send(message, self.encoder)

    def answer(self, p: Pending, code: str | None, error: AngoError | None = None) -> None:
        if error is None:
            self.results.append(m.Result(p.tag, code))
            self.served += 1
        else:
            self.results.append(m.Result(p.tag, None, error.code, str(error)))
        for follower in p.followers:
            self.answer(follower, code, error)
        if p.rivals:
            # Decided only now: PostgreSQL tells them whose request id it is.
            self.pending.extendleft(reversed(p.rivals))
            p.rivals = []
            self.wake.set()

    def flush(self) -> None:
        if self.results or self.group_reports:
            self.send(m.Results(self.results, self.group_reports))
            self.results = []
            self.group_reports = []

    def stats(self) -> dict:
        return {
            "shard": self.index, "owner": self.owner, "pid": os.getpid(),
            "partitions": self.parts, "claims_served": self.served, "groups": self.groups,
            "pending": len(self.pending), "parked": len(self.parked),
            "codes_held": self.pool.codes_held, "leases_held": self.pool.leases_held,
            "customers_cached": len(self.counters),
        }

    async def run(self) -> None:
        """Prepare groups one at a time; let up to GROUPS_IN_FLIGHT commit at once."""
        in_flight: set[asyncio.Task[None]] = set()
        while True:
            # A second group overlaps the one in flight only once enough claims
            # wait for it: small groups cost PostgreSQL and us more per claim.
            if (not self.pending or not self.commit_conns
                    or (in_flight and len(self.pending) < MIN_OVERLAP)):
                if self.parked and not in_flight:
                    await asyncio.sleep(0.005)  # only waiting on other shards: do not spin
                    self.unpark()
                    continue
                if self.stopping and not self.pending and not in_flight:
                    return
                await self.wake.wait()
                self.wake.clear()
                continue
            size = min(len(self.pending), MAX_GROUP)
            if not in_flight and len(self.commit_conns) > 1 and size >= 2 * MIN_OVERLAP:
                # A burst with nothing in flight: commit it as two overlapping
                # halves, so PostgreSQL and this process work at the same time.
                size //= 2
            group = [self.pending.popleft() for _ in range(size)]
            try:
                issuing, verify = await self.prepare(group)
            except psycopg.OperationalError as exc:
                log.info("shard %s: database error, retrying: %s", self.index, exc)
                self.requeue(group)
                self.conn = await self.reconnect(self.conn)
                continue
            except Exception:  # a bug must not take the codes in hand with it
                log.exception("shard %s: group failed", self.index)
                self.fail(group)
                continue
            self.flush()
            if issuing or verify:
                task = asyncio.create_task(
                    self.finish(group, issuing, verify, self.commit_conns.pop()))
                in_flight.add(task)
                task.add_done_callback(self._group_done(in_flight))
            elif self.parked and not in_flight:
                await asyncio.sleep(0.005)  # only waiting on other shards: do not spin
                self.unpark()

    def _group_done(self, in_flight: set[asyncio.Task[None]]):
        def done(task: asyncio.Task[None]) -> None:
            in_flight.discard(task)
            self.wake.set()  # the loop may be waiting for the last group to end
        return done

    async def finish(self, group: list[Pending], issuing: list[Pending],
                     verify: list[tuple[Pending, AngoError]],
                     conn: psycopg.AsyncConnection) -> None:
        """Commit a prepared group on its own connection, answer, and wake the loop."""
        started = time.monotonic()
        try:
            await self.commit(issuing, verify, conn)
            if issuing:
                self.group_reports.append((len(issuing), time.monotonic() - started))
        except psycopg.OperationalError as exc:
            log.info("shard %s: database error, retrying: %s", self.index, exc)
            for p in issuing:
                self.codes_in_flight[p.meta.key] -= 1
            self.requeue(group)
            conn = await self.reconnect(conn)
        except Exception:
            log.exception("shard %s: group commit failed", self.index)
            self.fail(group)
        finally:
            self.commit_conns.append(conn)
            self.unpark()
            self.flush()
            self.groups += 1
            self.wake.set()

    def unpark(self) -> None:
        """Claims that waited for a group in flight go back to the head of the queue."""
        parked, self.parked = self.parked, []
        for p in reversed(parked):
            p.attempts += 1
            if p.attempts > MAX_ATTEMPTS * 50:
                self.answer(p, None, Unavailable("could not serve the claim in time; retry"))
            else:
                self.pending.appendleft(p)
        if parked:
            self.wake.set()

    def fail(self, group: list[Pending]) -> None:
        for p in group:
            if p.code is not None and p.meta is not None:
                self.pool.put_back(p.meta.key, p.code, p.lease)
            self.answer(p, None, Unavailable("internal error; retry"))
        self.flush()

    def requeue(self, group: list[Pending]) -> None:
        """After a database error: back to the queue (request ids make the retry safe)."""
        now = time.monotonic()
        for p in reversed(group):
            if p.meta is not None and p.code is not None:
                self.pool.put_back(p.meta.key, p.code, p.lease)
                p.code = None
            self.release_slot(p)
            if now - p.received > DB_RETRY_S:
                self.answer(p, None, Unavailable("database unavailable; retry"))
            else:
                self.pending.appendleft(p)
        self.flush()

    # Database errors are info here: the server's DatabaseWatch (ango/health.py)
    # writes the one warning an outage deserves, not one per shard and group.
    async def reconnect(self, conn: psycopg.AsyncConnection | None) -> psycopg.AsyncConnection:
        """A fresh connection, retried until the database answers."""
        if conn is not None and not conn.closed:
            await conn.close()
        while True:
            try:
                return await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
            except psycopg.OperationalError:
                self.flush()
                await asyncio.sleep(0.5)

    async def load_batches(self, batch_ids: set[str]) -> None:
        valid = []
        for bid in batch_ids:
            try:
                valid.append(uuid.UUID(bid))
            except ValueError:
                continue
        if not valid:
            return
        rows = await (await self.conn.execute(queries["batch_meta"], (valid,))).fetchall()
        for bid, key, client_id, rules, expired in rows:
            meta = self.batches.get(str(bid))
            if meta is None:
                meta = self.batches[str(bid)] = BatchMeta(key, str(client_id), None, None, expired)
            meta.expired = expired
            self.apply_rules(meta, rules)

    def apply_rules(self, meta: BatchMeta, rules: dict | None) -> None:
        """Take the batch's current rules; counters of a changed rule are forgotten
        (they are reloaded from the database on need)."""
        rule = parse_rules(rules).per_customer
        limit, window = (rule.limit, rule.window_seconds) if rule else (None, None)
        if (meta.limit, meta.window) != (limit, window):
            meta.limit, meta.window = limit, window
            self.counters.forget_batch(meta.key)

    async def load_customers(self) -> None:
        keys = list(self.needs_load)
        self.needs_load.clear()
        rows = await (await self.conn.execute(
            queries["customer_slots"],
            {"keys": [k[0] for k in keys], "customers": [k[1] for k in keys]})).fetchall()
        found: dict[tuple[int, str], dict[int, float]] = {k: {} for k in keys}
        for batch_key, customer, slot, issued in rows:
            found[(batch_key, customer)][slot] = issued
        limits = {meta.key: meta.limit for meta in self.batches.values()}
        for key, slots in found.items():
            limit = limits.get(key[0])
            if limit:
                self.counters.load(key, limit, slots)

    async def prepare(self, group: list[Pending]
                      ) -> tuple[list[Pending], list[tuple[Pending, AngoError]]]:
        """Check a group, reserve rule slots, lease and assign codes.

        Returns the claims to issue and those to verify (refused by memory,
        answered after a lookup of their request id); claims that must wait
        for a group in flight are parked.
        """
        unknown = {p.batch_id for p in group if p.batch_id not in self.batches}
        if time.monotonic() - self.meta_loaded > META_REFRESH_S and self.batches:
            # Rules and schedules change (`ango rules`, `ango schedule`): the
            # database enforces the change at once; this keeps memory close.
            unknown |= set(self.batches)
            self.meta_loaded = time.monotonic()
        if unknown:
            await self.load_batches(unknown)
        if self.needs_load:
            await self.load_customers()
        now = time.time()
        ready: list[Pending] = []
        verify: list[tuple[Pending, AngoError]] = []
        deferred: list[Pending] = []
        by_request: dict[tuple[int, str], Pending] = {}
        for p in group:
            meta = self.batches.get(p.batch_id)
            if meta is None or (p.client_id is not None and p.client_id != meta.client_id):
                self.answer(p, None, BatchNotFound(f"no batch {p.batch_id} for this client"))
                continue
            p.meta = meta
            first = by_request.get((meta.key, p.request_id))
            if first is not None:
                # A request id is one customer's: another customer's claim waits
                # until the first is decided, then learns whose it is.
                (first.followers if first.customer_id == p.customer_id
                 else first.rivals).append(p)
                continue
            by_request[(meta.key, p.request_id)] = p
            if meta.expired:  # a retry still gets its recorded code (I6)
                verify.append((p, BatchExpired(f"batch {p.batch_id} has expired")))
                continue
            if meta.limit is not None:
                slot = self.counters.reserve(
                    (meta.key, p.customer_id), meta.limit, meta.window, now)
                if slot == WAIT:
                    deferred.append(p)
                    continue
                if slot == FULL:
                    verify.append((p, RuleViolation(
                        f"customer {p.customer_id} has had {meta.limit} code(s) of this batch")))
                    continue
                p.slot = slot
            ready.append(p)
        need = Counter(p.meta.key for p in ready)
        for batch_key, wanted in need.items():
            short = wanted - self.pool.held(batch_key)
            if short > 0:
                await self.lease(batch_key, short)
        issuing: list[Pending] = []
        others: dict[int, bool] = {}
        for p in ready:
            got = self.pool.take(p.meta.key)
            if got is None:
                self.release_slot(p)
                if p.meta.key not in others:
                    others[p.meta.key] = await self.others_hold(p.meta.key)
                # A code in a group commit may yet come back (its claim refused):
                # "exhausted" only once no code of the batch is held anywhere (I7).
                if others[p.meta.key] or self.codes_in_flight[p.meta.key]:
                    deferred.append(p)
                else:
                    verify.append((p, BatchExhausted(f"batch {p.batch_id} has no code left")))
                continue
            p.code, p.lease = got
            self.codes_in_flight[p.meta.key] += 1
            issuing.append(p)
        self.parked.extend(deferred)
        return issuing, verify

    def release_slot(self, p: Pending, issued_at: float | None = None) -> None:
        if p.slot is not None:
            self.counters.release((p.meta.key, p.customer_id), p.slot, issued_at)
            p.slot = None

    async def lease(self, batch_key: int, short: int) -> None:
        """Lease at least ``short`` codes if the cursor allows; else steal (I7)."""
        block = self.pool.next_block(batch_key, MAX_BLOCK)
        params = {"key": batch_key, "n": block, "min": short, "split": 2 * self.count,
                  "me": self.owner}
        rows = await (await self.conn.execute(queries["lease_block"], params)).fetchall()
        if rows:
            lease_id, size = rows[0][0], rows[0][2]
            codes = [code for _, code, _ in rows if code is not None]
            if len(codes) == size:
                self.pool.add_lease(lease_id, batch_key, codes)
            else:  # a top-up committed while we waited: read its codes now (see the query)
                await self.load_leases(self.conn, [lease_id])
            return
        for _ in range(16):
            stolen = await (await self.conn.execute(queries["steal_lease"], params)).fetchall()
            if not stolen:
                return
            await self.load_leases(self.conn, [row[0] for row in stolen])
            if self.pool.held(batch_key) >= short:
                return

    async def others_hold(self, batch_key: int) -> bool:
        row = await (await self.conn.execute(
            queries["other_leases_exist"], {"key": batch_key, "me": self.owner})).fetchone()
        return bool(row[0])

    async def commit(self, issuing: list[Pending], verify: list[tuple[Pending, AngoError]],
                     conn: psycopg.AsyncConnection) -> None:
        """The group commit: one autocommitted statement in the common case.

        Claims are answered only after it returns, that is after COMMIT (I2).
        Misses are explained afterwards by reads of committed state.
        """
        issued: dict[str, float] = {}
        taken: set[str] = set()
        if issuing:
            spent, self.spent_leases = self.spent_leases, []
            params = {
                "spent": "\n".join(map(str, spent)),
                "batch_keys": list({p.meta.key for p in issuing}),
                "codes": "\n".join([p.code for p in issuing]),
                "bkeys": "\n".join([str(p.meta.key) for p in issuing]),
                "customers": "\n".join([p.customer_id for p in issuing]),
                "requests": "\n".join([p.request_id for p in issuing]),
                "leases": "\n".join([str(p.lease) for p in issuing]),
                "slots": "\n".join(["" if p.slot is None or p.meta.window is not None
                                     else str(p.slot) for p in issuing]),
                "window_slots": "\n".join(["" if p.slot is None or p.meta.window is None
                                            else str(p.slot) for p in issuing]),
                "me": self.owner,
            }
            try:  # the fast path, and the careful one on a conflict, in one call
                rows = await (await conn.execute(queries["issue_group"], params)).fetchall()
            except BaseException:
                self.spent_leases[:0] = spent
                raise
            for kind, code, at in rows:
                if kind == 1:
                    issued[code] = at
                else:
                    taken.add(code)
        missed = [p for p in issuing if p.code not in issued]
        outcome: dict[int, tuple[str | None, AngoError | None]] = {}
        retry: list[Pending] = []
        if missed or verify:
            await self.explain(conn, missed, verify, taken, outcome, retry)
        for p in issuing:
            self.codes_in_flight[p.meta.key] -= 1
        for p in issuing:
            at = issued.get(p.code)
            if at is not None:
                self.release_slot(p, at)
                if self.pool.spent(p.lease):
                    self.spent_leases.append(p.lease)
                self.answer(p, p.code)
                continue
            self.release_slot(p)
            result = outcome.get(p.tag)
            if result is not None:
                self.answer(p, result[0], result[1])
        for p, _ in verify:
            code, error = outcome[p.tag]
            self.answer(p, code, error)
        for p in retry:
            p.code = None
            p.attempts += 1
            if p.attempts >= MAX_ATTEMPTS:
                self.answer(p, None, Unavailable("claim kept conflicting; retry"))
            else:
                self.parked.append(p)

    async def explain(self, conn: psycopg.AsyncConnection, missed: list[Pending],
                      verify: list[tuple[Pending, AngoError]], taken: set[str], outcome: dict,
                      retry: list[Pending]) -> None:
        """Why claims were not issued, read from committed state; decide each one."""
        phantom = [p for p in missed if p.code in taken]
        if phantom:
            await conn.execute(queries["release_phantom_slots"], (
                [p.meta.key for p in phantom], [p.customer_id for p in phantom],
                [p.slot for p in phantom], [p.code for p in phantom]))
        mine: set[int] = set()
        gone: set[str] = set()
        # A claim refused as over the rule or exhausted by a shard that has not
        # yet heard of an expiry is told the batch expired, as any later one is.
        rows = await (await conn.execute(queries["expired_batches"], (list(
            {p.meta.key for p in missed} | {p.meta.key for p, _ in verify}),))).fetchall()
        expired = {key for key, state, _ in rows if state == "expired"}
        not_started = {key for key, state, _ in rows if state == "not_started"}
        current = {key: rule for key, _, rule in rows}
        # A claim refused for a stale rule is retried under the current one.
        for meta in {id(p.meta): p.meta for p in missed}.values():
            self.apply_rules(meta, current.get(meta.key))
        if missed:
            rows = await (await conn.execute(
                queries["leases_still_mine"],
                (list({p.lease for p in missed}), self.owner))).fetchall()
            mine = {row[0] for row in rows}
            rows = await (await conn.execute(
                queries["issued_among"], ([p.code for p in missed],))).fetchall()
            gone = {row[0] for row in rows}
        lookups = missed + [p for p, _ in verify]
        rows = await (await conn.execute(
            queries["issued_by_request"],
            ([p.meta.key for p in lookups], [p.request_id for p in lookups]))).fetchall()
        earlier = {(bk, rid): (code, cust) for bk, rid, code, cust in rows}
        for p in missed:
            key = (p.meta.key, p.customer_id)
            if p.meta.key in expired:
                p.meta.expired = True
                self.pool.drop_batch(p.meta.key)
            if (p.meta.key, p.request_id) in earlier:  # a retry: whatever the batch's state
                if not p.meta.expired:
                    self.pool.put_back(p.meta.key, p.code, p.lease)
                outcome[p.tag] = self.replay(p, earlier[(p.meta.key, p.request_id)])
                self.needs_load.add(key)
            elif p.meta.expired:
                outcome[p.tag] = (None, BatchExpired(f"batch {p.batch_id} has expired"))
            elif p.meta.key in not_started:
                self.pool.put_back(p.meta.key, p.code, p.lease)
                outcome[p.tag] = (None, BatchNotStarted(f"batch {p.batch_id} has not started"))
            elif p.lease not in mine:
                self.pool.drop_lease(p.lease)
                retry.append(p)
            elif p.code in gone:  # issued by another owner: drop it, try another code
                if self.pool.spent(p.lease):
                    self.spent_leases.append(p.lease)
                retry.append(p)
            else:  # the rule slot was refused: our counter was stale
                self.pool.put_back(p.meta.key, p.code, p.lease)
                self.needs_load.add(key)
                retry.append(p)
        for p, error in verify:
            found = earlier.get((p.meta.key, p.request_id))
            if found:
                outcome[p.tag] = self.replay(p, found)
            elif p.meta.key in expired:
                if not p.meta.expired:
                    p.meta.expired = True
                    self.pool.drop_batch(p.meta.key)
                outcome[p.tag] = (None, BatchExpired(f"batch {p.batch_id} has expired"))
            else:
                outcome[p.tag] = (None, error)

    def replay(self, p: Pending, found: tuple[str, str]) -> tuple[str | None, AngoError | None]:
        code, customer = found
        if customer != p.customer_id:
            return None, InvalidInput(f"request id {p.request_id!r} was already used by "
                                      "another customer of this batch")
        return code, None

    # -- liveness -----------------------------------------------------------------

    async def heartbeat(self) -> None:
        """Beat, and adopt the leases of owners that stopped beating (I3)."""
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            try:
                cur = await self.hb_conn.execute(queries["heartbeat"], (self.owner,))
                if cur.rowcount == 0:
                    log.error("shard %s: reaped by another process; exiting", self.index)
                    os._exit(75)
                await self.adopt(self.hb_conn)
            except psycopg.OperationalError:
                try:
                    await self.hb_conn.close()
                    self.hb_conn = await psycopg.AsyncConnection.connect(
                        self.dsn, autocommit=True)
                except psycopg.OperationalError:
                    pass

    async def close(self) -> None:
        """Clean shutdown: retire so our leases are adoptable at once."""
        # The control connection is idle once run() has returned; the heartbeat's
        # may have been cancelled mid-query, so it is not used again.
        try:
            await asyncio.wait_for(
                self.conn.execute(queries["retire_owner"], (self.owner,)), 5.0)
        except (psycopg.Error, TimeoutError):
            pass
        for conn in (self.conn, self.hb_conn, *self.commit_conns):
            if conn is not None:
                try:
                    await asyncio.wait_for(conn.close(), 2.0)
                except (psycopg.Error, TimeoutError):
                    pass


async def main_async(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    sock = socket.socket(fileno=args.fd)
    shard = Shard(os.environ["ANGO_SHARD_DSN"], args.index, args.count, args.instance,
                  [int(p) for p in args.parts.split(",") if p])
    lost = loop.create_future()

    def on_lost(exc: Exception | None) -> None:
        shard.stopping = True
        shard.wake.set()
        if not lost.done():
            lost.set_result(None)

    decoder = msgspec.msgpack.Decoder(m.ToShard)
    _, link = await loop.create_unix_connection(
        lambda: m.FramedProtocol(decoder, shard.receive, on_lost), sock=sock)
    shard.link = link
    try:
        recovered = await shard.start()
    except psycopg.Error as exc:
        # Tell the Allocator why (too many clients, a wrong password...), so its
        # error names PostgreSQL's reason, not only "did not start".
        log.error("shard %s could not start: %s", args.index, exc)
        shard.send(m.StartFailed(str(exc).strip() or type(exc).__name__))
        link.transport.close()  # flushes the message first
        await asyncio.wait([lost], timeout=2.0)
        os._exit(78)
    shard.send(m.Ready(shard.owner, recovered))
    beat = asyncio.create_task(shard.heartbeat())
    beat.add_done_callback(functools.partial(_heartbeat_ended, shard))
    try:
        await shard.run()
    finally:
        await stop_task(beat)
        shard.flush()
        await shard.close()


def _heartbeat_ended(shard: Shard, beat: asyncio.Task[None]) -> None:
    """A shard without its heartbeat must not run on: exit, and be restarted.

    Its leases would go stale and be adopted by others while it kept serving
    (PostgreSQL would refuse its commits, but its claims would fail). Exiting
    at once lets the supervisor start a successor that adopts them and gets
    the unanswered claims again, with their request ids.
    """
    if beat.cancelled():
        return  # a clean shutdown
    log.critical("shard %s: heartbeat stopped (%r); exiting to be replaced",
                 shard.index, beat.exception())
    shard.flush()
    os._exit(70)


def main() -> None:
    parser = argparse.ArgumentParser(description="An Ango shard process (run by the Allocator).")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--instance", required=True)
    parser.add_argument("--parts", default="")
    args = parser.parse_args()
    configure_from_env()  # as `ango serve --log-level/--log-format` set it
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the Allocator decides when we stop
    try:
        import uvloop
        uvloop.run(main_async(args))
    except ImportError:
        asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
