"""Claims per second through `ango serve`, with ``ango.AsyncClient`` pipelining.

    python -m benchmarks.protocol_load --noop [--concurrency 100] [--seconds 5] [--tls]
    python -m benchmarks.protocol_load --port 7878 --token T --batch BATCH_ID

``--noop`` starts ``ango serve --noop`` itself (claims answered with a constant
code, no shards, no PostgreSQL: the transport's ceiling). Otherwise it claims
from BATCH_ID on a running server, one customer per claim. The client runs in
this process on uvloop with ``--concurrency`` claims in flight over
``--connections`` connections; it prints one JSON line. ``--tls`` (with
``--noop``) serves TLS with a self-signed certificate made by ``openssl`` and
verifies it in the client: compare with and without to see what TLS costs.

``start_server`` and ``drive`` are the pieces ``benchmarks.load`` builds on:
``drive`` also times every claim and keeps every code received.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import re
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

import uvloop
from ango.server.tls import self_signed

import ango


class Server:
    """An ``ango serve`` subprocess on a free port of 127.0.0.1.

    Its stderr is read to the end by a thread (a full pipe would stall the
    server); the last lines are kept for error messages.
    """

    def __init__(self, token: str, *, noop: bool = False, dsn: str | None = None,
                 shards: int | None = None, ready_timeout: float = 60.0,
                 tls_cert: str | None = None, tls_key: str | None = None) -> None:
        cmd = [sys.executable, "-c", "from ango.cli import main; main()", "serve",
               "--host", "127.0.0.1", "--port", "0"]
        if noop:
            cmd.append("--noop")
        if dsn:
            cmd += ["--dsn", dsn]
        if shards:
            cmd += ["--shards", str(shards)]
        if tls_cert:
            cmd += ["--tls-cert", tls_cert, "--tls-key", tls_key or tls_cert]
        self.token = token
        self.tail: collections.deque[str] = collections.deque(maxlen=40)
        # Its stdout must not reach ours: `benchmarks.load --json` prints one object there.
        # The token through the environment: a command line is readable by every local user.
        self.process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        text=True, env=dict(os.environ, ANGO_TOKEN=token))
        self.port = 0
        self.http_port = 0  # the HTTP API's (logged before the ready line)
        found = threading.Event()

        def read() -> None:
            for line in self.process.stderr:
                self.tail.append(line.rstrip())
                http = re.search(r"HTTP API on http://[^ ]+:(\d+)", line)
                if http:
                    self.http_port = int(http.group(1))
                match = re.search(r"serving on [^:]+:(\d+)", line)
                if match and not found.is_set():
                    self.port = int(match.group(1))
                    found.set()
            found.set()

        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()
        if not found.wait(ready_timeout) or not self.port:
            self.stop()
            raise RuntimeError("ango serve did not start:\n" + "\n".join(self.tail))

    @property
    def pid(self) -> int:
        """The server's process id (its shards are its children)."""
        return self.process.pid

    def stop(self) -> int:
        """SIGTERM (the server answers what is in flight), wait, return the exit status."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(5)
        return self.process.returncode


def start_server(token: str, **kwargs) -> Server:
    """Start ``ango serve`` (see :class:`Server`) and return it once it listens."""
    return Server(token, **kwargs)


@dataclass
class Drive:
    """What :func:`drive` measured."""

    claims: int = 0                 # successful claims in the steady window
    errors: int = 0                 # failed claims in the steady window
    seconds: float = 0.0            # length of the steady window
    latencies: list[float] = field(default_factory=list)  # seconds, claims of the window
    codes: list[tuple[str, str]] = field(default_factory=list)  # (code, customer), all claims
    errors_total: int = 0           # failed claims, warm-up and drain included
    error_kinds: collections.Counter = field(default_factory=collections.Counter)
    budget_reached: bool = False

    @property
    def claims_per_s(self) -> float:
        """Successful claims per second of the steady window."""
        return self.claims / self.seconds if self.seconds else 0.0


async def drive(port: int, token: str, batch: str, concurrency: int, connections: int,
                seconds: float, warmup: float = 0.5, *, budget: int | None = None,
                keep_codes: bool = False, prefix: str = "c",
                on_window: tuple | None = None, tls: ssl.SSLContext | None = None,
                cluster: bool = False, direct: bool = False) -> Drive:
    """Keep ``concurrency`` claims in flight for ``warmup`` + ``seconds``.

    Claims run on ``connections`` clients (claim ``w`` uses client ``w %
    connections``), each claim for a fresh customer ``{prefix}{w}-{i}``. Only
    claims that complete inside the steady window (after the warm-up) count
    towards ``claims``, ``errors`` and ``latencies``; claims started before the
    window ends are awaited. ``budget`` caps the claims started (so a small
    batch is not run dry: the window then ends when the budget is spent).
    ``on_window`` is a pair of callables run at the window's start and end
    (e.g. CPU samples). ``cluster``: cluster-aware clients (claims straight to
    the owner of their routing slot; ``port`` only serves the map); ``direct``
    too: straight to the owning shard process (docs/PROTOCOL.md).
    """
    clients = [await ango.AsyncClient.connect(port=port, token=token, timeout=30, tls=tls,
                                              cluster=cluster or direct, direct=direct)
               for _ in range(connections)]
    loop = asyncio.get_running_loop()
    result = Drive()
    started = 0
    window_start = loop.time() + warmup
    stop_at = window_start + seconds
    window_end: float | None = None
    latencies = result.latencies
    codes = result.codes
    perf = time.perf_counter
    clock = loop.time

    async def worker(w: int) -> None:
        nonlocal started, window_end
        client = clients[w % connections]
        i = 0
        while True:
            now = clock()
            if now >= stop_at:
                return
            if budget is not None and started >= budget:
                if window_end is None:
                    window_end = now
                    result.budget_reached = True
                return
            started += 1
            customer = f"{prefix}{w}-{i}"
            i += 1
            t0 = perf()
            try:
                code = await client.claim(batch, customer)
            except ango.AngoError as exc:
                result.errors_total += 1
                result.error_kinds[type(exc).__name__] += 1
                if window_start <= clock() < stop_at:
                    result.errors += 1
                continue
            took = perf() - t0
            if keep_codes:
                codes.append((code, customer))
            done_at = clock()
            if window_start <= done_at < stop_at and window_end is None:
                latencies.append(took)

    async def window() -> None:
        await asyncio.sleep(max(0.0, window_start - clock()))
        if on_window:
            on_window[0]()
        t0 = clock()
        while clock() < stop_at and window_end is None:
            await asyncio.sleep(min(0.05, max(0.0, stop_at - clock())))
        result.seconds = max(0.0, (window_end or clock()) - t0)
        if on_window:
            on_window[1]()

    try:
        await asyncio.gather(window(), *(worker(w) for w in range(concurrency)))
    finally:
        for client in clients:
            await client.close()
    result.claims = len(latencies)
    return result


async def load(port: int, token: str, batch: str, concurrency: int, connections: int,
               seconds: float, tls: ssl.SSLContext | None = None,
               server_pid: int | None = None) -> dict:
    """Claims per second over ``seconds`` after a 0.5 s warm-up, as a dict; with
    ``server_pid``, also the CPU microseconds per claim of the server and of this
    client (steadier than claims per second on a busy machine)."""
    from benchmarks._cpu import CpuSplit, us_per_claim

    groups = {"client": lambda: [os.getpid()]}
    if server_pid is not None:
        groups["server"] = lambda: [server_pid]
    cpu = CpuSplit(groups)
    found = await drive(port, token, batch, concurrency, connections, seconds, tls=tls,
                        on_window=(cpu.start, cpu.stop))
    result = {"claims": found.claims, "errors": found.errors, "seconds": round(found.seconds, 3),
              "claims_per_s": round(found.claims_per_s), "concurrency": concurrency,
              "connections": connections}
    if cpu.result and found.claims:
        result["cpu_us_per_claim"] = us_per_claim(cpu.result, found.claims, digits=2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--noop", action="store_true", help="start `ango serve --noop` and load it")
    parser.add_argument("--port", type=int, default=7878)
    parser.add_argument("--token", default=os.environ.get("ANGO_TOKEN", "bench-token"))
    parser.add_argument("--batch", default="00000000-0000-4000-8000-000000000000")
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--tls", action="store_true",
                        help="with --noop: serve TLS (self-signed) and verify it in the client")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        tls_files = self_signed(folder) if args.tls and args.noop else (None, None)
        tls = ssl.create_default_context(cafile=tls_files[0]) if tls_files[0] else None
        server = (start_server(args.token, noop=True, tls_cert=tls_files[0],
                               tls_key=tls_files[1]) if args.noop else None)
        port = server.port if server else args.port
        try:
            result = uvloop.run(load(port, args.token, args.batch, args.concurrency,
                                     args.connections, args.seconds, tls,
                                     server.pid if server else None))
            result["mode"] = "noop" if args.noop else "allocator"
            result["tls"] = tls is not None
            print(json.dumps(result))
        finally:
            if server is not None:
                server.stop()


if __name__ == "__main__":
    main()
