"""Cluster-aware routing for ``ango.Client`` and ``ango.AsyncClient`` (``cluster=True``).

The client fetches the ``partition_map`` (docs/PROTOCOL.md), keeps one
connection per owning instance and sends each claim straight to the owner of
its routing slot. A ``moved`` hint on an answer, or an owner that cannot be
reached, makes it fetch the map again; the claim itself is then sent through
the instance the client was given (which forwards it) with the same request
id, so a move never fails a claim and never yields a second code.

With ``direct=True`` it also keeps one direct connection per (owning instance,
shard) (docs/PROTOCOL.md, "Direct connections to a shard") and sends each claim
straight to the shard process holding its customer's counters; anything but an
answer to the claim there (a connection that fails, a shard killed, a timeout,
a retryable error) sends it the instance's way, with the same request id.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
import zlib
from typing import TYPE_CHECKING, Any

from ango.errors import AngoError
from ango.protocol import Claim, Code, Error, GetPartitionMap, PartitionMap

if TYPE_CHECKING:
    from ango.client import AsyncClient, Client

log = logging.getLogger("ango.client")

#: Seconds between two map fetches at least (hints come in bursts).
REFRESH_AT_MOST_EVERY_S = 0.2
#: Seconds after which a map is fetched again even without a hint (new instances).
MAP_MAX_AGE_S = 10.0
#: Seconds an owner gets (connecting and answering) before its claim goes another way.
OWNER_TIMEOUT_S = 2.0

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


class PartitionTable:
    """The map as the client holds it: the owner's address of each routing slot."""

    def __init__(self) -> None:
        self.version = -1
        self.slots = 0
        self.owners: list[str | None] = []
        self.updates = 0

    def update(self, found: dict[str, Any]) -> bool:
        """Take a ``partition_map_reply``'s fields; False (kept) when older than ours."""
        if found["version"] < self.version and found["slots"] == self.slots:
            return False
        addresses = found["addresses"]
        self.owners = [addresses[i] if 0 <= i < len(addresses) else None
                       for i in found["owners"]]
        self.slots = found["slots"] if self.owners else 0
        self.version = found["version"]
        self.updates += 1
        return True

    def address_of(self, claim_hash: int | None) -> str | None:
        """The owner's address of the claim's slot (None: unknown, ask any instance)."""
        if not self.slots or claim_hash is None:
            return None
        return self.owners[claim_hash % self.slots]


def hash_of(batch_id: str, customer_id: str) -> int | None:
    """The hash a claim's routing slot and shard are taken from (None: not a UUID)."""
    canonical = _canonical(batch_id)
    if canonical is None:
        return None
    return zlib.crc32(f"{canonical}/{customer_id}".encode())


def shard_of(layout: tuple[int, int], claim_hash: int) -> int | None:
    """The shard of an instance of ``layout`` (shards, partitions) holding the claim's
    customer (None: the layout is not known)."""
    shards, partitions = layout
    if not shards or not partitions:
        return None
    return claim_hash % partitions % shards


def _fields(found: PartitionMap) -> dict[str, Any]:
    return {"version": found.version, "slots": found.slots, "addresses": found.addresses,
            "owners": found.owners}


