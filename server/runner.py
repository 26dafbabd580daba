"""Running the protocol server as a process: ``ango serve``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from typing import Any

from .limits import Limits
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
        server = ProtocolServer(alloc, token=token, limits=limits)
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
