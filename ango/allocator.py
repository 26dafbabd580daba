"""The embedded API: ``ango.Allocator``.

    async with ango.Allocator() as alloc:
        code = await alloc.claim(batch_id, customer_id, request_id="order-17")

The Allocator resolves the database (embedded PostgreSQL when no DSN is
configured), applies the schema, and starts one shard process per CPU core
(fewer if PostgreSQL has not the connections for them: see shards_for).
A claim for (batch, customer) goes to the shard owning hash(batch, customer)
modulo the partition count, so that customer's rule counter lives in one
process; the shard answers from codes leased into its memory, after the group
commit that issues them.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import re
import uuid
import zlib
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from ango import batches as batches_lib
from ango import cpus, database
from ango.errors import ConfigurationError, InvalidInput, Unavailable
from ango.health import DatabaseWatch
from ango.importer import check_text as _text
from ango.importer import parse_uuid
from ango.shards import messages as m
from ango.shards.supervisor import (
    ALLOCATOR_CONNECTIONS,
    Deadlines,
    ShardHandle,
    connections_needed,
    connections_per_shard,
)
from ango.tally import GROUP_SIZE_BUCKETS, SECONDS_BUCKETS, Tally, merged

if TYPE_CHECKING:
    import ssl

    from ango.cluster.membership import Membership
    from ango.cluster.router import Router

log = logging.getLogger("ango.allocator")

MAX_CUSTOMER_ID = 256
MAX_REQUEST_ID = 128
#: The UUID spellings accepted: 8-4-4-4-12 with hyphens or 32 digits, either case.
_UUID_FORM = re.compile(r"[0-9a-fA-F]{8}(-?)[0-9a-fA-F]{4}\1[0-9a-fA-F]{4}\1[0-9a-fA-F]{4}\1"
                        r"[0-9a-fA-F]{12}")


_CANONICAL: dict[str, str] = {}  # UUID strings already parsed: batch ids repeat on every claim
_CANONICAL_MAX = 100_000


def _uuid_text(value: object, what: str) -> str:
    if isinstance(value, uuid.UUID):
        return str(value)
    found = _CANONICAL.get(value) if isinstance(value, str) else None
    if found is not None:
        return found
    if isinstance(value, str) and not _UUID_FORM.fullmatch(value):
        raise InvalidInput(f"{what} must be a UUID (8-4-4-4-12 hex digits), got {value[:80]!r}")
    text = str(parse_uuid(value, what))
    if len(_CANONICAL) >= _CANONICAL_MAX:
        _CANONICAL.clear()
    _CANONICAL[value] = text
    return text


def claim_fields(batch_id: object, customer_id: object, client_id: object,
                 request_id: object) -> tuple[str, str, str | None, str]:
    """A claim's fields checked and canonical: (batch, customer, client, request id).

    Raises InvalidInput naming the field. A missing request id gets a random one.
    Shared by ``Allocator.claim`` and a shard's direct connections (issue 13).
    """
    bid = _uuid_text(batch_id, "batch id")
    customer = _text(customer_id, "customer id", MAX_CUSTOMER_ID)
    client = None if client_id is None else _uuid_text(client_id, "client id")
    request = (os.urandom(16).hex() if request_id is None
               else _text(request_id, "request id", MAX_REQUEST_ID))
    return bid, customer, client, request


def shards_for(requested: int | None, budget: database.ConnectionBudget,
               cores: int | None = None) -> int:
    """How many shards to start: ``requested``, or one per core, as PostgreSQL allows.

    A requested count that does not fit is refused, naming the numbers. The
    default is one per core, capped to leave one shard's connections free (for
    an operator's psql, or a restarted shard whose old connections linger).
    """
    per = connections_per_shard()
    free = budget.available
    fits = max(0, (free - ALLOCATOR_CONNECTIONS) // per)
    wanted = requested or cores or cpus.available()
    if requested is not None and requested <= fits:
        return requested
    if requested is None and fits >= 1:
        chosen = min(wanted, max(1, fits - 1))
        if chosen < wanted:
            log.warning("starting %d shard(s), not one per core (%d): PostgreSQL has room for "
                        "%d more connections (%s), and each shard holds %d",
                        chosen, wanted, free, budget.describe(), per)
        return chosen
    wanted = requested or 1  # by default, even one shard does not fit
    advice = f"use at most {fits} shard(s), or raise" if fits else "raise"
    raise ConfigurationError(
        f"{wanted} shard(s) need {connections_needed(wanted)} PostgreSQL connections "
        f"({per} per shard + {ALLOCATOR_CONNECTIONS} for the Allocator), but PostgreSQL has "
        f"room for {free} more ({budget.describe()}); {advice} max_connections or the "
        f"CONNECTION LIMIT, or close other connections")


def _hash(batch_id: str, customer_id: str) -> int:
    """The hash both the local partition and the cluster's routing slot are taken from."""
    return zlib.crc32(f"{batch_id}/{customer_id}".encode())


