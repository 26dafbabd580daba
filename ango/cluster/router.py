"""Which instance serves the claims of each routing slot, as this instance sees it.

The route of a slot is ``None`` (served here: we own it, or it has no live
owner), a :class:`Peer` (forwarded to its owner), or ``HOLD`` while we hand the
slot over (its claims wait until the claims in flight for it are answered, at
most a bounded number of them). Only where counters live depends on this;
PostgreSQL arbitrates every claim whoever serves it.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable, Iterable
from typing import Any

from ango.cluster.forwarding import Peer

log = logging.getLogger("ango.cluster")

#: The route of a slot being handed over.
HOLD = object()
#: Claims held during hand-overs at most; more are served here at once.
MAX_HELD = 10_000


class Router:
    """Routes per slot, the peers, and the claims held during a hand-over."""

    def __init__(self, me: str, slots: int, token: str,
                 forget: Callable[[list[int]], None], tls: ssl.SSLContext | None = None) -> None:
        """``forget(slots)``: drop the shards' counters of slots we no longer own;
        ``tls``: the client context peers are reached with (None: plain text)."""
        self._tls = tls
        self.me = me
        self.slots = slots
        self.routes: list[Any] = [None] * slots
        self.mine: set[int] = set()
        self.peers: dict[str, Peer] = {}
        self.held: list[tuple[int, Callable[[], None], Callable[[], None]]] = []
        self._token = token
        self._forget = forget
        self.owners: list[str | None] = [None] * slots
        self.addresses: dict[str, str] = {}
        self.version = 0

    def route(self, slot: int, batch_id: str, customer_id: str, client_id: str | None,
              request_id: str, future: asyncio.Future[str], local: Callable[[], None]) -> bool:
        """Send the claim where its slot is served; True when that is not here."""
        target = self.routes[slot]
        if target is None:
            local()
            return False
        if target is HOLD:
            if len(self.held) >= MAX_HELD:
                local()
            else:
                self.held.append((slot, lambda: self.route(
                    slot, batch_id, customer_id, client_id, request_id, future, local), local))
            return True
        target.forward(batch_id, customer_id, client_id, request_id, future, local)
        return True

    def hold(self, slots: Iterable[int]) -> None:
        """Stop serving ``slots`` here: their new claims wait for :meth:`apply`."""
        for s in slots:
            self.routes[s] = HOLD

    def apply(self, owners: list[str | None], live: dict[str, str], version: int) -> None:
        """Take a map read from PostgreSQL: ``owners`` per slot, ``live`` name -> address."""
        self.owners, self.addresses, self.version = owners, live, version
        for name, address in live.items():
            peer = self.peers.get(name)
            if name != self.me and (peer is None or peer.address != address):
                if peer is not None:
                    asyncio.ensure_future(peer.close())
                self.peers[name] = peer = Peer(name, address, self._token, self._tls)
                peer.connect()  # before its first claim: those would be served here
        for name in [n for n in self.peers if n not in live]:
            asyncio.ensure_future(self.peers.pop(name).close())
        mine = set()
        routes: list[Any] = [None] * self.slots
        for slot, owner in enumerate(owners):
            if owner == self.me:
                mine.add(slot)
            elif owner is not None and owner in self.peers:
                routes[slot] = self.peers[owner]
        self._settle(routes, mine)

    def detach(self) -> None:
        """We lost PostgreSQL: the others take our slots; send their claims to the others."""
        peers = sorted(self.peers.values(), key=lambda p: p.name)
        routes = list(self.routes)
        for slot in self.mine:
            routes[slot] = peers[slot % len(peers)] if peers else None
        routes = [None if r is HOLD else r for r in routes]
        self._settle(routes, set())

    def _settle(self, routes: list[Any], mine: set[int]) -> None:
        lost = sorted(self.mine - mine)
        self.routes, self.mine = routes, mine
        if lost:
            self._forget(lost)
        held, self.held = self.held, []
        for _, again, _ in held:
            again()

    def release_held(self, slots: Iterable[int]) -> None:
        """A hand-over failed: serve ``slots`` here again, and what waited for them."""
        chosen = set(slots)
        for s in chosen:
            if self.routes[s] is HOLD:
                self.routes[s] = None
        keep = []
        for slot, again, local in self.held:
            if slot in chosen:
                local()
            else:
                keep.append((slot, again, local))
        self.held = keep

    def stats(self) -> dict[str, Any]:
        """Forwarding counters, per peer."""
        return {name: {"address": p.address, "forwarded": p.forwarded,
                       "served_here_instead": p.fallbacks, "in_flight": p.in_flight}
                for name, p in sorted(self.peers.items())}

    async def close(self) -> None:
        """Serve here what still waits for a hand-over; close the peers' connections."""
        held, self.held = self.held, []
        for _, _, local in held:
            local()
        await asyncio.gather(*(p.close() for p in self.peers.values()), return_exceptions=True)
        self.peers.clear()
