"""uvicorn driven inside the running event loop, serving :class:`HttpApi`.

``uvicorn.Server.serve`` would install its own signal handlers and exit the
process when it cannot bind; here the socket is bound first (an ``OSError``
reaches ``ango serve`` as usual), ``Server.startup(sockets=...)`` starts
serving on the loop already running, and ``Server.shutdown`` drains it.

uvicorn's httptools protocol times out idle keep-alive connections but not a
client that sends its headers (or body) slowly, limits neither the headers'
size nor the connections, and answers parser errors in plain text: the
subclass here adds those, with JSON bodies like every other error.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .http_api import HttpApi, HttpLimits, MetricsLike, error_body

log = logging.getLogger("ango.server.http")

_REASONS = {400: b"Bad Request", 408: b"Request Timeout", 431: b"Request Header Fields Too Large",
            503: b"Service Unavailable"}


class CoalescingTransport:
    """A transport whose writes within one loop pass go out as one ``write``.

    uvicorn writes a response's status line and headers, then its body, each
    with its own ``transport.write``: two system calls and two TCP segments
    for a small JSON answer. Buffered until the end of the loop pass, they are
    one. Everything else goes to the real transport; closing flushes first.
    """

    __slots__ = ("_transport", "_loop", "_pending")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:  # noqa: D102
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(data)

    def flush(self) -> None:
        """Write what is pending."""
        if self._pending:
            data = b"".join(self._pending) if len(self._pending) > 1 else self._pending[0]
            self._pending = []
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:  # noqa: D102
        self.flush()
        self._transport.close()

    def abort(self) -> None:  # noqa: D102
        self._pending = []
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def _protocol_class(api: HttpApi) -> type[HttpToolsProtocol]:
    limits: HttpLimits = api.limits
    metrics: MetricsLike | None = api.metrics

    class LimitedHttpToolsProtocol(HttpToolsProtocol):
        """uvicorn's httptools protocol with header/body timeouts, header and connection limits."""

        _in_headers = True   # between a request's first byte and its headers' end
        _in_body = False     # between its headers' end and its body's end
        _header_bytes = 0
        _chunk = 0           # bytes of the latest read
        _begun = False       # a request's first bytes arrived, its headers' end not yet
        _last_body = 0.0
        _timer: asyncio.TimerHandle | None = None
        _counted = False
        _refused = False

        def connection_made(self, transport: Any) -> None:  # noqa: D102
            super().connection_made(transport)
            self.transport = CoalescingTransport(transport, self.loop)  # type: ignore[assignment]
            api.connections += 1
            self._counted = True
            if metrics is not None:
                metrics.connection_opened("http")
            if len(self.connections) > limits.max_connections:
                self._refuse(503, "unavailable", "too many connections")
                return
            self._arm(limits.header_timeout)

        def connection_lost(self, exc: Exception | None) -> None:  # noqa: D102
            self._disarm()
            if self._counted:
                self._counted = False
                api.connections -= 1
                if metrics is not None:
                    metrics.connection_closed("http")
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:  # noqa: D102
            if self._refused:
                return
            self._chunk = len(data)
            if self._in_headers:
                self._header_bytes += self._chunk  # all header bytes if the headers go on
            super().data_received(data)
            if self._refused:
                return
            # Timers only for a request left incomplete by this read: one that
            # arrives whole (the common case) costs none.
            if self._in_headers:
                if self._header_bytes > limits.max_header_bytes:
                    self._refuse(431, "headers_too_large",
                                 f"request line and headers exceed {limits.max_header_bytes} bytes")
                elif self._timer is None:
                    self._arm(limits.header_timeout)
            elif self._in_body:
                self._last_body = self.loop.time()
                if self._timer is None:
                    self._arm(limits.body_timeout)

        def on_message_begin(self) -> None:  # noqa: D102
            super().on_message_begin()
            self._in_headers = True
            self._begun = True
            # Counted from the next read on: this one may hold the previous request's tail.
            self._header_bytes = 0

        def on_headers_complete(self) -> None:  # noqa: D102
            self._in_headers = False
            self._begun = False
            self._in_body = True
            self._last_body = self.loop.time()
            self._disarm()
            if self._header_bytes + self._chunk > limits.max_header_bytes:  # maybe: count
                size = len(self.url) + sum(len(k) + len(v) + 4 for k, v in self.headers)
                if size > limits.max_header_bytes:
                    self._refuse(431, "headers_too_large",
                                 f"request line and headers exceed {limits.max_header_bytes} "
                                 "bytes")
                    return
            super().on_headers_complete()

        def on_body(self, body: bytes) -> None:  # noqa: D102
            if not self._refused:
                super().on_body(body)

        def on_message_complete(self) -> None:  # noqa: D102
            self._in_body = False
            self._disarm()
            if not self._refused:
                super().on_message_complete()

        def send_400_response(self, msg: str) -> None:  # noqa: D102 - JSON like every error
            self._refuse(400, "bad_request", f"malformed HTTP request: {msg}")

        # --- timers ---------------------------------------------------------------------

        def _arm(self, delay: float) -> None:
            self._disarm()
            self._timer = self.loop.call_later(delay, self._expired)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _expired(self) -> None:
            self._timer = None
            if self.transport.is_closing():
                return
            if self._in_body and not (self.cycle and self.cycle.response_complete):
                idle = self.loop.time() - self._last_body
                if idle < limits.body_timeout:
                    self._arm(limits.body_timeout - idle)
                    return
                self._refuse(408, "request_timeout",
                             f"no body bytes for {limits.body_timeout:g} s")
            elif self._in_headers and (self._begun or self._header_bytes):
                self._refuse(408, "request_timeout",
                             f"headers not complete within {limits.header_timeout:g} s")
            elif self._in_headers:
                self.transport.close()  # connected and silent: nothing to answer

        def _refuse(self, status: int, code: str, message: str) -> None:
            """Answer ``status`` with a JSON error (unless a response started) and close."""
            self._disarm()
            self._refused = True
            started = self.cycle is not None and self.cycle.response_started \
                and not self.cycle.response_complete
            if not started and not self.transport.is_closing():
                body = error_body(code, message)
                self.transport.write(
                    b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\n"
                    b"content-length: %d\r\nconnection: close\r\n\r\n%s"
                    % (status, _REASONS[status], len(body), body))
            if self.cycle is not None and not self.cycle.response_complete:
                self.cycle.disconnected = True
                self.cycle.message_event.set()
            self.transport.close()

    return LimitedHttpToolsProtocol


