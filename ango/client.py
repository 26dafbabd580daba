"""Clients of ``ango serve``: :class:`Client` (blocking) and :class:`AsyncClient` (asyncio).

Both speak docs/PROTOCOL.md, raise the same ``ango.errors`` classes as the
embedded allocator, reconnect after a dropped connection and retry retryable
failures (``Unavailable``, a lost connection, no answer yet) with backoff until
``timeout`` seconds have passed. A claim is retried with the same request id —
the caller's, or one generated per call — so a retry never yields a second code.
Every exception a claim raises carries that id as ``request_id``: a claim that
timed out may still commit, and re-sending that id later returns its code.

A frame from the server that is over the limit or undecodable makes the client
drop the connection and treat what was pending as lost (retried, never a
definitive answer). With ``wait_for_server=False`` a server that refuses the
very first connection fails at once (:class:`ServerUnreachable`) instead of
being waited for until ``timeout`` (which suits a server still starting).
"""

from __future__ import annotations

import asyncio
import collections
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import msgspec

from ango.errors import (
    AngoError,
    AuthenticationFailed,
    ConfigurationError,
    InvalidInput,
    ProtocolError,
    Unavailable,
    error_from_code,
)
from ango.framing import FrameReader, FrameTooLarge, FrameWriter
from ango.protocol import (
    MAX_FRAME,
    PROTOCOL_VERSION,
    BatchList,
    Claim,
    Code,
    CodeInfo,
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
    RulesSet,
    ScheduleSet,
    SetRules,
    SetSchedule,
    Stats,
    Welcome,
    response_decoder,
)

if TYPE_CHECKING:
    from ango.cluster.client_routes import ClaimRoutes, SyncClaimRoutes

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7878
_FIRST_BACKOFF = 0.02
_MAX_BACKOFF = 1.0
_NAME = "ango-python"
#: Batches asked for per ``batches`` page (the server may send fewer: a page fits a frame).
_PAGE = 1000
#: The largest frame accepted whatever ``max_frame`` a server announces: memory stays bounded.
_FRAME_CEILING = 16 * 1024 * 1024


class _ConnectionLost(Exception):
    """The connection broke before the answer came; the request may be retried."""


class ServerUnreachable(Unavailable):
    """The server refused the first connection: nothing listens there (retryable later)."""


def new_request_id() -> str:
    """A fresh random request id: 32 hex digits, like a uuid4's hex."""
    return os.urandom(16).hex()


def _token(token: str | None, data_dir: str | None) -> tuple[str, str]:
    """The token and where it came from; ConfigurationError naming every place looked at."""
    if token:
        return token, "the token given"
    if os.environ.get("ANGO_TOKEN"):
        return os.environ["ANGO_TOKEN"], "ANGO_TOKEN"
    from ango.config import read_secret
    from ango.tokens import token_path

    if os.environ.get("ANGO_TOKEN_FILE"):
        explicit = os.environ["ANGO_TOKEN_FILE"]
        found = read_secret(explicit, "token file")
        if not found:
            raise ConfigurationError(f"no token: the file {explicit} (ANGO_TOKEN_FILE) is empty")
        return found, f"ANGO_TOKEN_FILE {explicit}"

    path = token_path(data_dir)
    try:
        found = path.read_text().strip()
    except FileNotFoundError:
        raise ConfigurationError(f"no token: none given, ANGO_TOKEN is not set and {path} "
                                 "does not exist") from None
    except OSError as exc:
        raise ConfigurationError(f"no token: none given, ANGO_TOKEN is not set and {path} "
                                 f"cannot be read: {exc.strerror or exc}") from None
    if not found:
        raise ConfigurationError(f"no token: none given, ANGO_TOKEN is not set and {path} "
                                 "is empty")
    return found, str(path)


def _refused(exc: AngoError, source: str) -> AngoError:
    """A server's ``unauthorized`` answer, saying which token it refused."""
    if isinstance(exc, AuthenticationFailed):
        return AuthenticationFailed(f"{exc} (the token from {source})")
    return exc


