"""Client connections handed to a shard process (issue 13): claims with no server hop.

The protocol server authenticates a connection whose ``hello`` names a shard,
then passes its socket to that shard process (SCM_RIGHTS on the shard's
hand-off socket, ``Door``) with the token's scope. The shard reads claim frames
on it, checks them as ``Allocator.claim`` does (``claim_fields``, and the
scope's ``claim_client``), queues them with the claims from the Allocator and
writes each answer itself. Anything but a claim closes the connection with a
``protocol`` error. Bounded: at most ``max_in_flight`` claims of a connection
at once (then it is not read), ``max_connections`` direct connections a shard.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import TYPE_CHECKING

import msgspec

from ango.allocator import claim_fields
from ango.errors import AngoError, AuthenticationFailed, ProtocolError, Unavailable
from ango.framing import FrameReader, FrameTooLarge, FrameWriter
from ango.protocol import CLAIMS_ONLY, Claim, Code, Error, decode_request
from ango.shards import messages as m
from ango.shards.claims import Pending
from ango.tokens import Scope

if TYPE_CHECKING:
    from ango.shards.worker import Shard

log = logging.getLogger("ango.shard")

_PAUSE_IN_FLIGHT = 1
_PAUSE_WRITE = 2
#: Token ids remembered as revoked, so a hand-off that crosses its revocation is refused.
MAX_REVOKED = 100_000
#: Seconds between two looks for idle direct connections.
SWEEP_EVERY_S = 0.25
#: Write buffer bounds of a direct connection (as the protocol server's defaults).
WRITE_HIGH_WATER = 1024 * 1024
WRITE_LOW_WATER = 256 * 1024


class DirectConnection(asyncio.Protocol):
    """One client connection handed to this shard: claims in, codes and errors out."""

    def __init__(self, shard: Shard, handoff: m.Direct) -> None:
        self.shard = shard
        self.scope = Scope(handoff.scope_name, handoff.client_id, handoff.token_id)
        self.max_in_flight = handoff.max_in_flight
        self.idle_timeout = handoff.idle_timeout
        self.in_flight = 0
        self.closing = False
        self.last_active = time.monotonic()
        self.transport: asyncio.Transport | None = None
        self._handoff = handoff
        self._reader = FrameReader(handoff.max_frame)
        self._writer = FrameWriter(self._write, self._schedule, max_frame=handoff.max_frame)
        self._paused = 0

    # --- asyncio.Protocol ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # noqa: D102
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)
        shard = self.shard
        shard.direct.add(self)
        handoff = self._handoff
        if handoff.token_id is not None and handoff.token_id in shard.revoked:
            self.abort(AuthenticationFailed.code, "the token was revoked")
        elif len(shard.direct) > handoff.max_connections:
            self.abort(Unavailable.code, f"shard {shard.index} has too many direct "
                       "connections; use a connection without shard", retryable=True)
        elif handoff.pending:
            self.data_received(handoff.pending)

    def connection_lost(self, exc: Exception | None) -> None:  # noqa: D102
        self.closing = True
        self.shard.direct.discard(self)
        self._reader.clear()
        self._writer.clear()

    def data_received(self, data: bytes) -> None:  # noqa: D102
        if self.closing:
            return
        self.last_active = time.monotonic()
        self._reader.feed(data)
        if not self._paused:
            self._process()

    def pause_writing(self) -> None:  # noqa: D102
        self._pause(_PAUSE_WRITE)

    def resume_writing(self) -> None:  # noqa: D102
        self._unpause(_PAUSE_WRITE)

    # --- claims in ---------------------------------------------------------------

    def _process(self) -> None:
        queued = False
        try:
            for payload in self._reader.frames():
                queued |= self._handle(payload)
                if self._paused or self.closing:
                    break
        except FrameTooLarge as exc:
            self.abort(ProtocolError.code, str(exc))
        if queued:
            self.shard.wake.set()

    def _handle(self, payload: memoryview) -> bool:
        """Queue one claim frame (True), or answer why not (False)."""
        msg, error = decode_request(payload)
        if error is not None:
            if error.id is None:
                self.abort(error.code, error.message)
            else:
                self.send(error)
            return False
        if type(msg) is not Claim:
            self.abort(ProtocolError.code,
                       CLAIMS_ONLY.format(kind=type(msg).__struct_config__.tag))
            return False
        if self.shard.stopping:
            self.send(Error(msg.id, Unavailable.code, "the shard is shutting down", True))
            return False
        try:
            client = msg.client_id
            if self.scope.client_id is not None:
                client = self.scope.claim_client(msg.batch_id, client)
            bid, customer, client, request = claim_fields(
                msg.batch_id, msg.customer_id, client, msg.request_id)
        except AngoError as exc:
            self.send(Error(msg.id, exc.code, str(exc), exc.retryable))
            return False
        claim = Pending(msg.id, bid, customer, client, request, time.monotonic())
        claim.direct = self
        self.shard.pending.append(claim)
        self.in_flight += 1
        if self.in_flight >= self.max_in_flight:
            self._pause(_PAUSE_IN_FLIGHT)
        return True

    # --- answers out ---------------------------------------------------------------

    def answer(self, request_id: int, code: str | None, error: AngoError | None) -> None:
        """The outcome of one of this connection's claims."""
        self.in_flight -= 1
        if error is None:
            self.send(Code(request_id, code))
        else:
            self.send(Error(request_id, error.code, str(error), error.retryable))
        if self._paused & _PAUSE_IN_FLIGHT and self.in_flight < self.max_in_flight:
            self._unpause(_PAUSE_IN_FLIGHT)

    def send(self, msg: msgspec.Struct) -> None:
        """Queue ``msg``; it is written with the others of this loop pass."""
        if not self.closing:
            self._writer.append(msg)

    def _schedule(self) -> None:
        asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Write what is queued."""
        if not self.closing:
            self._writer.flush()

    def _write(self, frames: bytearray) -> None:
        self.transport.write(frames)

    def abort(self, code: str, message: str, *, retryable: bool = False) -> None:
        """Send an ``error`` frame with a nil id, then close the connection."""
        if self.closing:
            return
        log.debug("shard %s: closing a direct connection: %s", self.shard.index, message)
        self._writer.append(Error(None, code, message, retryable))
        self.flush()
        self.closing = True
        self.transport.close()  # after what is buffered has been written

    def _pause(self, reason: int) -> None:
        if not self._paused and not self.closing:
            self.transport.pause_reading()
        self._paused |= reason

    def _unpause(self, reason: int) -> None:
        was = self._paused
        self._paused &= ~reason
        if was and not self._paused and not self.closing:
            # Not from inside the transport's callbacks: resume on the next pass.
            asyncio.get_running_loop().call_soon(self._resume)

    def _resume(self) -> None:
        if self._paused or self.closing:
            return
        if self._reader:
            self._process()
            if self._paused or self.closing:
                return
        self.transport.resume_reading()


class Door:
    """The shard's end of its hand-off socket: client sockets arrive here with their scope."""

    def __init__(self, shard: Shard, sock: socket.socket) -> None:
        self.shard = shard
        self.sock = sock
        self.decoder = msgspec.msgpack.Decoder(m.Direct)
        self.loop = asyncio.get_running_loop()
        sock.setblocking(False)
        self.loop.add_reader(sock.fileno(), self._readable)
        self._sweeper = self.loop.call_later(SWEEP_EVERY_S, self._sweep)

    def close(self) -> None:
        """Take no more connections."""
        self._sweeper.cancel()
        if self.sock.fileno() >= 0:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()

    def _sweep(self) -> None:
        """Close the direct connections idle (nothing in flight) beyond their idle timeout."""
        self._sweeper = self.loop.call_later(SWEEP_EVERY_S, self._sweep)
        now = time.monotonic()
        for conn in list(self.shard.direct):
            if conn.in_flight == 0 and now - conn.last_active > conn.idle_timeout:
                conn.abort(Unavailable.code, "idle timeout", retryable=True)

    def _readable(self) -> None:
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(self.sock, m.MAX_HANDOFF, 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.error("shard %s: hand-off socket failed: %s", self.shard.index, exc)
                self.close()
                return
            if not data and not fds:
                self.close()  # the server is gone
                return
            if not fds:
                continue
            conn = socket.socket(fileno=fds[0])
            for extra in fds[1:]:
                socket.socket(fileno=extra).close()
            try:
                handoff = self.decoder.decode(data)
            except msgspec.DecodeError as exc:
                log.error("shard %s: bad hand-off: %s", self.shard.index, exc)
                conn.close()
                continue
            self.adopt(conn, handoff)

    def adopt(self, conn: socket.socket, handoff: m.Direct) -> None:
        """Serve ``conn`` here from now on."""
        task = asyncio.ensure_future(self.loop.connect_accepted_socket(
            lambda: DirectConnection(self.shard, handoff), conn))
        task.add_done_callback(lambda t: self._adopted(t, conn))

    def _adopted(self, task: asyncio.Future, conn: socket.socket) -> None:
        if task.cancelled() or task.exception() is not None:
            log.error("shard %s: could not take a connection: %r", self.shard.index,
                      None if task.cancelled() else task.exception())
            conn.close()


def revoke(shard: Shard, token_ids: list[int]) -> None:
    """Close the direct connections of these (revoked) client tokens, now and when handed later."""
    if len(shard.revoked) + len(token_ids) > MAX_REVOKED:
        shard.revoked.clear()
    shard.revoked.update(token_ids)
    for conn in list(shard.direct):
        if conn.scope.token_id in shard.revoked:
            conn.abort(AuthenticationFailed.code, "the token was revoked")