def partition_of(batch_id: str, customer_id: str, partitions: int) -> int:
    """The partition owning a customer's counters in a batch (stable across processes)."""
    return _hash(batch_id, customer_id) % partitions


class Allocator:
    """Hands out codes through shard processes; see the module docstring."""

    def __init__(self, dsn: str | None = None, *, shards: int | None = None,
                 data_dir: str | os.PathLike[str] | None = None,
                 deadlines: Deadlines | None = None) -> None:
        """``deadlines``: how hung shards are found and claims bounded (see Deadlines)."""
        if shards is not None and not 1 <= shards <= 256:
            raise InvalidInput(f"shards must be between 1 and 256, got {shards}")
        self._dsn_given = dsn
        self._shards_requested = shards
        self._deadlines = deadlines or Deadlines()
        self._data_dir = data_dir
        self.shard_count = shards or cpus.available()
        self.instance = str(uuid.uuid4())
        self.dsn: str | None = None
        self.partitions = 0
        self._shards: list[ShardHandle] = []
        self._route: list[ShardHandle] = []
        self._tags = itertools.count(1)
        self._stats_waiters: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._open = False
        self.database: DatabaseWatch | None = None
        # Cluster (issue 13): set by join_cluster; without it every slot is served here.
        self.router: Router | None = None
        self.membership: Membership | None = None
        self.slots = 0
        #: Whether the last claim() went to (or waits for) another instance: the
        #: protocol server reads it right after the call for the answer's ``moved``.
        self.last_claim_moved = False

    async def __aenter__(self) -> Allocator:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _in_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(
            None, functools.partial(fn, *args))

    async def start(self) -> None:
        """Resolve the database, apply the schema and start the shards."""
        self.dsn = await self._in_thread(database.ready_dsn, self._dsn_given, self._data_dir)
        self.partitions, budget = await self._in_thread(self._read_layout)
        self.shard_count = shards_for(self._shards_requested, budget)
        parts_of: list[list[int]] = [[] for _ in range(self.shard_count)]
        for part in range(self.partitions):
            parts_of[part % self.shard_count].append(part)
        self._shards = [
            ShardHandle(i, self.shard_count, self.instance, parts_of[i], self.dsn, self._on_stats,
                        self._deadlines)
            for i in range(self.shard_count)
        ]
        try:
            await asyncio.gather(*(s.start() for s in self._shards))
        except BaseException:
            await asyncio.gather(*(s.stop(timeout=2) for s in self._shards),
                                 return_exceptions=True)
            raise
        self._route = [self._shards[p % self.shard_count] for p in range(self.partitions)]
        self.database = DatabaseWatch(self.dsn)
        await self.database.start()
        self._open = True

    def _read_layout(self) -> tuple[int, database.ConnectionBudget]:
        with database.connect(self.dsn) as conn:
            return database.partition_count(conn), database.connection_budget(conn)

    async def join_cluster(self, name: str, address: str, token: str, *,
                           tls: ssl.SSLContext | None = None) -> None:
        """Take part in the cluster of instances on this database (see ango.cluster):
        heartbeat as ``name``, reachable at ``address`` (host:port) with ``token``
        (over TLS with ``tls``, a client context), take a fair share of the routing
        slots and forward claims of the others'."""
        from ango.cluster.membership import Membership
        from ango.cluster.router import Router

        self.slots = await self._read(database.routing_slot_count)
        self.router = Router(name, self.slots, token, self._forget_slots, tls)
        self.membership = Membership(name, address, self.dsn, self.router, self._drain_slots)
        await self.membership.start()

    def _forget_slots(self, slots: list[int]) -> None:
        for shard in self._shards:
            shard.forget_slots(slots, self.slots)

    async def _drain_slots(self, slots: list[int]) -> None:
        """Wait until the claims in flight here for ``slots`` are answered."""
        chosen = set(slots)
        count = self.slots
        waits = [future for shard in self._shards for future, claim, *_ in shard.in_flight.values()
                 if _hash(claim.batch_id, claim.customer_id) % count in chosen]
        if waits:
            await asyncio.wait(waits)

    async def close(self) -> None:
        """Finish the claims in flight, leave the cluster, stop the shards, release leases."""
        if not self._shards:
            return
        self._open = False
        if self.membership is not None:
            await self._drain_slots(list(range(self.slots)))
            await self.membership.leave()
        if self.database is not None:
            await self.database.close()
        await asyncio.gather(*(s.stop() for s in self._shards), return_exceptions=True)
        self._shards = []

    def claim(self, batch_id: str, customer_id: str, *, client_id: str | None = None,
              request_id: str | None = None, forwarded: bool = False) -> Awaitable[str]:
        """Hand one code of the batch to the customer; resolves after it is committed.

        Raises BatchNotFound, BatchExpired, BatchExhausted, RuleViolation,
        InvalidInput, or Unavailable (retry with the same ``request_id``).
        In a cluster, a claim whose routing slot another instance owns is
        forwarded to it (served here if it cannot be reached); ``forwarded``
        claims came from another instance and are served here.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[str] = loop.create_future()
        try:
            if not self._open:
                raise Unavailable("the allocator is not running")
            bid, customer, client, request = claim_fields(
                batch_id, customer_id, client_id, request_id)
        except Exception as exc:
            future.set_exception(exc)
            return future
        h = _hash(bid, customer)
        router = self.router
        if router is None or forwarded:
            self.last_claim_moved = False
            self._serve_here(h, bid, customer, client, request, future)
            return future
        # Ownership only places the customer's counters; PostgreSQL arbitrates the
        # claim wherever it is served, so serving it here instead is always correct.
        self.last_claim_moved = router.route(
            h % self.slots, bid, customer, client, request, future,
            functools.partial(self._serve_here, h, bid, customer, client, request, future))
        return future

    def _serve_here(self, h: int, bid: str, customer: str, client: str | None, request: str,
                    future: asyncio.Future[str]) -> None:
        if future.done():
            return
        if not self._open:
            future.set_exception(Unavailable("the allocator is not running"))
            return
        self._route[h % self.partitions].submit(
            m.Claim(next(self._tags), bid, customer, client, request), future)

    def hand_off(self, shard: int, fd: int, handoff: m.Direct) -> bool:
        """Pass a client connection (socket ``fd``, authenticated as ``handoff`` says) to
        shard ``shard``, which serves its claims from now on (issue 13). False: keep it."""
        if not self._open or not 0 <= shard < len(self._shards):
            return False
        return self._shards[shard].hand_off(fd, handoff)

    def revoke_tokens(self, token_ids: list[int]) -> None:
        """Close the connections handed to the shards that these revoked tokens opened."""
        for shard in self._shards:
            shard.revoke_tokens(token_ids)

    def partition_map(self) -> dict[str, Any]:
        """Who owns each routing slot, for the ``partition_map`` message (docs/PROTOCOL.md)."""
        from ango.cluster.slots import HASH_DEFINITION

        router = self.router
        if router is None:
            return {"version": 0, "slots": 0, "hash": HASH_DEFINITION, "addresses": [],
                    "owners": []}
        live = router.addresses
        addresses = sorted(set(live.values()))
        index = {name: addresses.index(address) for name, address in live.items()}
        return {"version": router.version, "slots": router.slots, "hash": HASH_DEFINITION,
                "addresses": addresses,
                "owners": [index.get(owner, -1) if owner is not None else -1
                           for owner in router.owners]}

    async def expire(self, batch_id: str, *, client_id: str | None = None) -> bool:
        """Expire a batch; once this returns no claim of it succeeds (I5).

        Returns False if it was already expired; raises BatchNotFound (also for
        a batch of another client than ``client_id``, when given).
        """
        bid = _uuid_text(batch_id, "batch id")
        client = None if client_id is None else _uuid_text(client_id, "client id")
        return await self._in_thread(self._expire, bid, client)

    def _expire(self, batch_id: str, client_id: str | None) -> bool:
        with database.connect(self.dsn, autocommit=True) as conn:
            return batches_lib.expire_batch(conn, batch_id, client_id)

    async def batches(self, *, client_id: str | None = None) -> list[dict[str, Any]]:
        """Every batch (of ``client_id`` only, when given) with its counts, as
        `ango batches --json` prints them."""
        client = None if client_id is None else _uuid_text(client_id, "client id")
        return await self._in_thread(self._batches, client)

    def _batches(self, client_id: str | None) -> list[dict[str, Any]]:
        with database.connect(self.dsn, autocommit=True) as conn:
            return [b.to_dict() for b in batches_lib.list_batches(conn, client_id)]

    async def _read(self, fn, *args):
        """``fn(conn, *args)`` on a fresh autocommit connection, in a thread."""
        def call():
            with database.connect(self.dsn, autocommit=True) as conn:
                return fn(conn, *args)
        return await self._in_thread(call)

    async def lookup(self, code: str) -> dict[str, Any]:
        """Who has ``code``, as `ango lookup --json` prints it (see ango.lookup)."""
        from ango.lookup import lookup_code

        return (await self._read(lookup_code, code)).to_dict()

    async def customer_codes(self, customer_id: str, batch_id: str | None = None,
                             limit: int = 1000) -> list[dict[str, Any]]:
        """The codes ``customer_id`` received, newest first (see ango.lookup)."""
        from ango.lookup import customer_codes

        rows = await self._read(customer_codes, customer_id, batch_id, limit)
        return [row.to_dict() for row in rows]

    async def export(self, batch_id: str, what: str, out: Any, fmt: str = "csv") -> int:
        """Stream the batch's issued or available codes to ``out`` (a binary
        stream or a path) as CSV or JSON lines; return the rows (see ango.export)."""
        from ango.export import export_codes

        return await self._read(export_codes, batch_id, what, out, fmt)

    async def top_up(self, source: Any, batch_id: str, client_id: str | None = None) -> int:
        """Add the codes of ``source`` (a path or binary stream) to a running batch;
        the shards see them without a restart. Returns the codes added (see
        ango.importer.top_up)."""
        from ango.importer import top_up

        result = await self._in_thread(top_up, self.dsn, source, batch_id, client_id)
        return result.imported

    async def set_schedule(self, batch_id: str, starts_at: Any = None,
                           expires_at: Any = None, *, keep_start: bool = False,
                           keep_end: bool = False) -> dict[str, Any]:
        """Set a batch's ``starts_at`` and ``expires_at`` (None clears; ``keep_*``
        leaves one as it is); every claim committed after this returns follows
        the new schedule (see ango.schedules)."""
        from ango.schedules import UNCHANGED, set_schedule

        start = UNCHANGED if keep_start else starts_at
        end = UNCHANGED if keep_end else expires_at
        return (await self._read(set_schedule, batch_id, start, end)).to_dict()

    async def set_rules(self, batch_id: str, rules: Any) -> dict[str, Any] | None:
        """Replace a batch's rules (JSON text, a dict or None); every claim committed
        after this returns is judged by them (see ango.batches.set_rules)."""
        return await self._read(batches_lib.set_rules, batch_id, rules)

    async def delete(self, batch_id: str, purge: bool = False) -> dict[str, Any]:
        """Delete an expired batch's unissued codes and leases, or with ``purge``
        every trace of it (see ango.batches.delete_batch)."""
        return await self._read(batches_lib.delete_batch, batch_id, purge)

    def _on_stats(self, reply: m.StatsReply) -> None:
        waiter = self._stats_waiters.pop(reply.tag_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(reply.stats)

    async def _poll_shards(self, timeout: float) -> list[dict[str, Any]]:
        """Each shard's own counters, asked over its link; a silent one is marked so."""
        loop = asyncio.get_running_loop()
        waits = []
        for shard in self._shards:
            future = loop.create_future()
            tag = next(self._tags)
            if shard.alive:
                self._stats_waiters[tag] = future
                shard.request_stats(tag)
            else:
                future.set_result({"shard": shard.index, "alive": False})
            waits.append((tag, future))
        per_shard: list[dict[str, Any]] = []
        for shard, (tag, future) in zip(self._shards, waits, strict=True):
            try:
                found = dict(await asyncio.wait_for(future, timeout), alive=shard.alive)
            except TimeoutError:
                self._stats_waiters.pop(tag, None)
                found = {"shard": shard.index, "alive": False,
                         "error": f"no answer within {timeout:g} s"}
            # Counted by the supervisor, so they include the shard's dead incarnations.
            found.update(claims_served=shard.served, claims_refused=shard.refused,
                         groups=shard.group_sizes.count, restarts=shard.restarts)
            per_shard.append(found)
        return per_shard

    async def stats(self) -> dict[str, Any]:
        """Health and counters: shards alive, claims in flight and served, leases held.

        Claims served and group commits are counted by the supervisor from the
        shards' answers, so they stay right across shard restarts; leases and
        codes held are what each live shard holds now.
        """
        per_shard = await self._poll_shards(2.0)
        sizes, seconds = self.group_commits()
        database = self.database
        return {
            "shards": self.shard_count,
            "shards_alive": self.shards_alive,
            "partitions": self.partitions,
            "in_flight": sum(len(s.in_flight) for s in self._shards),
            "claims_served": self.claims_served,
            "claims_refused": sum(s.refused for s in self._shards),
            "leases_held": sum(s.get("leases_held", 0) for s in per_shard),
            "codes_held": sum(s.get("codes_held", 0) for s in per_shard),
            "restarts": self.restarts,
            "group_commits": {"size": sizes.summary(), "seconds": seconds.summary()},
            "database": {"up": database.up if database else False,
                         "error": database.error if database else "not started"},
            "per_shard": per_shard,
            **({"cluster": self.membership.stats()} if self.membership else {}),
        }

    def group_commits(self) -> tuple[Tally, Tally]:
        """Claims per group commit and its duration, over every shard and incarnation."""
        return (merged((s.group_sizes for s in self._shards), GROUP_SIZE_BUCKETS),
                merged((s.group_seconds for s in self._shards), SECONDS_BUCKETS))

    @property
    def claims_served(self) -> int:
        """Claims answered with a code by the shards, every incarnation counted."""
        return sum(s.served for s in self._shards)

    @property
    def shards_alive(self) -> int:
        """Shard processes alive now."""
        return sum(1 for s in self._shards if s.alive)

    @property
    def restarts(self) -> int:
        """Shard processes restarted since the Allocator started."""
        return sum(s.restarts for s in self._shards)

    @property
    def postgres_version(self) -> str | None:
        """PostgreSQL's ``server_version``, once the Allocator has started."""
        return self.database.version if self.database else None

    async def ready(self, timeout: float = 1.0) -> tuple[bool, dict[str, Any]]:
        """Ready to serve claims: PostgreSQL answers within ``timeout`` and every shard
        process is alive and answers its link within ``timeout``.

        Returns ``(ready, reasons)``; ``reasons`` names each check and what it found,
        for a readiness probe's body.
        """
        if not self._open or self.database is None:
            return False, {"allocator": "not running"}
        reasons: dict[str, Any] = {}
        db_error, per_shard = await asyncio.gather(self.database.check(),
                                                   self._poll_shards(timeout))
        reasons["postgres"] = "ok" if db_error is None else db_error
        down = [s["shard"] for s in per_shard if not s.get("alive") or "error" in s]
        reasons["shards"] = (f"{len(per_shard)} of {len(per_shard)} alive" if not down else
                             f"not serving: {', '.join(map(str, down))}")
        membership = self.membership
        cluster_ok = True
        if membership is not None:
            owned = len(self.router.mine)
            cluster_ok = membership.joined and owned > 0
            reasons["cluster"] = (f"owns {owned} of {self.slots} routing slots" if cluster_ok
                                  else "has not joined the cluster's map yet" if
                                  not membership.joined else "owns no routing slot yet")
        return db_error is None and not down and cluster_ok, reasons

    def kill_shard(self, index: int) -> None:
        """SIGKILL shard ``index`` (chaos runs and tests); it is restarted at once."""
        self._shards[index].kill()

    def shard_pids(self) -> list[int | None]:
        """The current process id of each shard (for operations and tests)."""
        return [s.process.pid if s.process else None for s in self._shards]