def _unreachable(exc: OSError, host: str, port: int) -> ServerUnreachable | None:
    """ServerUnreachable when ``exc`` says nothing listens at host:port (known at once)."""
    if isinstance(exc, ConnectionRefusedError):
        return ServerUnreachable(f"cannot connect to {host}:{port}: connection refused "
                                 "(is `ango serve` running there?)")
    return None


def _too_large(exc: FrameTooLarge) -> _ConnectionLost:
    return _ConnectionLost(f"the server sent a frame of {exc.size} bytes, over the limit of "
                           f"{exc.max_frame}")


def _accepted_frame(announced: int) -> int:
    return max(1, min(announced, _FRAME_CEILING))


#: What a payload that is not a valid response raises while decoding.
_UNDECODABLE = (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError)


def _undecodable(exc: Exception) -> _ConnectionLost:
    return _ConnectionLost(f"the server sent an undecodable frame: {exc}")


def tls_context(tls: bool | ssl.SSLContext | None) -> ssl.SSLContext | None:
    """The client context for ``tls``: True verifies the server against the system's
    certificate authorities and its host name; a context is used as it is."""
    if isinstance(tls, ssl.SSLContext):
        return tls
    return ssl.create_default_context() if tls else None


def _tls_failed(host: str, port: int, exc: ssl.SSLError) -> AngoError | None:
    """A clear, final error for a TLS failure that retrying cannot mend (None: retry)."""
    if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
        return None  # the connection dropped: as retryable as any other
    if isinstance(exc, ssl.SSLCertVerificationError):
        detail = f"certificate verify failed: {exc.verify_message}"
    else:
        detail = f"{exc.reason or exc} (does the server speak TLS?)"
    return ProtocolError(f"TLS with {host}:{port} failed: {detail}")


def _send(writer: FrameWriter, msg: msgspec.Struct) -> None:
    try:
        writer.append(msg)
    except FrameTooLarge as exc:
        raise InvalidInput("request larger than the server's maximum frame of "
                           f"{exc.max_frame} bytes") from None


def _set_max_frame(reader: FrameReader, writer: FrameWriter, max_frame: int) -> None:
    """The largest frame either way: the server's, once its ``welcome`` said it."""
    reader.max_frame = writer.max_frame = max_frame


def _failure(resp: Error) -> AngoError:
    return error_from_code(resp.code, resp.message)


def _unexpected(resp: Any) -> ProtocolError:
    return ProtocolError(f"unexpected answer from the server: {type(resp).__name__}")


def _add_page(resp: BatchList, into: list[dict[str, Any]], seen: set[str]) -> str | None:
    """Append a ``batch_list`` page to ``into``; return the next page's cursor (None: done)."""
    into.extend(msgspec.structs.asdict(b) for b in resp.batches)
    cursor = resp.next
    if cursor is not None:
        if cursor in seen or not resp.batches:
            raise ProtocolError("the server's batch_list pages do not advance")
        seen.add(cursor)
    return cursor


def _fields(resp: msgspec.Struct) -> dict[str, Any]:
    """An answer's fields but its id, as a dict."""
    info = msgspec.structs.asdict(resp)
    del info["id"]
    return info


def _customer_codes(resp: CustomerCodeList) -> list[dict[str, Any]]:
    return [msgspec.structs.asdict(c) for c in resp.codes]


def _set_schedule(batch_id: str, starts_at: Any, expires_at: Any
                  ) -> Callable[[int], SetSchedule]:
    """The request; ``KEEP`` (the default) leaves a field out, so it keeps its value."""
    return lambda i: SetSchedule(i, batch_id, msgspec.UNSET if starts_at is KEEP else starts_at,
                                 msgspec.UNSET if expires_at is KEEP else expires_at)


#: Passed to ``set_schedule`` for a field that keeps its value.
KEEP: Any = msgspec.UNSET


