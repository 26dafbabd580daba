"""The Allocator's side of its shard processes: start, link, ping, restart.

Each shard is a separate process joined by a socket pair. Claims for a shard
gather in an outbox and go out as one frame per event-loop pass. When a shard
dies, it is restarted at once; the new process adopts the dead one's leases
(I3) and the claims that were in flight are sent again with the same request
ids, so a claim that did commit is answered with its code, never a second one.

A shard that hangs (stopped, stuck) does not exit, so the supervisor also asks:
it pings each shard and kills one that stops answering, which turns a hang into
a death handled as above. Every claim handed to a shard has a deadline, after
which it is answered ``Unavailable`` (retry with the same request id) whatever
the shard is doing. A killed shard may have had commits in flight; PostgreSQL
arbitrates them (its successor adopts its leases; retries find the records).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from ango.errors import Unavailable, error_from_code
from ango.shards import messages as m
from ango.tally import GROUP_SIZE_BUCKETS, SECONDS_BUCKETS, Tally

log = logging.getLogger("ango.supervisor")
_encode = msgspec.msgpack.Encoder().encode

READY_TIMEOUT_S = 60.0
MAX_RESENDS = 3
MAX_IN_FLIGHT = 100_000
#: Connections beside the shards': the database watch's, the cluster
#: membership's and the token reloader's (held by ``ango serve``), and one for a
#: call such as ``expire`` or ``batches`` (start-up's are closed before shards start).
ALLOCATOR_CONNECTIONS = 4


def connections_per_shard() -> int:
    """PostgreSQL connections one shard process holds (counted by the worker itself)."""
    # Imported here: `python -m ango.shards.worker` imports this module (through
    # `ango`) before running the worker, which must not be imported twice.
    from ango.shards.worker import CONNECTIONS

    return CONNECTIONS


def connections_needed(shards: int) -> int:
    """PostgreSQL connections an Allocator with ``shards`` shard processes holds."""
    return shards * connections_per_shard() + ALLOCATOR_CONNECTIONS


@dataclass(frozen=True)
class Deadlines:
    """How soon a hung shard is found, and how long a claim may wait for its shard.

    ``ping_every``: seconds between pings. ``ping_deadline``: a shard with no
    answer to a ping for this long is killed and restarted. ``claim_deadline``:
    a claim unanswered this long is answered ``Unavailable`` (it may still
    commit; a retry with its request id then gets that code).
    """

    ping_every: float = 0.5
    ping_deadline: float = 3.0
    claim_deadline: float = 10.0

    def __post_init__(self) -> None:
        if not 0 < self.ping_every < self.ping_deadline:
            raise ValueError("deadlines need 0 < ping_every < ping_deadline")
        if self.claim_deadline <= 0:
            raise ValueError("claim_deadline must be positive")


#: Secrets of the server a shard does not need: it gets its DSN as ANGO_SHARD_DSN.
#: (libpq's PGPASSWORD/PGPASSFILE stay: the DSN may rely on them.)
SERVER_SECRETS = ("ANGO_TOKEN", "ANGO_TOKEN_FILE", "ANGO_DSN", "ANGO_DSN_FILE", "DATABASE_URL",
                  "ANGO_TLS_KEY")


def shard_environment(dsn: str) -> dict[str, str]:
    """The environment of a shard process: the server's, less its secrets, plus the DSN."""
    env = {k: v for k, v in os.environ.items() if k not in SERVER_SECRETS}
    env["ANGO_SHARD_DSN"] = dsn
    return env


