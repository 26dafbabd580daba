"""The group commit: a group of claims in, each claim decided.

``prepare`` checks a group against what the shard knows (batches, rule
counters), reserves rule slots and assigns leased codes; ``commit`` issues
them with one statement, ``explain`` reads from committed state why misses
missed, and ``replay`` answers a retried request id with its recorded code.
Claims are answered through the ``answer`` callback; claims that must wait for
a group in flight are parked (``take_parked``). The shard process
(``ango.shards.worker``) schedules groups and owns the connections they run on;
this object holds the codes (``CodePool``) and rule counters they need.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter
from typing import Protocol

import psycopg

from ango.cluster.slots import slot_of
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
from ango.rules import parse_rules
from ango.shards.claims import BatchMeta, Pending
from ango.shards.counters import FULL, WAIT, CustomerCounters
from ango.shards.pool import CodePool
from ango.shards.store import ShardConnection

log = logging.getLogger("ango.shard")

MAX_BLOCK = 8192          # codes per lease, at most
LOW_WATER = MAX_BLOCK // 2  # codes held below which the next lease is fetched ahead
PREFETCH_PAUSE_S = 1.0    # after a lease ahead found the cursor at its end
MAX_ATTEMPTS = 8          # a claim retried more often than this answers Unavailable
META_REFRESH_S = 1.0      # batch rules and expiry are re-read this often (issue 14)


class Answer(Protocol):
    """Called once per claim decided: its code, or None and the error."""

    def __call__(self, p: Pending, code: str | None, error: AngoError | None = None) -> None: ...


class GroupCommit:
    """Prepares, commits and explains groups of claims for one shard."""

    def __init__(self, control: ShardConnection, count: int, answer: Answer,
                 ahead: ShardConnection | None = None) -> None:
        self.control = control  # checks, leases, loads (group commits bring their own)
        # Leases fetched ahead run here, off the claim path (the heartbeat's
        # connection in a shard: idle but for one beat a second).
        self.ahead = ahead
        self.prefetching: dict[int, asyncio.Task[None]] = {}
        self.prefetch_after: dict[int, float] = {}
        self.owner = control.owner
        self.count = count  # shards of the instance: leases near the end spread over them
        self.answer = answer
        self.pool = CodePool()
        self.counters = CustomerCounters()
        self.batches: dict[str, BatchMeta] = {}
        self.needs_load: set[tuple[int, str]] = set()
        self.spent_leases: list[int] = []  # used up; deleted with the next group
        self.parked: list[Pending] = []  # waiting for a group in flight to finish
        self.codes_in_flight: Counter[int] = Counter()  # per batch, in group commits
        self.meta_loaded = time.monotonic()  # when batch meta was last re-read

    # -- codes held ---------------------------------------------------------------

    async def load_leases(self, db: ShardConnection, lease_ids: list[int]) -> int:
        """Hold the unissued codes of leases now ours; delete the empty ones."""
        leases = await db.unissued_codes(lease_ids)
        for lease_id, batch_key, codes in leases:
            self.pool.drop_lease(lease_id)
            self.pool.add_lease(lease_id, batch_key, codes)
        found = {lease.lease_id for lease in leases}
        empty = [lid for lid in lease_ids if lid not in found]
        if empty:
            await db.delete_leases(empty)
        return sum(len(lease.codes) for lease in leases)

    def put_back(self, p: Pending) -> None:
        """The claim's code (if it has one) goes back to the pool, to be handed out first."""
        if p.meta is not None and p.code is not None:
            self.pool.put_back(p.meta.key, p.code, p.lease)

    def take_parked(self) -> list[Pending]:
        """The claims parked until a group in flight finished (and none are left parked)."""
        parked, self.parked = self.parked, []
        return parked

    # -- leases fetched ahead ---------------------------------------------------------

    def prefetch(self, batch_key: int) -> None:
        """Lease the batch's next block in the background once its held codes run low.

        A lease reads thousands of codes (milliseconds to tens of them on a cold
        table): taken on the claim path it stalls every claim behind it.
        """
        if (self.ahead is None or batch_key in self.prefetching
                or self.pool.held(batch_key) >= LOW_WATER
                or time.monotonic() < self.prefetch_after.get(batch_key, 0.0)):
            return
        task = asyncio.create_task(self._prefetch(batch_key))
        self.prefetching[batch_key] = task
        task.add_done_callback(lambda _: self.prefetching.pop(batch_key, None))

    async def _prefetch(self, batch_key: int) -> None:
        try:
            block = self.pool.next_block(batch_key, MAX_BLOCK)
            leased = await self.ahead.lease_block(batch_key, block, 1, 2 * self.count)
            if leased is None:  # the cursor is at its end: the claim path steals (I7)
                self.prefetch_after[batch_key] = time.monotonic() + PREFETCH_PAUSE_S
            elif len(leased.codes) == leased.size:
                self.pool.add_lease(leased.lease_id, batch_key, leased.codes)
            else:  # a top-up committed while we waited (see lease_block)
                await self.load_leases(self.ahead, [leased.lease_id])
        except psycopg.Error as exc:  # the claim path leases for itself meanwhile
            log.info("lease ahead of batch %s failed: %s", batch_key, exc)
            self.prefetch_after[batch_key] = time.monotonic() + PREFETCH_PAUSE_S

    async def stop_prefetching(self) -> None:
        """Wait for the leases being fetched ahead (their codes then held, or recovered)."""
        if self.prefetching:
            await asyncio.wait(list(self.prefetching.values()))

    # -- prepare ------------------------------------------------------------------

    async def load_batches(self, batch_ids: set[str]) -> None:
        """(Re-)read what the shard knows of these batches (ids not UUIDs are skipped)."""
        valid = []
        for bid in batch_ids:
            try:
                valid.append(uuid.UUID(bid))
            except ValueError:
                continue
        if not valid:
            return
        for bid, key, client_id, rules, expired in await self.control.batch_meta(valid):
            meta = self.batches.get(str(bid))
            if meta is None:
                meta = self.batches[str(bid)] = BatchMeta(key, str(client_id), None, None, expired)
            meta.expired = expired
            self.apply_rules(meta, rules)

    def forget_slots(self, slots: set[int], slot_count: int) -> None:
        """Drop the counters of customers whose routing slot is in ``slots`` (another
        instance owns them now; read again from PostgreSQL if they come back)."""
        batch_of = {meta.key: bid for bid, meta in self.batches.items()}
        self.counters.forget_where(
            lambda key: key[0] in batch_of and slot_of(batch_of[key[0]], key[1], slot_count)
            in slots)

    def apply_rules(self, meta: BatchMeta, rules: dict | None) -> None:
        """Take the batch's current rules; counters of a changed rule are forgotten
        (they are reloaded from the database on need)."""
        rule = parse_rules(rules).per_customer
        limit, window = (rule.limit, rule.window_seconds) if rule else (None, None)
        if (meta.limit, meta.window) != (limit, window):
            meta.limit, meta.window = limit, window
            self.counters.forget_batch(meta.key)

    async def load_customers(self) -> None:
        """Load the rule counters of customers whose counter was missing or stale."""
        keys = list(self.needs_load)
        self.needs_load.clear()
        rows = await self.control.customer_slots(keys)
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
            ahead = self.prefetching.get(batch_key)
            if ahead is not None and self.pool.held(batch_key) < wanted:
                await asyncio.shield(ahead)  # its block is on the way: wait, not lease twice
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
                    others[p.meta.key] = await self.control.other_leases_exist(p.meta.key)
                # A code in a group commit may yet come back (its claim refused):
                # "exhausted" only once no code of the batch is held anywhere (I7).
                if (others[p.meta.key] or self.codes_in_flight[p.meta.key]
                        or p.meta.key in self.prefetching):
                    deferred.append(p)
                else:
                    verify.append((p, BatchExhausted(f"batch {p.batch_id} has no code left")))
                continue
            p.code, p.lease = got
            self.codes_in_flight[p.meta.key] += 1
            issuing.append(p)
        for batch_key in need:
            self.prefetch(batch_key)
        self.parked.extend(deferred)
        return issuing, verify

    def release_slot(self, p: Pending, issued_at: float | None = None) -> None:
        """End the claim's slot reservation (``issued_at``: the claim took the slot)."""
        if p.slot is not None:
            self.counters.release((p.meta.key, p.customer_id), p.slot, issued_at)
            p.slot = None

    async def lease(self, batch_key: int, short: int) -> None:
        """Lease at least ``short`` codes if the cursor allows; else steal (I7)."""
        block = self.pool.next_block(batch_key, MAX_BLOCK)
        leased = await self.control.lease_block(batch_key, block, short, 2 * self.count)
        if leased is not None:
            if len(leased.codes) == leased.size:
                self.pool.add_lease(leased.lease_id, batch_key, leased.codes)
            else:  # a top-up committed while we waited: read its codes now (see the query)
                await self.load_leases(self.control, [leased.lease_id])
            return
        for _ in range(16):
            stolen = await self.control.steal_lease(batch_key)
            if not stolen:
                return
            await self.load_leases(self.control, stolen)
            if self.pool.held(batch_key) >= short:
                return

    # -- commit -------------------------------------------------------------------

    async def commit(self, issuing: list[Pending], verify: list[tuple[Pending, AngoError]],
                     db: ShardConnection) -> int:
        """The group commit: one autocommitted statement in the common case.

        Returns how many claims it issued (those that missed are retried or
        answered otherwise).

        Claims are answered only after it returns, that is after COMMIT (I2).
        Misses are explained afterwards by reads of committed state.
        """
        try:
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
                try:
                    issued, taken = await db.issue_group(params)
                except BaseException:
                    self.spent_leases[:0] = spent
                    raise
            missed = [p for p in issuing if p.code not in issued]
            outcome: dict[int, tuple[str | None, AngoError | None]] = {}
            retry: list[Pending] = []
            if missed or verify:
                await self.explain(db, missed, verify, taken, outcome, retry)
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
            return len(issued)
        finally:
            # Returned or raised, this group's codes are no longer in flight (I7:
            # "exhausted" waits for them).
            for p in issuing:
                self.codes_in_flight[p.meta.key] -= 1

    async def explain(self, db: ShardConnection, missed: list[Pending],
                      verify: list[tuple[Pending, AngoError]], taken: set[str], outcome: dict,
                      retry: list[Pending]) -> None:
        """Why claims were not issued, read from committed state; decide each one."""
        phantom = [p for p in missed if p.code in taken]
        if phantom:
            await db.release_phantom_slots(
                [p.meta.key for p in phantom], [p.customer_id for p in phantom],
                [p.slot for p in phantom], [p.code for p in phantom])
        mine: set[int] = set()
        gone: set[str] = set()
        # A claim refused as over the rule or exhausted by a shard that has not
        # yet heard of an expiry is told the batch expired, as any later one is.
        rows = await db.batch_states(list(
            {p.meta.key for p in missed} | {p.meta.key for p, _ in verify}))
        expired = {key for key, state, _ in rows if state == "expired"}
        not_started = {key for key, state, _ in rows if state == "not_started"}
        current = {key: rule for key, _, rule in rows}
        # A claim refused for a stale rule is retried under the current one.
        for meta in {id(p.meta): p.meta for p in missed}.values():
            self.apply_rules(meta, current.get(meta.key))
        if missed:
            mine = await db.leases_still_mine(list({p.lease for p in missed}))
            gone = await db.issued_among([p.code for p in missed])
        lookups = missed + [p for p, _ in verify]
        rows = await db.issued_by_request(
            [p.meta.key for p in lookups], [p.request_id for p in lookups])
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
        """The answer to a retried request id: its recorded code, if it is this customer's."""
        code, customer = found
        if customer != p.customer_id:
            return None, InvalidInput(f"request id {p.request_id!r} was already used by "
                                      "another customer of this batch")
        return code, None
