"""Running the protocol server as a process: ``ango serve``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import platform
import signal
from collections.abc import Callable
from typing import Any

from ango import __version__
from ango.health import describe_dsn

from .limits import Limits
from .metrics import Metrics
from .protocol_server import ProtocolServer

log = logging.getLogger("ango.server")


async def serve_async(
    dsn: str | None = None,
    *,
    token: str,
    data_dir: str | None = None,
    host: str = "127.0.0.1",
    port: int = 7878,
    shards: int | None = None,
    noop: bool = False,
    limits: Limits | None = None,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[ProtocolServer, str, int], Any] | None = None,
    handle_signals: bool = True,
) -> None:
    """Serve until ``stop`` is set or SIGTERM/SIGINT arrives, then shut down cleanly.

    Shutting down stops accepting, answers the claims in flight, closes every
    connection and then the allocator (its shard processes). ``noop`` serves
    without an allocator (claims answered with a constant code).
    """
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    if noop:
        allocator_cm: Any = contextlib.nullcontext(None)
    else:
        from ango.allocator import Allocator

        allocator_cm = Allocator(dsn, shards=shards, data_dir=data_dir)
    async with allocator_cm as alloc:
        # One Metrics per server, shared by every front end (binary protocol, HTTP).
        metrics = Metrics(alloc)
        server = ProtocolServer(alloc, token=token, limits=limits, metrics=metrics)
        bound_host, bound_port = await server.start(host, port)
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
        try:
            if on_ready is not None:
                on_ready(server, bound_host, bound_port)
            await stop.wait()
            log.info("ango: shutting down (%d requests in flight)", server.in_flight)
        finally:
            if handle_signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)
            await server.shutdown()
    log.info("ango: stopped")


def serve(**kwargs: Any) -> None:
    """Run :func:`serve_async` until it returns (blocking), on uvloop where it is installed."""
    try:
        import uvloop
    except ImportError:  # not on Windows (setup.cfg), nor required: asyncio's own loop serves
        asyncio.run(serve_async(**kwargs))
        return
    uvloop.run(serve_async(**kwargs))


def log_startup(server: ProtocolServer, host: str, port: int, note: str = "") -> None:
    """The start-up line: versions, database (never its password), address, shards.

    Its text contains ``serving on HOST:PORT``, which scripts and tests wait for.
    """
    alloc = server.allocator
    fields: dict[str, Any] = {
        "event": "started", "ango_version": __version__,
        "python_version": platform.python_version(), "host": host, "port": port,
        "protocol_version": server.stats()["protocol_version"], "noop": server.noop,
    }
    if alloc is not None:
        fields.update(postgres_version=alloc.postgres_version, database=describe_dsn(alloc.dsn),
                      shards=alloc.shard_count, partitions=alloc.partitions)
        mode = (f"{alloc.shard_count} shards, PostgreSQL {alloc.postgres_version} at "
                f"{fields['database']}")
    else:
        mode = "noop"
    log.info("ango %s (Python %s) serving on %s:%d (protocol %d, %s%s)", __version__,
             fields["python_version"], host, port, fields["protocol_version"], mode,
             f", {note}" if note else "", extra=fields)
