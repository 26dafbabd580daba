"""Cluster-aware routing for :class:`ango.AsyncClient` (``cluster=True``).

The client fetches the ``partition_map`` (docs/PROTOCOL.md), keeps one
connection per owning instance and sends each claim straight to the owner of
its routing slot. A ``moved`` hint on an answer, or an owner that cannot be
reached, makes it fetch the map again; the claim itself is then sent through
another instance (which forwards it) with the same request id, so a move never
fails a claim and never yields a second code.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
import zlib
from typing import TYPE_CHECKING, Any

from ango.errors import AngoError
from ango.protocol import Claim, Code, Error, GetPartitionMap, PartitionMap

if TYPE_CHECKING:
    from ango.client import AsyncClient

log = logging.getLogger("ango.client")

#: Seconds between two map fetches at most once per this (hints come in bursts).
REFRESH_AT_MOST_EVERY_S = 0.2
#: Seconds an owner gets to answer before its claim goes through another instance.
OWNER_TIMEOUT_S = 5.0

_CANONICAL: dict[str, str | None] = {}


def _canonical(batch_id: str) -> str | None:
    found = _CANONICAL.get(batch_id, False)
    if found is not False:
        return found  # type: ignore[return-value]
    try:
        text: str | None = str(uuid.UUID(batch_id))
    except (ValueError, TypeError, AttributeError):
        text = None  # not a UUID: the server says so, whoever gets it
    if len(_CANONICAL) > 100_000:
        _CANONICAL.clear()
    _CANONICAL[batch_id] = text
    return text


class ClaimRoutes:
    """The map, and one client per owning instance, of a cluster-aware AsyncClient."""

    def __init__(self, seed: AsyncClient) -> None:
        self.seed = seed
        self.version = -1
        self.slots = 0
        self.owners: list[AsyncClient | None] = []
        self.clients: dict[str, AsyncClient] = {}
        self._refreshing: asyncio.Task | None = None
        self._last_refresh = 0.0
        self.refreshes = 0
        self.rerouted = 0

    def _client_for(self, address: str) -> AsyncClient:
        from ango.client import AsyncClient
        from ango.cluster.forwarding import split_address

        found = self.clients.get(address)
        if found is None:
            seed = self.seed
            host, port = split_address(address)
            found = AsyncClient(host, port, seed._token, min(seed.timeout, OWNER_TIMEOUT_S),
                                tls=seed._tls)
            self.clients[address] = found
        return found

    def take(self, found: PartitionMap) -> None:
        """Use a map answered by an instance (ignored when older than the one held)."""
        if found.version < self.version and found.slots == self.slots:
            return
        clients = [self._client_for(a) for a in found.addresses]
        self.owners = [clients[i] if 0 <= i < len(clients) else None for i in found.owners]
        self.slots = found.slots if self.owners else 0
        self.version = found.version
        self.refreshes += 1
        for address in [a for a in self.clients if a not in set(found.addresses)]:
            asyncio.ensure_future(self.clients.pop(address).close())

    async def refresh(self) -> None:
        """Fetch the map from the seed instance, else from any instance known."""
        for client in [self.seed, *self.clients.values()]:
            try:
                self.take(await client._request(GetPartitionMap, PartitionMap))
                return
            except AngoError as exc:
                log.debug("partition map from %s:%s failed: %s", client.host, client.port, exc)

    def stale(self) -> None:
        """The map is out of date: fetch it again soon (one fetch at a time)."""
        loop = asyncio.get_running_loop()
        if self._refreshing is not None or loop.time() - self._last_refresh < \
                REFRESH_AT_MOST_EVERY_S:
            return
        self._last_refresh = loop.time()
        self._refreshing = loop.create_task(self.refresh())
        self._refreshing.add_done_callback(self._refreshed)

    def _refreshed(self, task: asyncio.Task) -> None:
        self._refreshing = None
        if not task.cancelled():
            task.exception()  # logged inside; never left unretrieved

    def owner_of(self, batch_id: str, customer_id: str) -> AsyncClient | None:
        """The client of the instance owning the claim's slot (None: unknown)."""
        if not self.slots:
            return None
        canonical = _canonical(batch_id)
        if canonical is None:
            return None
        return self.owners[zlib.crc32(f"{canonical}/{customer_id}".encode()) % self.slots]

    async def claim(self, batch_id: str, customer_id: str, client_id: str | None,
                    request_id: str) -> str | None:
        """The code, from the owner; None when the owner could not answer (the caller
        then sends the claim through the seed, with the same request id)."""
        owner = self.owner_of(batch_id, customer_id)
        if owner is None:
            return None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + owner.timeout
        try:
            conn = owner._conn
            if conn is None or conn.closed:
                conn = await owner._connection(deadline)
            resp: Any = await conn.request(
                Claim(conn.new_id(), batch_id, customer_id, client_id, request_id), deadline)
        except AngoError as exc:
            if not exc.retryable:
                raise
            resp = None
        except Exception:  # lost, refused, late: the map may be stale
            resp = None
        if type(resp) is Code:
            if resp.moved:
                self.stale()
            return resp.code
        if type(resp) is Error:
            from ango.client import _failure

            exc = _failure(resp)
            if not exc.retryable:
                raise exc
        self.rerouted += 1
        self.stale()
        return None

    async def close(self) -> None:
        """Close every owner's connection."""
        if self._refreshing is not None:
            self._refreshing.cancel()
        await asyncio.gather(*(c.close() for c in self.clients.values()), return_exceptions=True)
        self.clients.clear()
