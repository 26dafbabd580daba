"""A shard process: leases codes into memory and issues them by group commit.

Started by the Allocator as ``python -m ango.shards.worker`` with one end of a
socket pair. Claims arrive in batches; while one group commit is in flight the
next group gathers, so the group size follows the load. PostgreSQL enforces
every invariant inside the group's statements; memory only makes the common
case fast.

This module is the loop: it receives messages, schedules groups (overlapping
up to GROUPS_IN_FLIGHT), parks and unparks claims, beats and answers. The
group commit itself is ``ango.shards.group_commit``; every query and
connection is ``ango.shards.store``.
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
from collections import deque

import msgspec
import psycopg

from ango.background import stop_task
from ango.errors import AngoError, Unavailable
from ango.logs import configure_from_env
from ango.shards import direct as direct_lib
from ango.shards import messages as m
from ango.shards.claims import Pending
from ango.shards.group_commit import MAX_ATTEMPTS, GroupCommit
from ango.shards.store import ShardConnection, ShardStore

log = logging.getLogger("ango.shard")

MAX_GROUP = 2000          # claims per group commit
GROUPS_IN_FLIGHT = 2      # group commits overlapping, each on its own connection
MIN_OVERLAP = 32          # claims waiting before a group overlaps the one in flight
HEARTBEAT_S = 1.0
STALE_S = 3.0             # an owner silent this long is dead; its leases are adopted
DB_RETRY_S = 15.0         # how long claims wait for the database to come back
#: PostgreSQL connections a shard holds for its life (see start): the control
#: connection, the heartbeat's, and one per group commit in flight.
CONNECTIONS = 2 + GROUPS_IN_FLIGHT


class Shard:
    """The state and loops of one shard process."""

    def __init__(self, dsn: str, index: int, count: int, instance: str, parts: list[int]) -> None:
        self.index = index
        self.instance = instance
        self.parts = parts
        self.owner = str(uuid.uuid4())
        self.store = ShardStore(dsn, self.owner, GROUPS_IN_FLIGHT)
        self.group_commit = GroupCommit(self.store.control, count, self.answer,
                                        ahead=self.store.beat)
        self.pending: deque[Pending] = deque()
        self.wake = asyncio.Event()
        self.results: list[m.Result] = []
        self.link: m.FramedProtocol | None = None
        self.stopping = False
        self.served = 0
        self.groups = 0
        self.group_reports: list[tuple[int, float]] = []  # (claims, seconds), sent with results
        #: Client connections handed to this shard (issue 13), and revoked token ids.
        self.direct: set[direct_lib.DirectConnection] = set()
        self.revoked: set[int] = set()
        self.direct_served = 0  # since the last Results frame

    # -- start-up and recovery -------------------------------------------------

    async def start(self) -> int:
        """Register, adopt the leases of dead owners, and load their codes."""
        await self.store.open()
        await self.store.beat.register_owner(self.instance, self.index, self.parts)
        return await self.adopt()

    async def adopt(self) -> int:
        """Take over leases of dead owners; hold their unissued codes. Returns codes gained."""
        leases = await self.store.beat.adopt_leases(self.instance, self.index, STALE_S)
        if not leases:
            return 0
        return await self.group_commit.load_leases(self.store.beat, leases)

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
        elif isinstance(message, m.ForgetSlots):
            self.group_commit.forget_slots(set(message.slots), message.slot_count)
        elif isinstance(message, m.RevokeTokens):
            direct_lib.revoke(self, message.token_ids)
        elif isinstance(message, m.Shutdown):
            self.stopping = True
            self.wake.set()

    def send(self, message: m.FromShard) -> None:
        if self.link is not None:
            self.link.send(message)

    def answer(self, p: Pending, code: str | None, error: AngoError | None = None) -> None:
        if p.direct is not None:
            p.direct.answer(p.tag, code, error)
            if error is None:
                self.served += 1
                self.direct_served += 1
        elif error is None:
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
        if self.results or self.group_reports or self.direct_served:
            self.send(m.Results(self.results, self.group_reports, self.direct_served))
            self.results = []
            self.group_reports = []
            self.direct_served = 0

    def stats(self) -> dict:
        gc = self.group_commit
        return {
            "shard": self.index, "owner": self.owner, "pid": os.getpid(),
            "partitions": self.parts, "claims_served": self.served, "groups": self.groups,
            "pending": len(self.pending), "parked": len(gc.parked),
            "codes_held": gc.pool.codes_held, "leases_held": gc.pool.leases_held,
            "customers_cached": len(gc.counters), "direct_connections": len(self.direct),
        }

    async def run(self) -> None:
        """Prepare groups one at a time; let up to GROUPS_IN_FLIGHT commit at once."""
        in_flight: set[asyncio.Task[None]] = set()
        commits = self.store.commits  # idle group-commit connections
        while True:
            # A second group overlaps the one in flight only once enough claims
            # wait for it: small groups cost PostgreSQL and us more per claim.
            if (not self.pending or not commits
                    or (in_flight and len(self.pending) < MIN_OVERLAP)):
                if self.group_commit.parked and not in_flight:
                    await asyncio.sleep(0.005)  # only waiting on other shards: do not spin
                    self.unpark()
                    continue
                if self.stopping and not self.pending and not in_flight:
                    return
                await self.wake.wait()
                self.wake.clear()
                continue
            size = min(len(self.pending), MAX_GROUP)
            if not in_flight and len(commits) > 1 and size >= 2 * MIN_OVERLAP:
                # A burst with nothing in flight: commit it as two overlapping
                # halves, so PostgreSQL and this process work at the same time.
                size //= 2
            group = [self.pending.popleft() for _ in range(size)]
            try:
                issuing, verify = await self.group_commit.prepare(group)
            except psycopg.OperationalError as exc:
                log.info("shard %s: database error, retrying: %s", self.index, exc)
                self.requeue(group)
                await self.store.control.reconnect(self.flush)
                continue
            except Exception:  # a bug must not take the codes in hand with it
                log.exception("shard %s: group failed", self.index)
                self.fail(group)
                continue
            self.flush()
            if issuing or verify:
                task = asyncio.create_task(
                    self.finish(group, issuing, verify, commits.pop()))
                in_flight.add(task)
                task.add_done_callback(self._group_done(in_flight))
            elif self.group_commit.parked and not in_flight:
                await asyncio.sleep(0.005)  # only waiting on other shards: do not spin
                self.unpark()

    def _group_done(self, in_flight: set[asyncio.Task[None]]):
        def done(task: asyncio.Task[None]) -> None:
            in_flight.discard(task)
            self.wake.set()  # the loop may be waiting for the last group to end
        return done

    async def finish(self, group: list[Pending], issuing: list[Pending],
                     verify: list[tuple[Pending, AngoError]], db: ShardConnection) -> None:
        """Commit a prepared group on its own connection, answer, and wake the loop."""
        started = time.monotonic()
        try:
            issued = await self.group_commit.commit(issuing, verify, db)
            if issuing:
                self.group_reports.append((issued, time.monotonic() - started))
        except psycopg.OperationalError as exc:
            log.info("shard %s: database error, retrying: %s", self.index, exc)
            self.requeue(group)
            await db.reconnect(self.flush)
        except Exception:
            log.exception("shard %s: group commit failed", self.index)
            self.fail(group)
        finally:
            self.store.commits.append(db)
            self.unpark()
            self.flush()
            self.groups += 1
            self.wake.set()

    def unpark(self) -> None:
        """Claims that waited for a group in flight go back to the head of the queue."""
        parked = self.group_commit.take_parked()
        for p in reversed(parked):
            p.attempts += 1
            if p.attempts > MAX_ATTEMPTS * 50:
                self.answer(p, None, Unavailable("could not serve the claim in time; retry"))
            else:
                self.pending.appendleft(p)
        if parked:
            self.wake.set()

    def fail(self, group: list[Pending]) -> None:
        """After a bug: answer the group as retryable, codes and rule slots given back.

        Whether its statement committed is unknown; PostgreSQL refuses a code or
        slot that was in fact taken, and the retry is told its recorded code.
        """
        for p in group:
            self.group_commit.put_back(p)
            self.group_commit.release_slot(p)
            self.answer(p, None, Unavailable("internal error; retry"))
        self.flush()

    def requeue(self, group: list[Pending]) -> None:
        """After a database error: back to the queue (request ids make the retry safe)."""
        now = time.monotonic()
        for p in reversed(group):
            if p.meta is not None and p.code is not None:
                self.group_commit.put_back(p)
                p.code = None
            self.group_commit.release_slot(p)
            if now - p.received > DB_RETRY_S:
                self.answer(p, None, Unavailable("database unavailable; retry"))
            else:
                self.pending.appendleft(p)
        self.flush()

    # -- liveness -----------------------------------------------------------------

    async def heartbeat(self) -> None:
        """Beat, and adopt the leases of owners that stopped beating (I3)."""
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            try:
                if not await self.store.beat.heartbeat():
                    log.error("shard %s: reaped by another process; exiting", self.index)
                    os._exit(75)
                await self.adopt()
            except psycopg.OperationalError:
                await self.store.beat.reconnect_once()

    async def close(self) -> None:
        """Clean shutdown: retire so our leases are adoptable at once."""
        try:
            await asyncio.wait_for(self.group_commit.stop_prefetching(), 5.0)
        except TimeoutError:
            pass  # its lease is recovered as any lease of a retired owner
        await self.store.close()


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
    door = direct_lib.Door(shard, socket.socket(fileno=args.door_fd)) if args.door_fd else None
    shard.send(m.Ready(shard.owner, recovered))
    beat = asyncio.create_task(shard.heartbeat())
    beat.add_done_callback(functools.partial(_heartbeat_ended, shard))
    try:
        await shard.run()
    finally:
        await stop_task(beat)
        if door is not None:
            door.close()
        for conn in list(shard.direct):  # their claims are answered: say why they close
            conn.abort(Unavailable.code, "the shard is shutting down", retryable=True)
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
    parser.add_argument("--door-fd", type=int, default=0,
                        help="the hand-off socket: client connections passed to this shard")
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