class Client:
    """A blocking client over one connection; safe to share between threads (calls take turns).

    ``token`` defaults to ``ANGO_TOKEN``, else the token file in the data
    directory. ``timeout`` bounds every call, retries included. ``tls=True``
    speaks TLS and verifies the server's certificate and name (system CAs); an
    ``ssl.SSLContext`` is used as given (e.g. ``ssl.create_default_context(cafile=...)``).
    ``wait_for_server=False``: a refused first connection raises
    ServerUnreachable at once rather than being retried until ``timeout``.
    ``cluster=True``: send each claim straight to the instance owning its
    routing slot (see ango.cluster.client_routes); other calls go to ``host:port``.
    ``direct=True`` (with ``cluster``): straight to the owning shard process of
    that instance, over one direct connection per shard (docs/PROTOCOL.md).
    """

    def __init__(self, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, token: str | None = None,
                 timeout: float = 5.0, *, data_dir: str | None = None,
                 tls: bool | ssl.SSLContext | None = None,
                 wait_for_server: bool = True, cluster: bool = False, direct: bool = False,
                 shard: int | None = None) -> None:
        self._routes: SyncClaimRoutes | None = None
        #: The shard named in the hello (a direct connection: claims only), or None.
        self._shard = shard
        #: (shards, partitions) of the instance, from its welcome ((0, 0): unknown).
        self.layout = (0, 0)
        self.host = host
        self.port = port
        self.timeout = timeout
        self._token, self._token_source = _token(token, data_dir)
        self._tls = tls_context(tls)
        self._sock: socket.socket | None = None
        self._reader = FrameReader(MAX_FRAME)
        self._writer = FrameWriter(self._sendall, None, max_frame=MAX_FRAME)
        self._next_id = 0
        self._lock = threading.Lock()
        self._closed = False
        self._fail_refused = not wait_for_server  # until a connection succeeded
        with self._lock:
            self._retrying(lambda: None, time.monotonic() + timeout)
        if cluster:
            from ango.cluster.client_routes import SyncClaimRoutes

            self._routes = SyncClaimRoutes(self, direct)
            self._routes.refresh()

    # --- public API ----------------------------------------------------------------

    def claim(self, batch_id: str, customer_id: str, *, client_id: str | None = None,
              request_id: str | None = None) -> str:
        """A code of ``batch_id`` for ``customer_id``, committed before it is returned.

        Any AngoError raised has ``request_id`` set to the id sent (``request_id``
        or the one generated): after Unavailable the claim may still commit, and
        claiming again with that id returns its code.
        """
        rid = request_id or new_request_id()
        try:
            routes = self._routes
            if routes is not None:
                code = routes.claim(batch_id, customer_id, client_id, rid)
                if code is not None:
                    return code
            resp = self._request(lambda i: Claim(i, batch_id, customer_id, client_id, rid), Code)
        except AngoError as exc:
            exc.request_id = rid
            raise
        if resp.moved and routes is not None:
            routes.stale()
        return resp.code

    def partition_map(self) -> dict[str, Any]:
        """Which instance owns each routing slot (``partition_map_reply`` in docs/PROTOCOL.md)."""
        return _fields(self._request(GetPartitionMap, PartitionMap))

    def batches(self) -> list[dict[str, Any]]:
        """Every batch with its counts, as dicts (fields as in docs/PROTOCOL.md), page by page."""
        out: list[dict[str, Any]] = []
        seen: set[str] = set()
        cursor = None
        while True:
            page = self._request(lambda i, after=cursor: ListBatches(i, after, _PAGE), BatchList)
            cursor = _add_page(page, out, seen)
            if cursor is None:
                return out

    def expire(self, batch_id: str) -> bool:
        """Expire ``batch_id``; False if it already was (also after a retry that had done it)."""
        return self._request(lambda i: Expire(i, batch_id), Expired).changed

    def stats(self) -> dict[str, Any]:
        """Health and counters of the server and its allocator."""
        return self._request(GetStats, Stats).stats

    def lookup(self, code: str) -> dict[str, Any]:
        """Who has ``code`` (fields as ``code_info`` in docs/PROTOCOL.md)."""
        return _fields(self._request(lambda i: Lookup(i, code), CodeInfo))

    def customer_codes(self, customer_id: str, batch_id: str | None = None,
                       limit: int = 50) -> list[dict[str, Any]]:
        """The codes ``customer_id`` received, newest first (at most 50 per call)."""
        return _customer_codes(self._request(
            lambda i: CustomerCodes(i, customer_id, batch_id, limit), CustomerCodeList))

    def set_rules(self, batch_id: str, rules: dict[str, Any] | None) -> dict[str, Any] | None:
        """Replace the batch's rules; returns them as now in force."""
        return self._request(lambda i: SetRules(i, batch_id, rules), RulesSet).rules

    def set_schedule(self, batch_id: str, starts_at: str | None = KEEP,
                     expires_at: str | None = KEEP) -> dict[str, Any]:
        """Change the batch's start and/or end (ISO 8601; None clears; KEEP keeps)."""
        return _fields(self._request(_set_schedule(batch_id, starts_at, expires_at),
                                     ScheduleSet))

    def delete(self, batch_id: str, purge: bool = False) -> dict[str, Any]:
        """Delete an expired batch's unissued codes (``purge``: every trace of it)."""
        return _fields(self._request(lambda i: DeleteBatch(i, batch_id, purge), Deleted))

    def close(self) -> None:
        """Close the connection; the client cannot be used afterwards."""
        self._closed = True
        if self._routes is not None:
            self._routes.close()
        self._drop()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals -------------------------------------------------------------------

    def _request(self, build: Callable[[int], msgspec.Struct], expect: type) -> Any:
        with self._lock:
            resp = self._retrying(lambda: self._round_trip(build), time.monotonic() + self.timeout)
        if type(resp) is not expect:
            raise _unexpected(resp)
        return resp

    def _retrying(self, attempt: Callable[[], Any], deadline: float) -> Any:
        delay = _FIRST_BACKOFF
        while True:
            if self._closed:
                raise AngoError("the client is closed")
            try:
                if self._sock is None:
                    self._connect(deadline)
                return attempt()
            except (OSError, _ConnectionLost, Unavailable) as exc:
                if not isinstance(exc, Unavailable):
                    self._drop()
                if isinstance(exc, OSError) and self._fail_refused:
                    unreachable = _unreachable(exc, self.host, self.port)
                    if unreachable is not None:
                        raise unreachable from None
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    if isinstance(exc, Unavailable):
                        raise
                    raise Unavailable(f"no answer from {self.host}:{self.port} within "
                                      f"{self.timeout} s: {exc or type(exc).__name__}") from exc
                time.sleep(min(delay, remaining))
                delay = min(delay * 2, _MAX_BACKOFF)

    def _connect(self, deadline: float) -> None:
        wait = max(0.001, deadline - time.monotonic())
        sock = socket.create_connection((self.host, self.port), timeout=wait)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._tls is not None:
            try:
                sock = self._tls.wrap_socket(sock, server_hostname=self.host)
            except ssl.SSLError as exc:
                sock.close()
                raise _tls_failed(self.host, self.port, exc) or exc from None
            except OSError:
                sock.close()
                raise
        self._sock = sock
        self._reader.clear()
        self._writer.clear()
        _set_max_frame(self._reader, self._writer, MAX_FRAME)
        self._next_id = 0
        self._fail_refused = False  # it listens: later refusals are a restart, retried
        try:
            resp = self._round_trip(
                lambda i: Hello(i, PROTOCOL_VERSION, self._token, _NAME, self._shard), deadline)
            if type(resp) is not Welcome:
                raise _unexpected(resp)
        except AuthenticationFailed as exc:
            self._drop()
            raise _refused(exc, self._token_source) from None
        except BaseException:
            self._drop()
            raise
        _set_max_frame(self._reader, self._writer, _accepted_frame(resp.max_frame))
        self.layout = (resp.shards, resp.partitions)

    def _round_trip(self, build: Callable[[int], msgspec.Struct],
                    deadline: float | None = None) -> Any:
        assert self._sock is not None
        self._next_id += 1
        rid = self._next_id
        _send(self._writer, build(rid))
        resp = self._receive(rid, deadline or time.monotonic() + self.timeout)
        if type(resp) is Error:
            raise _failure(resp)
        return resp

    def _sendall(self, frames: bytearray) -> None:
        assert self._sock is not None
        self._sock.sendall(frames)

    def _receive(self, rid: int, deadline: float) -> Any:
        sock = self._sock
        assert sock is not None
        reader = self._reader
        while True:
            try:
                for payload in reader.frames():
                    try:
                        resp = response_decoder.decode(payload)
                    except _UNDECODABLE as exc:
                        raise _undecodable(exc) from None
                    if resp.id == rid:
                        return resp
                    if resp.id is None:  # the server is closing the connection, saying why
                        exc = _failure(resp)
                        if exc.retryable:
                            raise _ConnectionLost(str(exc))
                        raise exc
                    # else: the late answer of a request that timed out; drop it
            except FrameTooLarge as exc:  # the stream cannot be trusted any more: reconnect
                raise _too_large(exc) from None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no answer in time")
            sock.settimeout(remaining)
            data = sock.recv(256 * 1024)
            if not data:
                raise _ConnectionLost("the server closed the connection")
            reader.feed(data)

    def _drop(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None


class _Connection(asyncio.Protocol):
    """One pipelined connection of an :class:`AsyncClient`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self.loop = loop
        self.timeout = timeout
        self.transport: asyncio.Transport | None = None
        self.pending: dict[int, asyncio.Future] = {}
        self.deadlines: collections.deque[tuple[float, int]] = collections.deque()
        self.next_id = 0
        self.closed = False
        self.reason: BaseException = _ConnectionLost("the connection was lost")
        self.reader = FrameReader(MAX_FRAME)
        # Requests go out together, once per loop pass.
        self.writer = FrameWriter(self._write, partial(loop.call_soon, self._flush),
                                  max_frame=MAX_FRAME)
        self._sweeper: asyncio.TimerHandle | None = None
        self._sweep_every = min(0.25, max(0.01, timeout / 10))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # noqa: D102
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:  # noqa: D102
        self._fail_all()

    def data_received(self, data: bytes) -> None:  # noqa: D102
        reader = self.reader
        reader.feed(data)
        pending = self.pending
        try:
            for payload in reader.frames():
                try:
                    resp = response_decoder.decode(payload)
                except _UNDECODABLE as exc:
                    self._lose(_undecodable(exc))
                    return
                fut = pending.pop(resp.id, None)
                if fut is not None:
                    if not fut.done():
                        fut.set_result(resp)
                elif resp.id is None:  # the server is closing the connection, saying why
                    err = _failure(resp)
                    self.reason = _ConnectionLost(str(err)) if err.retryable else err
        except FrameTooLarge as exc:  # what was pending is lost, and retried
            self._lose(_too_large(exc))

    def _lose(self, reason: _ConnectionLost) -> None:
        self.reason = reason
        self.reader.clear()
        self.close()

    def request(self, msg: msgspec.Struct, deadline: float) -> asyncio.Future:
        """Queue ``msg`` (its id already set by :meth:`new_id`); the future gets the answer."""
        if self.closed:
            raise self.reason
        fut = self.loop.create_future()
        _send(self.writer, msg)
        self.pending[msg.id] = fut
        self.deadlines.append((deadline, msg.id))
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(self._sweep_every, self._sweep)
        return fut

    def new_id(self) -> int:
        """A request id unused on this connection."""
        self.next_id += 1
        return self.next_id

    def _flush(self) -> None:
        if not self.closed:
            self.writer.flush()

    def _write(self, frames: bytearray) -> None:
        self.transport.write(frames)

    def _sweep(self) -> None:
        self._sweeper = None
        now = self.loop.time()
        deadlines = self.deadlines
        pending = self.pending
        while deadlines and deadlines[0][0] <= now:
            _, rid = deadlines.popleft()
            fut = pending.pop(rid, None)
            if fut is not None and not fut.done():
                fut.set_exception(TimeoutError("no answer in time"))
        while deadlines and deadlines[0][1] not in pending:
            deadlines.popleft()
        if deadlines and not self.closed:
            self._sweeper = self.loop.call_later(self._sweep_every, self._sweep)

    def _fail_all(self) -> None:
        self.closed = True
        pending, self.pending = self.pending, {}
        self.deadlines.clear()
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(self.reason)
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    def close(self) -> None:
        """Close the transport and fail what is pending."""
        self._flush()
        if self.transport is not None:
            self.transport.close()
        self._fail_all()


class AsyncClient:
    """An asyncio client; concurrent calls are pipelined over one connection.

    Create it with ``await AsyncClient.connect(...)`` (or ``async with await
    AsyncClient.connect(...) as client``). ``token`` defaults to ``ANGO_TOKEN``,
    else the token file in the data directory; ``timeout`` bounds every call,
    retries included; ``tls`` as for :class:`Client`. ``cluster=True``: learn
    which instance of a cluster owns each routing slot and send each claim
    straight to it (see ango.cluster.client_routes); other calls go to
    ``host:port``. ``direct=True`` (with ``cluster``): straight to the owning
    shard process of that instance, over one direct connection per shard
    (docs/PROTOCOL.md), the instance's connection when that fails.
    """

    def __init__(self, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, token: str | None = None,
                 timeout: float = 5.0, *, data_dir: str | None = None,
                 tls: bool | ssl.SSLContext | None = None,
                 wait_for_server: bool = True, cluster: bool = False, direct: bool = False,
                 shard: int | None = None) -> None:
        self._routes: ClaimRoutes | None = None
        #: The shard named in the hello (a direct connection: claims only), or None.
        self._shard = shard
        #: (shards, partitions) of the instance, from its welcome ((0, 0): unknown).
        self.layout = (0, 0)
        self.host = host
        self.port = port
        self.timeout = timeout
        self._token, self._token_source = _token(token, data_dir)
        self._tls = tls_context(tls)
        self._conn: _Connection | None = None
        self._connecting: asyncio.Future | None = None
        self._closed = False
        self._fail_refused = not wait_for_server  # until a connection succeeded
        if cluster:
            from ango.cluster.client_routes import ClaimRoutes

            self._routes = ClaimRoutes(self, direct)

    @classmethod
    async def connect(cls, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                      token: str | None = None, timeout: float = 5.0, *,
                      data_dir: str | None = None,
                      tls: bool | ssl.SSLContext | None = None,
                      wait_for_server: bool = True, cluster: bool = False,
                      direct: bool = False) -> AsyncClient:
        """A connected client (the handshake done, retried until ``timeout``); with
        ``cluster``, the partition map fetched too."""
        client = cls(host, port, token, timeout, data_dir=data_dir, tls=tls,
                     wait_for_server=wait_for_server, cluster=cluster, direct=direct)
        loop = asyncio.get_running_loop()
        await client._connection(loop.time() + timeout)
        if client._routes is not None:
            await client._routes.refresh()
        return client

    # --- public API ----------------------------------------------------------------

    async def claim(self, batch_id: str, customer_id: str, *, client_id: str | None = None,
                    request_id: str | None = None) -> str:
        """A code of ``batch_id`` for ``customer_id``, committed before it is returned.

        Any AngoError raised has ``request_id`` set to the id sent (``request_id``
        or the one generated): after Unavailable the claim may still commit, and
        claiming again with that id returns its code.
        """
        rid = request_id or new_request_id()
        try:
            routes = self._routes
            if routes is not None:
                code = await routes.claim(batch_id, customer_id, client_id, rid)
                if code is not None:
                    return code
            conn = self._conn
            if conn is not None and not conn.closed:  # the hot path: no closure, no retry loop
                loop = conn.loop
                deadline = loop.time() + self.timeout
                try:
                    resp = await conn.request(
                        Claim(conn.new_id(), batch_id, customer_id, client_id, rid), deadline)
                except TimeoutError:
                    raise Unavailable(f"no answer from {self.host}:{self.port} within "
                                      f"{self.timeout} s") from None
                except (_ConnectionLost, OSError):
                    pass  # retried below, with the same request id
                else:
                    if type(resp) is Code:
                        if resp.moved and routes is not None:
                            routes.stale()
                        return resp.code
                    if type(resp) is not Error:
                        raise _unexpected(resp)
                    exc = _failure(resp)
                    if not exc.retryable:
                        raise exc
            resp = await self._request(lambda i: Claim(i, batch_id, customer_id, client_id, rid),
                                       Code)
            return resp.code
        except AngoError as exc:
            exc.request_id = rid
            raise

    async def partition_map(self) -> dict[str, Any]:
        """Which instance owns each routing slot (``partition_map_reply`` in docs/PROTOCOL.md)."""
        return _fields(await self._request(GetPartitionMap, PartitionMap))

    async def batches(self) -> list[dict[str, Any]]:
        """Every batch with its counts, as dicts (fields as in docs/PROTOCOL.md), page by page."""
        out: list[dict[str, Any]] = []
        seen: set[str] = set()
        cursor = None
        while True:
            page = await self._request(lambda i, after=cursor: ListBatches(i, after, _PAGE),
                                       BatchList)
            cursor = _add_page(page, out, seen)
            if cursor is None:
                return out

    async def expire(self, batch_id: str) -> bool:
        """Expire ``batch_id``; False if it already was (also after a retry that had done it)."""
        return (await self._request(lambda i: Expire(i, batch_id), Expired)).changed

    async def stats(self) -> dict[str, Any]:
        """Health and counters of the server and its allocator."""
        return (await self._request(GetStats, Stats)).stats

    async def lookup(self, code: str) -> dict[str, Any]:
        """Who has ``code`` (fields as ``code_info`` in docs/PROTOCOL.md)."""
        return _fields(await self._request(lambda i: Lookup(i, code), CodeInfo))

    async def customer_codes(self, customer_id: str, batch_id: str | None = None,
                             limit: int = 50) -> list[dict[str, Any]]:
        """The codes ``customer_id`` received, newest first (at most 50 per call)."""
        return _customer_codes(await self._request(
            lambda i: CustomerCodes(i, customer_id, batch_id, limit), CustomerCodeList))

    async def set_rules(self, batch_id: str, rules: dict[str, Any] | None
                        ) -> dict[str, Any] | None:
        """Replace the batch's rules; returns them as now in force."""
        return (await self._request(lambda i: SetRules(i, batch_id, rules), RulesSet)).rules

    async def set_schedule(self, batch_id: str, starts_at: str | None = KEEP,
                           expires_at: str | None = KEEP) -> dict[str, Any]:
        """Change the batch's start and/or end (ISO 8601; None clears; KEEP keeps)."""
        return _fields(await self._request(_set_schedule(batch_id, starts_at, expires_at),
                                           ScheduleSet))

    async def delete(self, batch_id: str, purge: bool = False) -> dict[str, Any]:
        """Delete an expired batch's unissued codes (``purge``: every trace of it)."""
        return _fields(await self._request(lambda i: DeleteBatch(i, batch_id, purge), Deleted))

    async def close(self) -> None:
        """Close the connection; the client cannot be used afterwards."""
        self._closed = True
        if self._routes is not None:
            await self._routes.close()
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- internals -------------------------------------------------------------------

    async def _request(self, build: Callable[[int], msgspec.Struct], expect: type) -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        delay = _FIRST_BACKOFF
        while True:
            if self._closed:
                raise AngoError("the client is closed")
            try:
                resp = await self._send_once(build, deadline)
                if type(resp) is expect:
                    return resp
                if type(resp) is Error:
                    raise _failure(resp)
                raise _unexpected(resp)
            except ServerUnreachable:
                raise
            except (_ConnectionLost, Unavailable, OSError) as exc:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    if isinstance(exc, Unavailable):
                        raise
                    raise Unavailable(f"no answer from {self.host}:{self.port} within "
                                      f"{self.timeout} s: {exc or type(exc).__name__}") from exc
                await asyncio.sleep(min(delay, remaining))
                delay = min(delay * 2, _MAX_BACKOFF)

    async def _send_once(self, build: Callable[[int], msgspec.Struct], deadline: float) -> Any:
        """One request on the connection (opened if need be) and its answer, whatever it
        is; no retry (``_request`` retries; cluster routing falls back another way)."""
        conn = self._conn
        if conn is None or conn.closed:
            conn = await self._connection(deadline)
        return await conn.request(build(conn.new_id()), deadline)

    async def _connection(self, deadline: float) -> _Connection:
        """The open connection, opening one (shared by concurrent callers) if needed."""
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open(deadline))
            self._connecting.add_done_callback(self._connected)
        return await asyncio.shield(self._connecting)

    def _connected(self, fut: asyncio.Future) -> None:
        self._connecting = None
        if not fut.cancelled() and fut.exception() is None:
            self._conn = fut.result()

    async def _open(self, deadline: float) -> _Connection:
        loop = asyncio.get_running_loop()
        delay = _FIRST_BACKOFF
        while True:
            try:
                return await self._open_once(loop, deadline)
            except ServerUnreachable:
                raise
            except (OSError, _ConnectionLost, Unavailable) as exc:
                if isinstance(exc, ssl.SSLError) and (
                        failed := _tls_failed(self.host, self.port, exc)) is not None:
                    raise failed from None
                remaining = deadline - loop.time()
                if remaining <= 0 or self._closed:
                    if isinstance(exc, Unavailable):
                        raise
                    raise Unavailable(f"cannot connect to {self.host}:{self.port}: "
                                      f"{exc or type(exc).__name__}") from exc
                await asyncio.sleep(min(delay, remaining))
                delay = min(delay * 2, _MAX_BACKOFF)

    async def _open_once(self, loop: asyncio.AbstractEventLoop, deadline: float) -> _Connection:
        opening = loop.create_connection(
            lambda: _Connection(loop, self.timeout), self.host, self.port, ssl=self._tls,
            server_hostname=self.host if self._tls is not None else None)
        try:
            _, conn = await asyncio.wait_for(opening, max(0.001, deadline - loop.time()))
        except OSError as exc:
            unreachable = _unreachable(exc, self.host, self.port) if self._fail_refused else None
            if unreachable is not None:
                raise unreachable from None
            raise
        self._fail_refused = False  # it listens: later refusals are a restart, retried
        try:
            resp = await conn.request(
                Hello(conn.new_id(), PROTOCOL_VERSION, self._token, _NAME, self._shard), deadline)
        except AuthenticationFailed as exc:
            conn.close()
            raise _refused(exc, self._token_source) from None
        except BaseException:
            conn.close()
            raise
        if type(resp) is Welcome:
            _set_max_frame(conn.reader, conn.writer, _accepted_frame(resp.max_frame))
            self.layout = (resp.shards, resp.partitions)
            return conn
        conn.close()
        if type(resp) is Error:
            raise _refused(_failure(resp), self._token_source)
        raise _unexpected(resp)