class ShardHandle:
    """One shard slot: its current process, link, and the claims in flight to it."""

    def __init__(self, index: int, count: int, instance: str, parts: list[int], dsn: str,
                 on_stats: Callable[[m.StatsReply], None],
                 deadlines: Deadlines = Deadlines()) -> None:
        self.index = index
        self.count = count
        self.instance = instance
        self.parts = parts
        self.dsn = dsn
        self.on_stats = on_stats
        self.deadlines = deadlines
        self.process: asyncio.subprocess.Process | None = None
        self.link: m.FramedProtocol | None = None
        self.ready: asyncio.Future[m.Ready] | None = None
        self.alive = False
        self.closing = False
        self.restarts = 0
        self.owner: str | None = None
        # tag -> (future, claim, times sent, deadline); in submission order, so
        # deadlines only grow along it (resends keep their place and deadline).
        self.in_flight: dict[int, tuple[asyncio.Future[str], m.Claim, int, float]] = {}
        self.outbox: list[m.Claim] = []
        self.flush_scheduled = False
        self.decoder = msgspec.msgpack.Decoder(m.FromShard)
        self.watcher: asyncio.Task[None] | None = None
        #: The parent's end of the hand-off socket (client connections, issue 13).
        self.door: socket.socket | None = None
        self.pinger: asyncio.Task[None] | None = None
        self.last_pong = 0.0
        self.pings = 0
        self.hangs = 0
        # Counted here, from the frames received, so they survive the process:
        # a restarted shard starts its own counters from zero.
        self.served = 0
        self.refused = 0
        self.group_sizes = Tally(GROUP_SIZE_BUCKETS)
        self.group_seconds = Tally(SECONDS_BUCKETS)

    async def start(self) -> None:
        """Start the process and wait until it has recovered its leases."""
        loop = asyncio.get_running_loop()
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # Records, each one message with the socket it hands over (SCM_RIGHTS).
        door, child_door = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = shard_environment(self.dsn)
        try:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "ango.shards.worker",
                "--fd", str(child_sock.fileno()), "--index", str(self.index),
                "--count", str(self.count), "--instance", self.instance,
                "--parts", ",".join(map(str, self.parts)), "--door-fd", str(child_door.fileno()),
                pass_fds=(child_sock.fileno(), child_door.fileno()), env=env,
                stdin=asyncio.subprocess.DEVNULL,
            )
        except BaseException:
            door.close()
            raise
        finally:
            child_sock.close()
            child_door.close()
        door.setblocking(False)
        if self.door is not None:
            self.door.close()
        self.door = door
        self.ready = loop.create_future()
        _, self.link = await loop.create_unix_connection(
            lambda: m.FramedProtocol(self.decoder, self._receive, self._lost), sock=parent_sock)
        try:
            ready = await asyncio.wait_for(asyncio.shield(self.ready), READY_TIMEOUT_S)
        except (TimeoutError, ConnectionError) as exc:
            self.kill()  # not process.kill(): it raises once the process has exited and been reaped
            raise Unavailable(
                f"shard {self.index} did not start: {exc or 'no answer'} (each shard holds "
                f"{connections_per_shard()} PostgreSQL connections; {self.count} shard(s) and the "
                f"Allocator need {connections_needed(self.count)})") from None
        self.owner = ready.owner
        self.alive = True
        self.last_pong = time.monotonic()
        if self.watcher is None:
            self.watcher = asyncio.create_task(self._watch())
        if self.pinger is None:
            self.pinger = asyncio.create_task(self._ask())
        self._resend()

    def _receive(self, message: m.FromShard) -> None:
        if isinstance(message, m.Results):
            in_flight = self.in_flight
            served = 0
            for r in message.results:
                entry = in_flight.pop(r.tag, None)
                if entry is None or entry[0].done():
                    continue
                if r.error is None:
                    served += 1
                    entry[0].set_result(r.code)
                else:
                    self.refused += 1
                    entry[0].set_exception(error_from_code(r.error, r.message or r.error))
            self.served += served + message.direct
            for size, seconds in message.groups:
                self.group_sizes.observe(size)
                self.group_seconds.observe(seconds)
        elif isinstance(message, m.Ready):
            if self.ready is not None and not self.ready.done():
                self.ready.set_result(message)
        elif isinstance(message, m.Pong):
            self.last_pong = time.monotonic()
        elif isinstance(message, m.StatsReply):
            self.on_stats(message)
        elif isinstance(message, m.StartFailed):
            if self.ready is not None and not self.ready.done():
                self.ready.set_exception(ConnectionError(message.reason))

    def _lost(self, exc: Exception | None) -> None:
        self.alive = False
        if self.ready is not None and not self.ready.done():
            self.ready.set_exception(ConnectionError("shard exited during start-up"))

    async def _watch(self) -> None:
        """Restart the process whenever it dies, until the Allocator closes."""
        while True:
            process = self.process
            code = await process.wait()
            self.alive = False
            if self.closing:
                return
            self.restarts += 1
            log.warning("shard %s (pid %s) exited with %s; restarting", self.index,
                        process.pid, code,
                        extra={"event": "shard_died", "shard": self.index, "exit": code})
            died = asyncio.get_running_loop().time()
            while not self.closing:
                try:
                    await self.start()
                    log.info("shard %s back (pid %s) after %.1f s; %d claims sent again",
                             self.index, self.process.pid,
                             asyncio.get_running_loop().time() - died, len(self.in_flight),
                             extra={"event": "shard_restarted", "shard": self.index})
                    break
                except Exception as exc:  # keep trying: claims wait with their futures
                    log.error("shard %s restart failed: %s", self.index, exc)
                    self._fail_all(Unavailable(f"shard {self.index} is restarting; retry"))
                    await asyncio.sleep(1.0)

    async def _ask(self) -> None:
        """Ping the shard; kill it when it stops answering; expire overdue claims."""
        every = self.deadlines.ping_every
        while not self.closing:
            await asyncio.sleep(every)
            try:
                self._ask_once(time.monotonic())
            except Exception:  # this task is the claims' deadline: it must not die
                log.exception("shard %s: ping and deadline check failed", self.index)

    def _ask_once(self, now: float) -> None:
        self._expire_claims(now)
        if not self.alive:
            return  # starting or restarting: start() has its own deadline
        silent = now - self.last_pong
        if silent > self.deadlines.ping_deadline:
            self.hangs += 1
            log.warning("shard %s (pid %s) has not answered a ping for %.1f s; "
                        "killing it to restart it", self.index, self.process.pid, silent)
            self.alive = False  # nothing more goes to it; _watch restarts it
            self.kill()
            return
        self.pings += 1
        self.link.send(m.Ping(self.pings))

    def _expire_claims(self, now: float) -> None:
        """Answer ``Unavailable`` to the claims past their deadline (oldest first)."""
        overdue = []
        for tag, entry in self.in_flight.items():
            if entry[3] > now:
                break
            overdue.append(tag)
        if not overdue:
            return
        message = (f"shard {self.index} did not answer within "
                   f"{self.deadlines.claim_deadline:g} s; retry with the same request id")
        for tag in overdue:
            future = self.in_flight.pop(tag)[0]
            if not future.done():
                future.set_exception(Unavailable(message))

    def _resend(self) -> None:
        """After a restart, send again what the dead process had not answered."""
        again = []
        for tag, (future, claim, sends, deadline) in list(self.in_flight.items()):
            if sends >= MAX_RESENDS:
                del self.in_flight[tag]
                if not future.done():
                    future.set_exception(Unavailable("shard kept failing; retry"))
            else:
                self.in_flight[tag] = (future, claim, sends + 1, deadline)
                again.append(claim)
        self.outbox = again  # every claim of the old outbox is in flight too
        if self.outbox:
            self._schedule()

    def submit(self, claim: m.Claim, future: asyncio.Future[str]) -> None:
        """Queue a claim; it goes out with the others of this loop pass."""
        if len(self.in_flight) >= MAX_IN_FLIGHT:
            future.set_exception(Unavailable(f"shard {self.index} is overloaded; retry"))
            return
        self.in_flight[claim.tag] = (future, claim, 1,
                                     time.monotonic() + self.deadlines.claim_deadline)
        self.outbox.append(claim)
        if not self.flush_scheduled:
            self._schedule()

    def _schedule(self) -> None:
        self.flush_scheduled = True
        asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self.flush_scheduled = False
        if not self.alive or not self.outbox:
            return  # sent after the restart
        claims, self.outbox = self.outbox, []
        self.link.send(m.Claims(claims))

    def hand_off(self, fd: int, handoff: m.Direct) -> bool:
        """Pass a client connection's socket to the shard; False when it cannot take it now."""
        if not self.alive or self.door is None:
            return False
        try:
            socket.send_fds(self.door, [_encode(handoff)], [fd])
        except OSError:  # full (BlockingIOError) or gone: the server keeps the connection
            return False
        return True

    def revoke_tokens(self, token_ids: list[int]) -> None:
        """Have the shard close the direct connections of these revoked tokens."""
        if self.alive:
            self.link.send(m.RevokeTokens(token_ids))

    def request_stats(self, tag_id: int) -> None:
        """Ask for counters; the reply goes to ``on_stats``."""
        if self.alive:
            self.link.send(m.StatsRequest(tag_id))

    def forget_slots(self, slots: list[int], slot_count: int) -> None:
        """Have the shard drop the counters of these routing slots (moved away)."""
        if self.alive:
            self.link.send(m.ForgetSlots(slots, slot_count))

    def kill(self) -> None:
        """SIGKILL the current process (tests and chaos runs)."""
        if self.process is not None and self.process.returncode is None:
            self.process.kill()

    def _fail_all(self, error: Exception) -> None:
        for future, *_ in self.in_flight.values():
            if not future.done():
                future.set_exception(error)
        self.in_flight.clear()
        self.outbox.clear()

    async def stop(self, timeout: float = 15.0) -> None:
        """Let the shard finish its claims and exit; kill it if it does not."""
        self.closing = True
        if self.alive:
            self._flush()
            self.link.send(m.Shutdown())
        else:
            # Starting or restarting: no claim was sent to this process yet (they
            # go out once it is ready), so there is nothing to drain; what it has
            # adopted is adopted again by the next owner, as after any death.
            self.kill()
        if self.process is not None:
            try:
                await asyncio.wait_for(self.process.wait(), timeout)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        for task in (self.watcher, self.pinger):
            if task is not None:
                task.cancel()
        self._fail_all(Unavailable("allocator closed"))
        if self.door is not None:
            self.door.close()
            self.door = None