class HttpServer:
    """The HTTP API on ``host:port`` inside the running loop."""

    def __init__(self, api: HttpApi) -> None:
        self.api = api
        self._server: uvicorn.Server | None = None
        self._socket: socket.socket | None = None
        self._ticker: asyncio.Task[None] | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 8080) -> tuple[str, int]:
        """Bind and serve; return the address bound (``port=0`` picks a free port)."""
        limits = self.api.limits
        config = uvicorn.Config(
            self.api, host=host, port=port, loop="none", http=_protocol_class(self.api),
            lifespan="off", log_config=None, access_log=False, proxy_headers=False,
            server_header=False, timeout_keep_alive=limits.keep_alive_timeout,
            timeout_graceful_shutdown=int(limits.shutdown_grace), backlog=1024)
        config.load()
        # uvicorn logs each malformed request and each refusal as a warning; the
        # answers say what was wrong, and a hostile client must not flood the log.
        logging.getLogger("uvicorn.error").setLevel(logging.ERROR)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.create_server((host, port), family=family, backlog=1024)
        server = uvicorn.Server(config)
        server.lifespan = config.lifespan_class(config)
        await server.startup(sockets=[self._socket])
        self._server = server
        self._ticker = asyncio.get_running_loop().create_task(self._tick())
        return self._socket.getsockname()[:2]

    async def _tick(self) -> None:
        # uvicorn's main loop refreshes the Date header once a second; it does not run here.
        assert self._server is not None
        while True:
            await self._server.on_tick(0)
            await asyncio.sleep(1.0)

    @property
    def port(self) -> int:
        """The port listened on."""
        assert self._socket is not None
        return self._socket.getsockname()[1]

    async def shutdown(self) -> None:
        """Stop accepting, finish the requests in flight, close every connection."""
        if self._ticker is not None:
            self._ticker.cancel()
        if self._server is not None:
            await self._server.shutdown(sockets=[self._socket] if self._socket else None)
        self.api.close()
