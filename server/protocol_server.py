"""The protocol server: a raw ``asyncio.Protocol`` speaking docs/PROTOCOL.md.

Hot path, per connection: ``data_received`` cuts frames out of the bytes with a
``FrameReader`` (memoryviews, no copies), decodes each with one typed msgspec
decoder, hands claims to the allocator (which batches them to its shard
processes per event-loop pass) and appends answers to a ``FrameWriter``; all
connections with answers are written once per loop pass, so a burst of
pipelined claims costs one ``transport.write``, not one per claim.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable
from functools import partial
from typing import Any, Protocol

import msgspec

from ango import __version__
from ango.errors import (
    AngoError,
    AuthenticationFailed,
    BatchNotFound,
    InvalidInput,
    ProtocolError,
    Unavailable,
)
from ango.framing import FrameReader, FrameTooLarge, FrameWriter
from ango.importer import parse_uuid
from ango.protocol import (
    CLAIMS_ONLY,
    MAX_CUSTOMER_CODES_PER_FRAME,
    PROTOCOL_VERSION,
    Batch,
    BatchList,
    Claim,
    Code,
    CodeInfo,
    CustomerCode,
    CustomerCodeList,
    CustomerCodes,
    DeleteBatch,
    Deleted,
    Error,
    Expire,
    Expired,
    GetPartitionMap,
    GetStats,
    Hello,
    ListBatches,
    Lookup,
    PartitionMap,
    Ping,
    Pong,
    RulesSet,
    ScheduleSet,
    SetRules,
    SetSchedule,
    Stats,
    Welcome,
    decode_request,
)
from ango.shards.messages import MAX_HANDOFF_PENDING, Direct
from ango.tokens import Authenticator, Scope

from .limits import Limits
from .metrics import Metrics
from .tls import TLS_HANDSHAKE, ServerTLS

log = logging.getLogger("ango.server")
_iscoroutine = asyncio.iscoroutine
_clock = time.perf_counter  # uvloop's loop.time() has millisecond steps: too coarse for latency
PROTOCOL = "binary"  # the label of this protocol in the metrics

#: What a claim answers in ``noop`` mode.
NOOP_CODE = "NOOP"

_PAUSE_WRITE = 1  # the client does not read its responses
_PAUSE_IN_FLIGHT = 2  # max_in_flight requests unanswered
_PAUSE_AUTH = 4  # a wrong token is being answered, slowly


#: The ``partition_map`` answer of a server that is not in a cluster (noop, a stand-in).
_NO_CLUSTER: dict[str, Any] = {"version": 0, "slots": 0, "hash": "", "addresses": [],
                               "owners": []}


class AllocatorLike(Protocol):
    """What the server needs of ``ango.allocator.Allocator``.

    A cluster's Allocator also takes ``forwarded=True`` in ``claim``, sets
    ``last_claim_moved`` and answers ``partition_map()``; the server uses them
    when present.
    """

    def claim(self, batch_id: str, customer_id: str, *, client_id: str | None = None,
              request_id: str | None = None) -> Awaitable[str]: ...
    async def expire(self, batch_id: str, *, client_id: str | None = None) -> bool: ...
    async def batches(self, *, client_id: str | None = None) -> list[dict[str, Any]]: ...
    async def stats(self) -> dict[str, Any]: ...


def error_frame(request_id: int | None, exc: BaseException) -> Error:
    """The ``error`` message for ``exc`` (internal errors are not described)."""
    if isinstance(exc, AngoError):
        return Error(request_id, exc.code, str(exc), exc.retryable)
    if isinstance(exc, asyncio.CancelledError):
        return _cancelled(request_id)
    return Error(request_id, AngoError.code, "internal error", False)


def _cancelled(request_id: int) -> Error:
    return Error(request_id, Unavailable.code, "the request was cancelled; retry it", True)


def _batch(row: dict[str, Any]) -> Batch:
    created = row.get("created_at")
    return Batch(
        id=str(row["id"]),
        name=str(row["name"]),
        client_id=str(row["client_id"]),
        rules=row.get("rules"),
        expired=bool(row["expired"]),
        total=int(row["total"]),
        issued=int(row["issued"]),
        available=int(row["available"]),
        created_at=created if isinstance(created, str) else created.isoformat() if created else "",
        starts_at=row.get("starts_at"),
        expires_at=row.get("expires_at"),
    )


#: Bytes of a ``batch_list`` frame besides its batches: type, id, array header, ``next``.
_PAGE_OVERHEAD = 256
_measure = msgspec.msgpack.Encoder().encode


def batch_page(after: str | None, limit: int | None, max_frame: int, request_id: int,
               rows: list[dict[str, Any]]) -> BatchList:
    """The page of ``rows`` after the batch ``after`` that fits in a frame of ``max_frame``.

    At most ``limit`` batches; ``next`` is the last batch's id when more
    follow. A request with neither ``after`` nor ``limit`` (a client that does
    not page) gets the whole list, or InvalidInput when it does not fit.
    """
    start = 0
    if after is not None:
        start = next((i + 1 for i, row in enumerate(rows) if str(row["id"]) == after), -1)
        if start < 0:
            raise InvalidInput(f"batches: unknown cursor {after[:80]!r} (use a page's next)")
    budget = max_frame - _PAGE_OVERHEAD
    page: list[Batch] = []
    for row in rows[start:start + limit] if limit else rows[start:]:
        batch = _batch(row)
        budget -= len(_measure(batch))
        if budget < 0 and page:
            break
        page.append(batch)
    stop = start + len(page)
    if stop == len(rows):
        return BatchList(request_id, page)
    if after is None and limit is None:
        raise InvalidInput(f"batches: {len(rows)} batches do not fit in one frame; "
                           "page with after/limit (docs/PROTOCOL.md)")
    return BatchList(request_id, page, page[-1].id)


class Connection(asyncio.Protocol):
    """One client connection."""

    __slots__ = (
        "server", "transport", "peer", "authenticated", "scope", "in_flight", "last_active",
        "opened", "closing", "_reader", "_writer", "_paused", "_reading_paused",
        "_max_in_flight", "_eof", "_tls", "_sniffing", "claims_only",
    )

    def __init__(self, server: ProtocolServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.authenticated = False
        #: What the token of this connection reaches (None until authenticated).
        self.scope: Scope | None = None
        self.in_flight = 0
        self.opened = self.last_active = server.loop.time()
        self.closing = False
        max_frame = server.limits.max_frame
        # The start of a frame not yet complete (or frames not handled yet: paused).
        self._reader = FrameReader(max_frame)
        # Answers not yet written: once per loop pass, with every other connection's.
        self._writer = FrameWriter(self._write, partial(server.mark_dirty, self),
                                   max_frame=max_frame)
        self._eof = False
        self._paused = 0
        self._reading_paused = False
        self._max_in_flight = server.limits.max_in_flight
        self._tls: ServerTLS | None = None
        # The first bytes tell TLS from plain text (only when the server has a certificate).
        self._sniffing = server.tls is not None
        #: A hello that named a shard: claims only, whether handed to it or not.
        self.claims_only = False

    # --- asyncio.Protocol ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # noqa: D102
        self.transport = transport  # type: ignore[assignment]
        server = self.server
        limits = server.limits
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) else str(peer)
        server.connections.add(self)
        server.connections_accepted += 1
        server.metrics.connection_opened(PROTOCOL)
        transport.set_write_buffer_limits(high=limits.write_high_water, low=limits.write_low_water)
        if server.draining:
            self.abort(Unavailable.code, "the server is shutting down", retryable=True)
        elif len(server.connections) > limits.max_connections:
            self.abort(Unavailable.code, "too many connections", retryable=True)
        elif not server.admit_unauthenticated(self):
            self.abort(Unavailable.code, "too many connections from this address waiting for hello",
                       retryable=True)

    def connection_lost(self, exc: Exception | None) -> None:  # noqa: D102
        self.closing = True
        self.server.connections.discard(self)
        self.server.metrics.connection_closed(PROTOCOL)
        self.server.authenticated_or_gone(self)
        self._writer.clear()
        self._reader.clear()

    def data_received(self, data: bytes) -> None:  # noqa: D102
        if self.closing:
            return
        self.last_active = self.server.loop.time()
        if self._tls is not None or self._sniffing:
            data = self._decrypt(data)
            if not data:
                return
        self._reader.feed(data)
        if not self._paused:
            self._process()

    def _decrypt(self, data: bytes) -> bytes:
        """The plain text in ``data``: TLS undone, or ``data`` itself on a plain connection."""
        server = self.server
        if self._sniffing:
            self._sniffing = False
            if data[0] == TLS_HANDSHAKE:
                self._tls = ServerTLS(server.tls)
            elif server.tls_required:
                self.abort(ProtocolError.code, "this server requires TLS: connect with TLS "
                           "(the Python clients: tls=True)")
                return b""
            else:
                return data
        tls = self._tls
        try:
            plain = tls.receive(data)
        except ssl.SSLError as exc:
            log.info("TLS with %s failed: %s", self.peer, exc.reason or exc)
            self.closing = True
            self.transport.write(tls.pending())  # the alert saying why, if any
            self.transport.close()
            return b""
        handshake = tls.pending()
        if handshake:
            self.transport.write(handshake)
        if tls.closed:
            self.eof_received()
        return plain

    def eof_received(self) -> bool:  # noqa: D102
        # Half-close: answer everything received, then close.
        self._eof = True
        self.flush()
        return not self.closing

    def pause_writing(self) -> None:  # noqa: D102
        self._pause(_PAUSE_WRITE)

    def resume_writing(self) -> None:  # noqa: D102
        self._unpause(_PAUSE_WRITE)

    # --- frames ----------------------------------------------------------------

    def _process(self) -> None:
        """Handle the complete frames received, until paused or closing."""
        try:
            for payload in self._reader.frames():
                self._handle(payload)
                if self._paused or self.closing:
                    break
        except FrameTooLarge as exc:
            self.abort(ProtocolError.code, str(exc))

    def _handle(self, payload: memoryview) -> None:
        server = self.server
        server.requests += 1
        msg, error = decode_request(payload)
        if error is not None:
            if error.id is None or not self.authenticated:
                self.abort(ProtocolError.code, error.message)
            else:
                self.send(error)
            return
        kind = type(msg)
        if kind is Claim:
            if self.authenticated:
                self._claim(msg)
                return
        elif kind is Hello:
            self._hello(msg)
            return
        if not self.authenticated:
            self.abort(AuthenticationFailed.code, "the first request must be hello")
            return
        if self.claims_only:
            self.abort(ProtocolError.code, CLAIMS_ONLY.format(
                kind=kind.__struct_config__.tag))
            return
        alloc = server.allocator
        if kind is Ping:
            self.send(Pong(msg.id))
        elif kind is GetStats:
            if not self.scope.admin:
                self.send(Stats(msg.id, server.health()))
            elif alloc is None:
                self.send(Stats(msg.id, dict(server.stats(), metrics=server.metrics.summary())))
            else:
                self._call(msg.id, server.metrics.stats(), self._stats_reply)
        elif kind is GetPartitionMap:
            found = getattr(alloc, "partition_map", None)
            self.send(PartitionMap(msg.id, **(found() if found else _NO_CLUSTER)))
        elif kind is ListBatches:
            if alloc is None:
                self.send(BatchList(msg.id, []))
            else:
                page = partial(batch_page, msg.after, msg.limit, server.limits.max_frame)
                self._call(msg.id, alloc.batches(client_id=self.scope.client_id), page)
        elif kind is Expire:
            if alloc is None:
                self.send(Expired(msg.id, False))
            elif server.draining:
                self.send(Error(msg.id, Unavailable.code, "the server is shutting down", True))
            else:
                self._call(msg.id, alloc.expire(msg.batch_id, client_id=self.scope.client_id),
                           self._expired_reply)
        else:
            self._lifecycle(msg)

    def _hello(self, msg: Hello) -> None:
        server = self.server
        if self.authenticated:
            self.abort(ProtocolError.code, "hello sent twice on one connection")
            return
        if msg.version != PROTOCOL_VERSION:
            self.abort(ProtocolError.code,
                       f"unsupported protocol version {msg.version}; "
                       f"this server speaks {PROTOCOL_VERSION}")
            return
        # A correct token is welcomed at once, whatever its address sent before.
        scope = server.auth.lookup(msg.token)
        if scope is not None:
            self._welcome(msg, scope)
            return
        # Not known now: maybe a client token made a moment ago. Read nothing
        # more until the reload (rate-limited by the authenticator) says.
        self._pause(_PAUSE_AUTH)
        waiter = asyncio.ensure_future(server.auth.authenticate(msg.token))
        waiter.add_done_callback(partial(self._authenticated, msg))

    def _authenticated(self, msg: Hello, waiter: asyncio.Future[Scope | None]) -> None:
        scope = None if waiter.cancelled() or waiter.exception() else waiter.result()
        if self.closing:
            return
        if scope is not None:
            self._welcome(msg, scope)
            self._unpause(_PAUSE_AUTH)
            return
        self._refuse(msg)

    def _welcome(self, msg: Hello, scope: Scope) -> None:
        server = self.server
        self.authenticated = True
        self.scope = scope
        server.authenticated_or_gone(self)
        limits = server.limits
        alloc = server.allocator
        self.send(Welcome(msg.id, PROTOCOL_VERSION, f"ango/{__version__}", limits.max_frame,
                          limits.max_in_flight, limits.idle_timeout,
                          getattr(alloc, "shard_count", 0), getattr(alloc, "partitions", 0)))
        if msg.shard is not None:
            self.claims_only = True
            self._hand_off(msg.shard)

    def _hand_off(self, shard: int) -> None:
        """Pass this connection to shard ``shard`` of the allocator (issue 13), if it can.

        Not over TLS (the session cannot be passed), nor while anything is left
        to write: the welcome must reach the client before the shard's answers.
        Otherwise, or when the shard cannot take it, it stays here, claims only.
        """
        server = self.server
        hand_off = getattr(server.allocator, "hand_off", None)
        if hand_off is None or self._tls is not None or server.draining:
            return
        self._writer.flush()  # the welcome, before the shard writes anything
        transport = self.transport
        sock = transport.get_extra_info("socket")
        if sock is None or transport.get_write_buffer_size() or len(self._reader) > \
                MAX_HANDOFF_PENDING:
            return
        limits = server.limits
        scope = self.scope
        handoff = Direct(scope.name, scope.client_id, scope.token_id, limits.max_in_flight,
                         limits.max_frame, limits.max_connections, limits.idle_timeout,
                         self._reader.held())
        if not hand_off(shard, sock.fileno(), handoff):
            return
        if scope.token_id is not None:
            server.direct_scopes[scope.token_id] = scope
        server.handed_off += 1
        # The shard holds its own descriptor of the socket: closing ours neither
        # shuts the connection down nor says anything to the client.
        self._reader.clear()
        self.closing = True
        transport.abort()

    def _refuse(self, msg: Hello) -> None:
        server = self.server
        delay = server.auth_failed(self.peer)
        # Answer late, and read nothing more meanwhile: the connection keeps its
        # slot in its address's budget, so guessing is slow.
        self._pause(_PAUSE_AUTH)
        reason = "wrong token" if msg.token else "no token"
        server.loop.call_later(delay, self.abort, AuthenticationFailed.code, reason)

    # --- operations --------------------------------------------------------------

    def _claim(self, msg: Claim) -> None:
        server = self.server
        alloc = server.allocator
        if alloc is None:
            server.claims_served += 1
            server.metrics.observe_claim("ok", 0.0)
            self.send(Code(msg.id, NOOP_CODE))
            return
        if server.draining:
            server.metrics.observe_claim(Unavailable.code, 0.0)
            self.send(Error(msg.id, Unavailable.code, "the server is shutting down", True))
            return
        # The allocator answers with a future (batched to its shards per loop
        # pass); a coroutine would need a task, which costs more per claim.
        client_id = msg.client_id
        if self.scope.client_id is not None:
            try:
                client_id = self.scope.claim_client(msg.batch_id, client_id)
            except AngoError as exc:
                self.send(error_frame(msg.id, exc))
                return
        if msg.forwarded:  # from another instance: served here, never forwarded again
            waiter = alloc.claim(msg.batch_id, msg.customer_id, client_id=client_id,
                                 request_id=msg.request_id, forwarded=True)
        else:
            waiter = alloc.claim(
                msg.batch_id, msg.customer_id, client_id=client_id, request_id=msg.request_id)
        # Read right after the call (same loop pass): this instance does not own the slot.
        moved = getattr(alloc, "last_claim_moved", False)
        if _iscoroutine(waiter):
            waiter = server.loop.create_task(waiter)
        self._started()
        waiter.add_done_callback(partial(self._claim_done, msg.id, _clock(), moved))

    def _claim_done(self, request_id: int, started: float, moved: bool,
                    task: asyncio.Task) -> None:
        self._finished()
        metrics = self.server.metrics
        if task.cancelled():
            metrics.observe_claim(Unavailable.code, _clock() - started)
            self.send(_cancelled(request_id))
            return
        exc = task.exception()
        if exc is None:
            self.server.claims_served += 1
            metrics.observe_claim("ok", _clock() - started)
            self.send(Code(request_id, task.result(), moved))
        else:
            metrics.observe_claim(exc.code if isinstance(exc, AngoError) else AngoError.code,
                                  _clock() - started)
            self._failed(request_id, exc)

    def _call(self, request_id: int, awaitable: Any, reply: Any) -> None:
        task = asyncio.ensure_future(awaitable)
        self._started()
        task.add_done_callback(partial(self._call_done, request_id, reply))

    def _call_done(self, request_id: int, reply: Any, task: asyncio.Task) -> None:
        self._finished()
        if task.cancelled():
            self.send(_cancelled(request_id))
            return
        exc = task.exception()
        if exc is not None:
            self._failed(request_id, exc)
            return
        try:
            self.send(reply(request_id, task.result()))
        except Exception as exc:  # a result the wire cannot carry is a bug here, not the client's
            self._failed(request_id, exc)

    def _stats_reply(self, request_id: int, stats: dict[str, Any]) -> Stats:
        merged = dict(stats)
        merged["server"] = self.server.stats()
        return Stats(request_id, merged)

    @staticmethod
    def _expired_reply(request_id: int, changed: bool) -> Expired:
        return Expired(request_id, bool(changed))

    # --- the life of a batch and of a code (issue 14) ------------------------------

    def _lifecycle(self, msg: msgspec.Struct) -> None:
        """Look-ups and batch changes: each one library call of the allocator."""
        alloc = self.server.allocator
        if alloc is None:
            self.send(Error(msg.id, AngoError.code, "not available in noop mode", False))
            return
        kind = type(msg)
        if not self.scope.admin:
            # Look-ups span every client's batches, and the changes are the
            # operator's: a client token gets what a batch it cannot see gets.
            if kind in (Lookup, CustomerCodes):
                self.send(Error(msg.id, AuthenticationFailed.code,
                                "look-ups need the admin token", False))
            else:
                try:  # worded as for a batch that does not exist
                    missing: AngoError = BatchNotFound(
                        f"no batch with id {parse_uuid(msg.batch_id, 'batch id')}")
                except AngoError as exc:
                    missing = exc
                self.send(error_frame(msg.id, missing))
            return
        if kind is Lookup:
            self._call(msg.id, alloc.lookup(msg.code), self._code_info_reply)
        elif kind is CustomerCodes:
            if not 1 <= msg.limit <= MAX_CUSTOMER_CODES_PER_FRAME:
                self.send(Error(msg.id, InvalidInput.code,
                                f"limit must be between 1 and {MAX_CUSTOMER_CODES_PER_FRAME}",
                                False))
                return
            self._call(msg.id, alloc.customer_codes(msg.customer_id, msg.batch_id, msg.limit),
                       self._customer_codes_reply)
        elif self.server.draining:  # changes are refused while shutting down, as expire is
            self.send(Error(msg.id, Unavailable.code, "the server is shutting down", True))
        elif kind is SetRules:
            self._call(msg.id, alloc.set_rules(msg.batch_id, msg.rules), self._rules_reply)
        elif kind is SetSchedule:
            keep_start, keep_end = msg.starts_at is msgspec.UNSET, msg.expires_at is msgspec.UNSET
            self._call(msg.id, alloc.set_schedule(
                msg.batch_id, None if keep_start else msg.starts_at,
                None if keep_end else msg.expires_at, keep_start=keep_start, keep_end=keep_end),
                self._schedule_reply)
        elif kind is DeleteBatch:
            self._call(msg.id, alloc.delete(msg.batch_id, msg.purge), self._deleted_reply)

    @staticmethod
    def _code_info_reply(request_id: int, info: dict[str, Any]) -> CodeInfo:
        return CodeInfo(request_id, **info)

    @staticmethod
    def _rules_reply(request_id: int, rules: dict[str, Any] | None) -> RulesSet:
        return RulesSet(request_id, rules)

    @staticmethod
    def _schedule_reply(request_id: int, schedule: dict[str, Any]) -> ScheduleSet:
        return ScheduleSet(request_id, **schedule)

    @staticmethod
    def _deleted_reply(request_id: int, result: dict[str, Any]) -> Deleted:
        return Deleted(request_id, **result)

    @staticmethod
    def _customer_codes_reply(request_id: int, rows: list[dict[str, Any]]) -> CustomerCodeList:
        return CustomerCodeList(request_id, [CustomerCode(**row) for row in rows])

    def _failed(self, request_id: int, exc: BaseException) -> None:
        if not isinstance(exc, AngoError):
            log.error("request %s from %s failed", request_id, self.peer, exc_info=exc)
        self.send(error_frame(request_id, exc))

    def _started(self) -> None:
        self.in_flight += 1
        self.server.in_flight += 1
        if self.in_flight >= self._max_in_flight:
            self._pause(_PAUSE_IN_FLIGHT)

    def _finished(self) -> None:
        self.in_flight -= 1
        server = self.server
        server.in_flight -= 1
        if self._paused & _PAUSE_IN_FLIGHT and self.in_flight < self._max_in_flight:
            self._unpause(_PAUSE_IN_FLIGHT)
        if server.in_flight == 0 and server.draining:
            server.idle.set()

    # --- output and flow control ---------------------------------------------------

    def send(self, msg: msgspec.Struct) -> None:
        """Queue ``msg``; it is written with everything else of this loop pass."""
        if self.closing:
            return
        try:
            self._writer.append(msg)
        except FrameTooLarge:
            # A peer must never meet a frame above the limit it was told: say so instead.
            log.error("answer %s to %s does not fit in a frame", type(msg).__name__, self.peer)
            self._writer.append(Error(msg.id, AngoError.code,
                                      "the answer does not fit in a frame", False))

    def flush(self) -> None:
        """Write what is queued (called once per loop pass by the server)."""
        if self.closing:
            return
        self._writer.flush()
        if self._eof and not self.in_flight and not self._paused:  # a partial frame never completes
            self.closing = True
            self.transport.close()  # after what is buffered has been written

    def _write(self, frames: bytearray) -> None:
        self.transport.write(frames if self._tls is None else self._tls.wrap(frames))

    def abort(self, code: str, message: str, *, retryable: bool = False) -> None:
        """Send an ``error`` frame with a nil id, then close the connection."""
        if self.closing:
            return
        log.debug("closing connection from %s: %s", self.peer, message)
        tls = self._tls
        if tls is None or tls.ready:  # mid-handshake, there is no way to say why
            self._writer.append(Error(None, code, message, retryable))
            self.flush()
        self.closing = True
        if tls is not None:
            self.transport.write(tls.close_notify())
        self.transport.close()

    def _pause(self, reason: int) -> None:
        self._paused |= reason
        if not self._reading_paused and not self.closing:
            self._reading_paused = True
            self.transport.pause_reading()

    def _unpause(self, reason: int) -> None:
        self._paused &= ~reason
        if not self._paused and self._reading_paused and not self.closing:
            # Not from inside the transport's callbacks: resume on the next pass.
            self.server.loop.call_soon(self._resume)

    def _resume(self) -> None:
        if self._paused or self.closing or not self._reading_paused:
            return
        if self._reader:
            self._process()
            if self._paused or self.closing:
                return
        self._reading_paused = False
        if self._eof:
            self.flush()  # closes when everything received has been answered
        else:
            self.transport.resume_reading()


class ProtocolServer:
    """Serves an allocator over TCP; ``allocator=None`` is the ``noop`` mode.

    In ``noop`` mode every claim is answered with the constant ``NOOP`` code
    without touching shards or PostgreSQL: the transport's ceiling.
    """

    def __init__(self, allocator: AllocatorLike | None, *, token: str,
                 limits: Limits | None = None, metrics: Metrics | None = None,
                 authenticator: Authenticator | None = None,
                 tls: ssl.SSLContext | None = None, tls_required: bool = True) -> None:
        if not token:
            raise ValueError("a token is required")
        self.allocator = allocator
        self.metrics = metrics or Metrics(allocator)
        # Client tokens live in the allocator's database; without one, only the admin token.
        self._own_auth = authenticator is None
        self.auth = authenticator or Authenticator(token, getattr(allocator, "dsn", None))
        self.limits = limits or Limits()
        #: Server-side TLS context (``tls.server_context``); None: plain text only.
        self.tls = tls
        #: With a context: refuse plain-text connections (else accept both).
        self.tls_required = tls is not None and tls_required
        self.loop = asyncio.get_running_loop()
        self.connections: set[Connection] = set()
        self.connections_accepted = 0
        self.requests = 0
        self.claims_served = 0
        self.in_flight = 0
        #: Connections passed to a shard (issue 13), and the client tokens among them
        #: (by token id), so that revoking one closes its connections there too.
        self.handed_off = 0
        self.direct_scopes: dict[int, Scope] = {}
        self.draining = False
        self.idle = asyncio.Event()
        self.started = time.time()
        self._server: asyncio.Server | None = None
        self._dirty: list[Connection] = []
        # Per address: (wrong tokens in a row, the time of the last), oldest first.
        self._auth_failures: dict[str, tuple[int, float]] = {}
        # Connections without a good hello yet, oldest first, and how many per address.
        self._unauthenticated: dict[Connection, None] = {}
        self._unauthenticated_from: dict[str, int] = {}
        self._sweeper: asyncio.TimerHandle | None = None

    @property
    def noop(self) -> bool:
        """True when claims are answered without an allocator."""
        return self.allocator is None

    async def start(self, host: str = "127.0.0.1", port: int = 7878) -> tuple[str, int]:
        """Start listening; return the address bound (``port=0`` picks a free port)."""
        if self._own_auth:
            await self.auth.start()
        self._server = await self.loop.create_server(
            lambda: Connection(self), host, port, backlog=1024, reuse_address=True)
        self._schedule_sweep()
        return self._server.sockets[0].getsockname()[:2]

    @property
    def port(self) -> int:
        """The port listened on."""
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    def mark_dirty(self, conn: Connection) -> None:
        """Have ``conn`` written at the end of this loop pass."""
        if not self._dirty:
            self.loop.call_soon(self._flush)
        self._dirty.append(conn)

    def _flush(self) -> None:
        dirty, self._dirty = self._dirty, []
        for conn in dirty:
            conn.flush()

    def health(self) -> dict[str, Any]:
        """What ``stats`` tells a client token: whether the server is up, no counters
        (they would tell one client of the others' traffic)."""
        return {
            "protocol_version": PROTOCOL_VERSION,
            "noop": self.noop,
            "draining": self.draining,
            "uptime_s": round(time.time() - self.started, 3),
        }

    def stats(self) -> dict[str, Any]:
        """The server's own counters."""
        return {
            "protocol_version": PROTOCOL_VERSION,
            "noop": self.noop,
            "connections": len(self.connections),
            "connections_accepted": self.connections_accepted,
            "unauthenticated": len(self._unauthenticated),
            "requests": self.requests,
            "claims_served": self.claims_served,
            "handed_off": self.handed_off,
            "in_flight": self.in_flight,
            "draining": self.draining,
            "uptime_s": round(time.time() - self.started, 3),
        }

    # --- connections not yet authenticated ------------------------------------------

    def admit_unauthenticated(self, conn: Connection) -> bool:
        """Count a new connection against the budget of those without a good hello.

        False when its address already has its share waiting. When the server-wide
        budget is full, the oldest waiting connection is closed to make room: a
        flood of silent connections then churns itself, and a client that sends
        its ``hello`` promptly is served (until then it holds only a small slot).
        """
        limits = self.limits
        address = conn.peer
        waiting = self._unauthenticated_from.get(address, 0)
        if waiting >= limits.max_unauthenticated_per_address:
            return False
        if len(self._unauthenticated) >= limits.max_unauthenticated:
            oldest = next(iter(self._unauthenticated))
            self.authenticated_or_gone(oldest)
            oldest.abort(Unavailable.code, "too many connections waiting for hello",
                         retryable=True)
        self._unauthenticated[conn] = None
        self._unauthenticated_from[address] = waiting + 1
        return True

    def authenticated_or_gone(self, conn: Connection) -> None:
        """``conn`` no longer counts against the unauthenticated budget (idempotent)."""
        if conn not in self._unauthenticated:
            return
        del self._unauthenticated[conn]
        address = conn.peer
        left = self._unauthenticated_from[address] - 1
        if left:
            self._unauthenticated_from[address] = left
        else:
            del self._unauthenticated_from[address]

    # --- failed tokens -------------------------------------------------------------

    def auth_failed(self, address: str) -> float:
        """Count a wrong token from ``address``; return how long to wait before answering.

        The wait grows with the wrong tokens the address sent lately; the count
        is forgotten ``auth_failure_window`` seconds after the last one.
        """
        self.metrics.auth_failed(PROTOCOL, address)  # counted, and logged rate-limited
        limits = self.limits
        now = self.loop.time()
        count, last = self._auth_failures.pop(address, (0, now))
        if now - last > limits.auth_failure_window:
            count = 0
        failures = self._auth_failures
        failures[address] = (count + 1, now)  # moved to the end: the most recent
        if len(failures) > limits.max_auth_failure_addresses:
            del failures[next(iter(failures))]
        return min(limits.auth_failure_max_delay, limits.auth_failure_delay * (count + 1))

    def auth_failures(self, address: str) -> int:
        """Wrong tokens ``address`` sent lately (counted towards its delay)."""
        count, last = self._auth_failures.get(address, (0, 0.0))
        return count if self.loop.time() - last <= self.limits.auth_failure_window else 0

    # --- timeouts ----------------------------------------------------------------

    def _schedule_sweep(self) -> None:
        limits = self.limits
        every = max(0.05, min(1.0, limits.idle_timeout / 4, limits.handshake_timeout / 4))
        self._sweeper = self.loop.call_later(every, self._sweep)

    def _sweep(self) -> None:
        now = self.loop.time()
        limits = self.limits
        opened_before = now - limits.handshake_timeout
        for conn in list(self._unauthenticated):  # oldest first
            if conn.opened > opened_before:
                break
            if not conn._paused & _PAUSE_AUTH:  # a wrong token is closed by its own timer
                conn.abort(AuthenticationFailed.code, "no hello in time")
        is_live = self.auth.is_live
        revoked = [tid for tid, scope in self.direct_scopes.items() if not is_live(scope)]
        if revoked:
            for tid in revoked:
                del self.direct_scopes[tid]
            self.allocator.revoke_tokens(revoked)
        for conn in list(self.connections):
            if conn.closing or not conn.authenticated:
                continue
            if not is_live(conn.scope):
                conn.abort(AuthenticationFailed.code, "the token was revoked")
            elif conn.in_flight == 0 and now - conn.last_active > limits.idle_timeout:
                conn.abort(Unavailable.code, "idle timeout", retryable=True)
        horizon = now - limits.auth_failure_window
        failures = self._auth_failures
        while failures:  # oldest first: stop at the first one still counting
            address = next(iter(failures))
            if failures[address][1] > horizon:
                break
            del failures[address]
        self._schedule_sweep()

    # --- shutdown ----------------------------------------------------------------

    async def shutdown(self) -> None:
        """Stop accepting, answer the requests in flight, then close every connection.

        Requests arriving meanwhile are answered ``unavailable`` (retryable), so
        clients retry them against the next server.
        """
        self.draining = True
        if self._server is not None:
            self._server.close()
        if self.in_flight:
            self.idle.clear()
            try:
                await asyncio.wait_for(self.idle.wait(), self.limits.shutdown_grace)
            except TimeoutError:
                log.warning("shutdown: %d requests still in flight after %.0f s",
                            self.in_flight, self.limits.shutdown_grace)
        self._flush()
        for conn in list(self.connections):
            conn.abort(Unavailable.code, "the server is shutting down", retryable=True)
        # Closing transports flush their buffers first; give slow readers a moment.
        for _ in range(100):
            if not self.connections:
                break
            await asyncio.sleep(0.01)
        for conn in list(self.connections):
            conn.transport.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._own_auth:
            await self.auth.close()
        if self._server is not None:
            await self._server.wait_closed()
