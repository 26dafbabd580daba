"""Running the protocol server as a process: ``ango serve``."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import platform
import signal
import socket
from collections.abc import Callable
from typing import Any

from ango import __version__
from ango.health import describe_dsn

from .http_api import HttpApi, HttpLimits
from .http_server import HttpServer
from .limits import Limits
from .metrics import Metrics
from .protocol_server import ProtocolServer
from .tls import peer_context, server_context

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
    tls_cert: str | None = None,
    tls_key: str | None = None,
    tls_required: bool = True,
    http_host: str = "127.0.0.1",
    http_port: int | None = None,
    http_no_auth: bool = False,
    http_limits: HttpLimits | None = None,
    instance_name: str | None = None,
    advertise: str | None = None,
) -> None:
    """Serve until ``stop`` is set or SIGTERM/SIGINT arrives, then shut down cleanly.

    Shutting down stops accepting, answers the claims in flight, closes every
    connection and then the allocator (its shard processes). ``noop`` serves
    without an allocator (claims answered with a constant code). With
    ``tls_cert``/``tls_key`` the port speaks TLS, and plain text only if not
    ``tls_required``. ``http_port``
    (None: off) also serves the HTTP API (server/http_api.py) on the same loop
    and allocator, with the same tokens unless ``http_no_auth``.
    ``instance_name`` (default: host name and a random suffix) and ``advertise``
    (host:port peers and clients reach this instance at; default: the address
    listened on) identify it in the cluster of instances sharing the database.
    """
    tls = server_context(tls_cert, tls_key or tls_cert) if tls_cert else None
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
        server = ProtocolServer(alloc, token=token, limits=limits, metrics=metrics, tls=tls,
                                tls_required=tls_required)
        bound_host, bound_port = await server.start(host, port)
        if alloc is not None:
            try:
                await alloc.join_cluster(instance_name or default_instance_name(),
                                         advertise or advertised(bound_host, bound_port), token,
                                         tls=peer_context(tls_cert) if tls_cert else None)
            except BaseException:
                await server.shutdown()
                raise
        if not server.tls_required and not is_loopback(host):
            log.warning("listening on %s without %s: tokens and codes cross the network in "
                        "clear text; pass --tls-cert/--tls-key", host,
                        "TLS" if tls is None else "requiring TLS")
        http = None
        if http_port is not None:
            api = HttpApi(alloc, token=token, no_auth=http_no_auth, limits=http_limits,
                          metrics=metrics, auth_guard=server, authenticator=server.auth,
                          extra_stats=server.stats, health=server.health)
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


def default_instance_name() -> str:
    """This host's name with a random suffix: unique among the instances of a cluster."""
    return f"{socket.gethostname()}-{os.urandom(3).hex()}"


def advertised(host: str, port: int) -> str:
    """The address peers reach this instance at: the one listened on, or the host's
    name when listening on every interface."""
    if host in ("", "0.0.0.0", "::"):
        host = socket.gethostname()
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_loopback(host: str) -> bool:
    """True when ``host`` is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name, or every interface ("", "0.0.0.0" parse; names do not)


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