class ClaimRoutes:
    """The map and one connection per owning instance, for an AsyncClient."""

    def __init__(self, seed: AsyncClient, direct: bool = False) -> None:
        self.seed = seed
        self.table = PartitionTable()
        self.clients: dict[str, AsyncClient] = {}
        self._refreshing: asyncio.Task | None = None
        self._last_refresh = 0.0
        self.rerouted = 0
        #: Direct connections (issue 13): not over TLS, where the server keeps them.
        self.direct = direct and seed._tls is None
        self.shard_clients: dict[tuple[str, int], AsyncClient] = {}
        #: Claims that went the instance's way because their direct connection failed.
        self.direct_failed = 0

    def _client_for(self, address: str) -> AsyncClient:
        from ango.client import AsyncClient
        from ango.cluster.forwarding import split_address

        found = self.clients.get(address)
        if found is None:
            host, port = split_address(address)
            found = AsyncClient(host, port, self.seed._token, OWNER_TIMEOUT_S, tls=self.seed._tls)
            self.clients[address] = found
        return found

    async def refresh(self) -> None:
        """Fetch the map from the seed instance, else from any instance known."""
        self._last_refresh = asyncio.get_running_loop().time()
        for client in [self.seed, *self.clients.values()]:
            try:
                found = await client._request(GetPartitionMap, PartitionMap)
            except AngoError as exc:
                log.debug("partition map from %s:%s failed: %s", client.host, client.port, exc)
                continue
            if self.table.update(_fields(found)):
                live = set(found.addresses)
                for address in [a for a in self.clients if a not in live]:
                    asyncio.ensure_future(self.clients.pop(address).close())
                for key in [k for k in self.shard_clients if k[0] not in live]:
                    asyncio.ensure_future(self.shard_clients.pop(key).close())
            return

    def stale(self) -> None:
        """The map is out of date: fetch it again soon (one fetch at a time)."""
        loop = asyncio.get_running_loop()
        if self._refreshing is not None or \
                loop.time() - self._last_refresh < REFRESH_AT_MOST_EVERY_S:
            return
        self._last_refresh = loop.time()
        self._refreshing = loop.create_task(self.refresh())
        self._refreshing.add_done_callback(self._refreshed)

    def _refreshed(self, task: asyncio.Task) -> None:
        self._refreshing = None
        if not task.cancelled():
            task.exception()  # failures are logged inside; never left unretrieved

    async def claim(self, batch_id: str, customer_id: str, client_id: str | None,
                    request_id: str) -> str | None:
        """The code, from the owner; None when the owner could not answer (the caller
        then sends the claim through the seed, with the same request id)."""
        loop = asyncio.get_running_loop()
        if loop.time() - self._last_refresh > MAP_MAX_AGE_S:
            self.stale()
        claim_hash = hash_of(batch_id, customer_id)
        address = self.table.address_of(claim_hash)
        if address is None:
            return None
        owner = self._client_for(address)
        if self.direct:
            shard = shard_of(owner.layout, claim_hash)  # known once the owner was connected
            if shard is not None:
                code = await self._claim_direct(address, shard, batch_id, customer_id,
                                                client_id, request_id)
                if code is not None:
                    return code
        deadline = loop.time() + OWNER_TIMEOUT_S
        resp: Any = None
        try:
            resp = await owner._send_once(
                lambda i: Claim(i, batch_id, customer_id, client_id, request_id), deadline)
        except AngoError as exc:
            if not exc.retryable:
                raise
        except Exception:  # noqa: S110 - lost, refused, late: the map may be stale
            pass
        if type(resp) is Code:
            if resp.moved:
                self.stale()
            return resp.code
        if type(resp) is Error:
            from ango.client import _failure

            failure = _failure(resp)
            if not failure.retryable:
                raise failure
        self.rerouted += 1
        self.stale()
        return None

    async def _claim_direct(self, address: str, shard: int, batch_id: str, customer_id: str,
                            client_id: str | None, request_id: str) -> str | None:
        """The code, from the shard's direct connection; None: send it the instance's way.

        Only an answer to the claim that is final (a code, or an error such as
        ``batch_exhausted``) ends here; nothing the direct path does fails a claim.
        """
        from ango.client import AsyncClient, _failure
        from ango.cluster.forwarding import split_address

        client = self.shard_clients.get((address, shard))
        if client is None:
            host, port = split_address(address)
            client = AsyncClient(host, port, self.seed._token, OWNER_TIMEOUT_S, shard=shard)
            self.shard_clients[(address, shard)] = client
        deadline = asyncio.get_running_loop().time() + OWNER_TIMEOUT_S
        resp: Any = None
        try:
            resp = await client._send_once(
                lambda i: Claim(i, batch_id, customer_id, client_id, request_id), deadline)
        except Exception:  # noqa: S110 - lost, refused, late, a shard killed: the other way
            pass
        if type(resp) is Code:
            return resp.code
        if type(resp) is Error and resp.id is not None:
            failure = _failure(resp)
            if not failure.retryable:
                raise failure
        self.direct_failed += 1
        return None

    async def close(self) -> None:
        """Close every owner's connection."""
        if self._refreshing is not None:
            self._refreshing.cancel()
        await asyncio.gather(*(c.close() for c in [*self.clients.values(),
                                                   *self.shard_clients.values()]),
                             return_exceptions=True)
        self.clients.clear()
        self.shard_clients.clear()


