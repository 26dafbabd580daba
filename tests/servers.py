"""Protocol servers for the tests: in-process (own thread and loop) or `ango serve` processes.

Both listen on 127.0.0.1 on a free port. Raw-socket helpers speak the wire
protocol byte by byte, so tests can misbehave on purpose.
"""

from __future__ import annotations

import asyncio
import io
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import msgspec
import psycopg
from ango.server import Limits, ProtocolServer

from ango.framing import HEADER_SIZE, encode_frame, unpack_header
from ango.importer import import_codes
from ango.protocol import PROTOCOL_VERSION, Hello, response_decoder

TOKEN = "test-token-" + "x" * 20
#: The `ango` command, run by this interpreter.
ANGO = [sys.executable, "-c", "from ango.cli import main; main()"]
CLIENT_ID = "c0ffee00-0000-4000-8000-000000000001"


def new_batch(dsn: str, count: int, rules: dict | None = None) -> str:
    """Import ``count`` fresh codes as a new batch; return its id."""
    prefix = uuid.uuid4().hex[:8]
    body = "code\n" + "".join(f"{prefix}-{i:06d}\n" for i in range(count))
    result = import_codes(dsn, io.BytesIO(body.encode()), CLIENT_ID, f"b {prefix}", rules)
    return str(result.batch_id)


def issued(dsn: str) -> list[tuple[str, str, str]]:
    """Every issue recorded in the database: (code, customer, request id)."""
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT code, customer_id, request_id FROM ango.issues").fetchall()


class InProcessServer:
    """A ProtocolServer on its own event loop in a thread.

    ``allocator`` is None (noop), an object, or a factory called in the
    server's loop (``lambda: ango.Allocator(dsn, shards=2)``) that is entered
    as an async context manager.
    """

    def __init__(self, allocator: Any = None, *, token: str = TOKEN, limits: Limits | None = None,
                 port: int = 0, **server_options: Any) -> None:
        self.token = token
        self._options = server_options  # more ProtocolServer arguments (tls, ...)
        self._allocator = allocator
        self._limits = limits
        self._port = port
        self.loop: asyncio.AbstractEventLoop | None = None
        self.server: ProtocolServer | None = None
        self.allocator: Any = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None
        self._ready: Future = Future()

    @property
    def port(self) -> int:
        """The port listened on."""
        assert self.server is not None
        return self.server.port

    def __enter__(self) -> InProcessServer:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.result(timeout=120)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        import uvloop

        try:
            uvloop.run(self._main())
        except BaseException as exc:  # reported to the test thread
            if not self._ready.done():
                self._ready.set_exception(exc)

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        alloc_cm = None
        alloc = self._allocator
        if callable(alloc) and not hasattr(alloc, "claim"):
            alloc_cm = alloc()
            alloc = await alloc_cm.__aenter__()
        self.allocator = alloc
        try:
            self.server = ProtocolServer(alloc, token=self.token, limits=self._limits,
                                         **self._options)
            await self.server.start("127.0.0.1", self._port)
            self._ready.set_result(None)
            await self._stop.wait()
            await self.server.shutdown()
        finally:
            if alloc_cm is not None:
                await alloc_cm.__aexit__(None, None, None)

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` in the server's loop (awaiting it if it returns an awaitable)."""
        async def go() -> Any:
            result = fn()
            if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
                result = await result
            return result

        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(go(), self.loop).result(timeout=60)

    def stop(self) -> None:
        """Shut the server down (answering what is in flight) and join its thread."""
        if self._thread is None:
            return
        if self.loop is not None and self._stop is not None and self.loop.is_running():
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=120)
        self._thread = None


class ServeProcess:
    """``ango serve`` in a subprocess; started by :meth:`start`, which waits for the ready line."""

    READY = re.compile(r"serving on [^:]+:(\d+)")
    HTTP_READY = re.compile(r"HTTP API on http://[^ ]+:(\d+)")

    def __init__(self, *args: str, port: int = 0, env: dict[str, str] | None = None,
                 command: list[str] | None = None) -> None:
        self.args = list(args)
        self.command = command or ANGO
        self.port = port
        self.http_port: int | None = None  # the HTTP API's, once started (unless --no-http)
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.stderr_lines: list[str] = []
        self._reader: threading.Thread | None = None

    def start(self, timeout: float = 120.0) -> ServeProcess:
        """Start and wait until it is ready; sets :attr:`port`."""
        cmd = [*self.command, "serve", "--port", str(self.port), *self.args]
        if not any(a in ("--http-port", "--no-http") for a in self.args):
            # Any free port: the default (--port + 1) may be a client's ephemeral
            # port by now when a test restarts a server on the same --port.
            cmd += ["--http-port", "0"]
        env = dict(os.environ, **(self.env or {}))
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=env)
        ready: Future = Future()

        def read() -> None:
            assert self.proc is not None and self.proc.stderr is not None
            for line in self.proc.stderr:
                self.stderr_lines.append(line)
                http = self.HTTP_READY.search(line)
                if http and self.http_port is None:
                    self.http_port = int(http.group(1))
                match = self.READY.search(line)
                if match and not ready.done():
                    ready.set_result(int(match.group(1)))
            if not ready.done():
                log = "".join(self.stderr_lines)
                ready.set_exception(RuntimeError(f"ango serve exited:\n{log}"))

        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()
        self.port = ready.result(timeout=timeout)
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Send ``sig`` and wait for the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            if self._reader is not None:
                self._reader.join(timeout=5)

    def kill(self) -> None:
        """SIGKILL, if still running."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    @property
    def stderr(self) -> str:
        """Everything it logged so far."""
        return "".join(self.stderr_lines)


# --- raw sockets ------------------------------------------------------------------


def connect(port: int, timeout: float = 10.0) -> socket.socket:
    """A plain TCP connection to the server."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def send(sock: socket.socket, *messages: msgspec.Struct) -> None:
    """Send messages as frames, in one write."""
    sock.sendall(b"".join(encode_frame(m) for m in messages))


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    """Exactly ``n`` bytes, or ConnectionError if the peer closes first."""
    chunks = []
    while n:
        chunk = sock.recv(min(n, 1 << 20))
        if not chunk:
            raise ConnectionError("closed by the server")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def recv(sock: socket.socket) -> Any:
    """The next response frame, decoded."""
    (size,) = unpack_header(recv_exactly(sock, HEADER_SIZE))
    return response_decoder.decode(recv_exactly(sock, size))


def hello(sock: socket.socket, token: str = TOKEN) -> Any:
    """Send hello and return the answer."""
    send(sock, Hello(0, PROTOCOL_VERSION, token))
    return recv(sock)


def closed_by_peer(sock: socket.socket, timeout: float = 10.0) -> bool:
    """True when the server closes the connection (reads and drops anything before EOF)."""
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not sock.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return False