class SyncAllocator:
    """A blocking façade over :class:`Allocator` for code that is not async.

    The Allocator runs on an event loop in a background thread; each method
    blocks until its answer is committed. Thread-safe: many threads may claim.

        with ango.SyncAllocator(dsn) as alloc:
            code = alloc.claim(batch_id, "customer-42")
    """

    def __init__(self, dsn: str | None = None, *, shards: int | None = None,
                 data_dir: str | os.PathLike[str] | None = None) -> None:
        self._allocator = Allocator(dsn, shards=shards, data_dir=data_dir)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = None

    def __enter__(self) -> SyncAllocator:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(self) -> None:
        """Start the loop thread and the shards."""
        import threading

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="ango-allocator",
                                        daemon=True)
        self._thread.start()
        self._call(self._allocator.start())

    def _call(self, coro: Awaitable[Any]) -> Any:
        async def wrapped():
            return await coro
        return asyncio.run_coroutine_threadsafe(wrapped(), self._loop).result()

    def claim(self, batch_id: str, customer_id: str, *, client_id: str | None = None,
              request_id: str | None = None) -> str:
        """As :meth:`Allocator.claim`, blocking."""
        async def go() -> str:
            return await self._allocator.claim(batch_id, customer_id, client_id=client_id,
                                               request_id=request_id)
        return self._call(go())

    def expire(self, batch_id: str) -> bool:
        """As :meth:`Allocator.expire`, blocking."""
        return self._call(self._allocator.expire(batch_id))

    def batches(self) -> list[dict[str, Any]]:
        """As :meth:`Allocator.batches`, blocking."""
        return self._call(self._allocator.batches())

    def lookup(self, code: str) -> dict[str, Any]:
        """As :meth:`Allocator.lookup`, blocking."""
        return self._call(self._allocator.lookup(code))

    def customer_codes(self, customer_id: str, batch_id: str | None = None,
                       limit: int = 1000) -> list[dict[str, Any]]:
        """As :meth:`Allocator.customer_codes`, blocking."""
        return self._call(self._allocator.customer_codes(customer_id, batch_id, limit))

    def export(self, batch_id: str, what: str, out: Any, fmt: str = "csv") -> int:
        """As :meth:`Allocator.export`, blocking."""
        return self._call(self._allocator.export(batch_id, what, out, fmt))

    def top_up(self, source: Any, batch_id: str, client_id: str | None = None) -> int:
        """As :meth:`Allocator.top_up`, blocking."""
        return self._call(self._allocator.top_up(source, batch_id, client_id))

    def set_schedule(self, batch_id: str, starts_at: Any = None, expires_at: Any = None, *,
                     keep_start: bool = False, keep_end: bool = False) -> dict[str, Any]:
        """As :meth:`Allocator.set_schedule`, blocking."""
        return self._call(self._allocator.set_schedule(
            batch_id, starts_at, expires_at, keep_start=keep_start, keep_end=keep_end))

    def set_rules(self, batch_id: str, rules: Any) -> dict[str, Any] | None:
        """As :meth:`Allocator.set_rules`, blocking."""
        return self._call(self._allocator.set_rules(batch_id, rules))

    def delete(self, batch_id: str, purge: bool = False) -> dict[str, Any]:
        """As :meth:`Allocator.delete`, blocking."""
        return self._call(self._allocator.delete(batch_id, purge))

    def stats(self) -> dict[str, Any]:
        """As :meth:`Allocator.stats`, blocking."""
        return self._call(self._allocator.stats())

    def ready(self, timeout: float = 1.0) -> tuple[bool, dict[str, Any]]:
        """As :meth:`Allocator.ready`, blocking."""
        return self._call(self._allocator.ready(timeout))

    def close(self) -> None:
        """Stop the shards and the loop thread."""
        if self._loop is None:
            return
        try:
            self._call(self._allocator.close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()
            self._loop = None
