"""Forwarding a claim to the instance that owns its routing slot, over the binary protocol.

A forwarded claim carries ``forwarded=True`` (served where it lands, never sent
on again) and the claim's own request id, so serving it again locally after a
lost answer cannot yield a second code: PostgreSQL returns the recorded one.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from functools import partial

from ango.client import AsyncClient, _failure
from ango.errors import AngoError, AuthenticationFailed
from ango.protocol import Claim, Code, Error

log = logging.getLogger("ango.cluster")

#: Seconds a forwarded claim may wait for the owner's answer before it is served here.
FORWARD_TIMEOUT_S = 5.0
#: Claims in flight to one peer at most; more are served locally.
MAX_FORWARD_IN_FLIGHT = 4096
#: Seconds between connection attempts to a peer that could not be reached.
RECONNECT_EVERY_S = 1.0
#: Seconds before trying again a peer that refused our token.
REFUSED_BACKOFF_S = 30.0


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) as a pair; ValueError naming it when malformed."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"address must be HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


class Peer:
    """One other instance: a pipelined connection to it, opened on demand."""

    def __init__(self, name: str, address: str, token: str,
                 tls: ssl.SSLContext | None = None) -> None:
        self.name = name
        self.address = address
        host, port = split_address(address)
        self._client = AsyncClient(host, port, token, timeout=FORWARD_TIMEOUT_S, tls=tls)
        self._connecting: asyncio.Task | None = None
        self._next_try = 0.0
        self.in_flight = 0
        self.forwarded = 0
        self.fallbacks = 0

    def forward(self, batch_id: str, customer_id: str, client_id: str | None, request_id: str,
                future: asyncio.Future[str], local: Callable[[], None]) -> None:
        """Send the claim to this peer; ``local()`` serves it here if the peer cannot."""
        conn = self._client._conn
        if conn is None or conn.closed or self.in_flight >= MAX_FORWARD_IN_FLIGHT:
            if conn is None or conn.closed:
                self.connect()
            self.fallbacks += 1
            local()
            return
        try:
            answer = conn.request(
                Claim(conn.new_id(), batch_id, customer_id, client_id, request_id, True),
                conn.loop.time() + FORWARD_TIMEOUT_S)
        except Exception:  # the connection closed just now
            self.fallbacks += 1
            local()
            return
        self.in_flight += 1
        self.forwarded += 1
        answer.add_done_callback(partial(self._answered, future, local))

    def _answered(self, future: asyncio.Future[str], local: Callable[[], None],
                  answer: asyncio.Future) -> None:
        self.in_flight -= 1
        if future.done():
            return
        resp = None if answer.cancelled() or answer.exception() else answer.result()
        if type(resp) is Code:
            future.set_result(resp.code)
            return
        if type(resp) is Error:
            exc: AngoError = _failure(resp)
            if not exc.retryable:
                future.set_exception(exc)
                return
        # Lost, late, or the owner is busy or leaving: serve it here, same request id.
        self.fallbacks += 1
        local()

    def connect(self) -> None:
        """Open the connection in the background (at most once per RECONNECT_EVERY_S)."""
        loop = asyncio.get_running_loop()
        if self._connecting is not None or loop.time() < self._next_try:
            return
        self._next_try = loop.time() + RECONNECT_EVERY_S
        self._connecting = loop.create_task(self._open(loop.time() + RECONNECT_EVERY_S))

    async def _open(self, deadline: float) -> None:
        try:
            await self._client._connection(deadline)
        except AuthenticationFailed as exc:
            self._next_try = asyncio.get_running_loop().time() + REFUSED_BACKOFF_S
            log.warning("peer %s at %s refused our token (%s): claims of its slots are "
                        "served here", self.name, self.address, exc)
        except Exception as exc:  # unreachable now: served locally, tried again later
            log.debug("peer %s at %s unreachable: %s", self.name, self.address, exc)
        finally:
            self._connecting = None

    async def close(self) -> None:
        """Close the connection (claims in flight to it are served locally)."""
        if self._connecting is not None:
            self._connecting.cancel()
        await self._client.close()
