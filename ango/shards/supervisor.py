"""The Allocator's side of its shard processes: start, link, restart on death.

Each shard is a separate process joined by a socket pair. Claims for a shard
gather in an outbox and go out as one frame per event-loop pass. When a shard
dies, it is restarted at once; the new process adopts the dead one's leases
(I3) and the claims that were in flight are sent again with the same request
ids, so a claim that did commit is answered with its code, never a second one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
from collections.abc import Callable

import msgspec

from ango.errors import Unavailable, error_from_code
from ango.shards import messages as m

log = logging.getLogger("ango.supervisor")

READY_TIMEOUT_S = 60.0
MAX_RESENDS = 3
MAX_IN_FLIGHT = 100_000


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
                 on_stats: Callable[[m.StatsReply], None]) -> None:
        self.index = index
        self.count = count
        self.instance = instance
        self.parts = parts
        self.dsn = dsn
        self.on_stats = on_stats
        self.process: asyncio.subprocess.Process | None = None
        self.link: m.FramedProtocol | None = None
        self.ready: asyncio.Future[m.Ready] | None = None
        self.alive = False
        self.closing = False
        self.restarts = 0
        self.owner: str | None = None
        self.in_flight: dict[int, tuple[asyncio.Future[str], m.Claim, int]] = {}
        self.outbox: list[m.Claim] = []
        self.flush_scheduled = False
        self.encoder = msgspec.msgpack.Encoder()
        self.decoder = msgspec.msgpack.Decoder(m.FromShard)
        self.watcher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start the process and wait until it has recovered its leases."""
        loop = asyncio.get_running_loop()
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = shard_environment(self.dsn)
        try:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "ango.shards.worker",
                "--fd", str(child_sock.fileno()), "--index", str(self.index),
                "--count", str(self.count), "--instance", self.instance,
                "--parts", ",".join(map(str, self.parts)),
                pass_fds=(child_sock.fileno(),), env=env, stdin=asyncio.subprocess.DEVNULL,
            )
        finally:
            child_sock.close()
        self.ready = loop.create_future()
        _, self.link = await loop.create_unix_connection(
            lambda: m.FramedProtocol(self.decoder, self._receive, self._lost), sock=parent_sock)
        try:
            ready = await asyncio.wait_for(asyncio.shield(self.ready), READY_TIMEOUT_S)
        except (TimeoutError, ConnectionError) as exc:
            self.process.kill()
            raise Unavailable(f"shard {self.index} did not start: {exc}") from None
        self.owner = ready.owner
        self.alive = True
        if self.watcher is None:
            self.watcher = asyncio.create_task(self._watch())
        self._resend()

    def _receive(self, message: m.FromShard) -> None:
        if isinstance(message, m.Results):
            in_flight = self.in_flight
            for r in message.results:
                entry = in_flight.pop(r.tag, None)
                if entry is None or entry[0].done():
                    continue
                if r.error is None:
                    entry[0].set_result(r.code)
                else:
                    entry[0].set_exception(error_from_code(r.error, r.message or r.error))
        elif isinstance(message, m.Ready):
            if self.ready is not None and not self.ready.done():
                self.ready.set_result(message)
        elif isinstance(message, m.StatsReply):
            self.on_stats(message)

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
                        process.pid, code)
            while not self.closing:
                try:
                    await self.start()
                    break
                except Exception as exc:  # keep trying: claims wait with their futures
                    log.error("shard %s restart failed: %s", self.index, exc)
                    self._fail_all(Unavailable(f"shard {self.index} is restarting; retry"))
                    await asyncio.sleep(1.0)

    def _resend(self) -> None:
        """After a restart, send again what the dead process had not answered."""
        again = []
        for tag, (future, claim, sends) in list(self.in_flight.items()):
            if sends >= MAX_RESENDS:
                del self.in_flight[tag]
                if not future.done():
                    future.set_exception(Unavailable("shard kept failing; retry"))
            else:
                self.in_flight[tag] = (future, claim, sends + 1)
                again.append(claim)
        self.outbox = again  # every claim of the old outbox is in flight too
        if self.outbox:
            self._schedule()

    def submit(self, claim: m.Claim, future: asyncio.Future[str]) -> None:
        """Queue a claim; it goes out with the others of this loop pass."""
        if len(self.in_flight) >= MAX_IN_FLIGHT:
            future.set_exception(Unavailable(f"shard {self.index} is overloaded; retry"))
            return
        self.in_flight[claim.tag] = (future, claim, 1)
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
        self.link.send(m.Claims(claims), self.encoder)

    def request_stats(self, tag_id: int) -> None:
        """Ask for counters; the reply goes to ``on_stats``."""
        if self.alive:
            self.link.send(m.StatsRequest(tag_id), self.encoder)

    def kill(self) -> None:
        """SIGKILL the current process (tests and chaos runs)."""
        if self.process is not None and self.process.returncode is None:
            self.process.kill()

    def _fail_all(self, error: Exception) -> None:
        for future, _, _ in self.in_flight.values():
            if not future.done():
                future.set_exception(error)
        self.in_flight.clear()
        self.outbox.clear()

    async def stop(self, timeout: float = 15.0) -> None:
        """Let the shard finish its claims and exit; kill it if it does not."""
        self.closing = True
        if self.alive:
            self._flush()
            self.link.send(m.Shutdown(), self.encoder)
        if self.process is not None:
            try:
                await asyncio.wait_for(self.process.wait(), timeout)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        if self.watcher is not None:
            self.watcher.cancel()
        self._fail_all(Unavailable("allocator closed"))