class SyncClaimRoutes:
    """The map and one connection per owning instance, for a blocking Client."""

    def __init__(self, seed: Client, direct: bool = False) -> None:
        self.seed = seed
        self.table = PartitionTable()
        self.clients: dict[str, Client] = {}
        self._last_refresh = 0.0
        self.rerouted = 0
        self.direct = direct and seed._tls is None
        self.shard_clients: dict[tuple[str, int], Client] = {}
        self.direct_failed = 0

    def refresh(self) -> None:
        """Fetch the map from the seed instance (kept as it is if that fails)."""
        self._last_refresh = time.monotonic()
        try:
            found = self.seed.partition_map()
        except AngoError as exc:
            log.debug("partition map from %s:%s failed: %s", self.seed.host, self.seed.port, exc)
            return
        if self.table.update(found):
            live = set(found["addresses"])
            for address in [a for a in self.clients if a not in live]:
                self.clients.pop(address).close()
            for key in [k for k in self.shard_clients if k[0] not in live]:
                self.shard_clients.pop(key).close()

    def stale(self) -> None:
        """The map is out of date: fetch it again (at most every REFRESH_AT_MOST_EVERY_S)."""
        if time.monotonic() - self._last_refresh >= REFRESH_AT_MOST_EVERY_S:
            self.refresh()

    def claim(self, batch_id: str, customer_id: str, client_id: str | None,
              request_id: str) -> str | None:
        """As :meth:`ClaimRoutes.claim`, blocking."""
        from ango.client import Client
        from ango.cluster.forwarding import split_address

        if time.monotonic() - self._last_refresh > MAP_MAX_AGE_S:
            self.refresh()
        claim_hash = hash_of(batch_id, customer_id)
        address = self.table.address_of(claim_hash)
        if address is None:
            return None
        try:
            owner = self.clients.get(address)
            if owner is None:
                host, port = split_address(address)
                owner = Client(host, port, self.seed._token, OWNER_TIMEOUT_S,
                               tls=self.seed._tls)
                self.clients[address] = owner
            shard = shard_of(owner.layout, claim_hash) if self.direct else None
            if shard is not None:
                code = self._claim_direct(address, shard, batch_id, customer_id, client_id,
                                          request_id)
                if code is not None:
                    return code
            resp = owner._request(
                lambda i: Claim(i, batch_id, customer_id, client_id, request_id), Code)
        except AngoError as exc:
            if not exc.retryable:
                raise
            self.rerouted += 1
            self.stale()
            return None
        if resp.moved:
            self.stale()
        return resp.code

    def _claim_direct(self, address: str, shard: int, batch_id: str, customer_id: str,
                      client_id: str | None, request_id: str) -> str | None:
        """As :meth:`ClaimRoutes._claim_direct`, blocking."""
        from ango.client import Client
        from ango.cluster.forwarding import split_address

        try:
            client = self.shard_clients.get((address, shard))
            if client is None:
                host, port = split_address(address)
                client = Client(host, port, self.seed._token, OWNER_TIMEOUT_S, shard=shard)
                self.shard_clients[(address, shard)] = client
            return client._request(
                lambda i: Claim(i, batch_id, customer_id, client_id, request_id), Code).code
        except Exception:  # noqa: S110 - lost, refused, late, a shard killed: the other way
            pass  # (a final error, e.g. batch_exhausted, is told again by the instance)
        self.direct_failed += 1
        return None

    def close(self) -> None:
        """Close every owner's connection."""
        for client in [*self.clients.values(), *self.shard_clients.values()]:
            client.close()
        self.clients.clear()
        self.shard_clients.clear()
