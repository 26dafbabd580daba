"""Running the protocol server as a process: ``ango serve``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from typing import Any

from .http_api import HttpApi, HttpLimits, MetricsLike
from .http_server import HttpServer
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
    http_host: str = "127.0.0.1",
    http_port: int | None = None,
    http_no_auth: bool = False,
    http_limits: HttpLimits | None = None,
    metrics: MetricsLike | None = None,
) -> None:
    """Serve until ``stop`` is set or SIGTERM/SIGINT arrives, then shut down cleanly.

    Shutting down stops accepting, answers the claims in flight, closes every
    connection and then the allocator (its shard processes). ``noop`` serves
    without an allocator (claims answered with a constant code). ``http_port``
    (None: off) also serves the HTTP API (server/http_api.py) on the same loop
    and allocator, with the same token unless ``http_no_auth``.
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
        http = None
        if http_port is not None:
            api = HttpApi(alloc, token=token, no_auth=http_no_auth, limits=http_limits,
                          metrics=metrics, auth_guard=server, extra_stats=server.stats)
            http = HttpServer(api)
            try:
                web_host, web_port = await http.start(http_host, http_port)
            except BaseException:
                await server.shutdown()
                raise
            log.info("ango HTTP API on http://%s:%d (%s)", web_host, web_port,
                     "NO AUTHENTICATION" if http_no_auth else "Authorization: Bearer <token>")
            if http_no_auth:
                log.warning("the HTTP API requires no token (--http-no-auth): anyone who can "
                            "reach %s:%d can claim codes, upload and expire batches",
                            web_host, web_port)
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
            if http is not None:
                await asyncio.gather(http.shutdown(), server.shutdown())
            else:
                await server.shutdown()
    log.info("ango: stopped")


def serve(**kwargs: Any) -> None:
    """Run :func:`serve_async` on uvloop until it returns (blocking)."""
    import uvloop

    uvloop.run(serve_async(**kwargs))
