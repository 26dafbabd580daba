"""An instance's part in the cluster: its heartbeat and its fair share of routing slots.

Every beat (about once a second) the instance writes its heartbeat, reads the
map (live instances and slot owners) from PostgreSQL, takes slots that have no
live owner while it is below its fair share, and hands slots above it to a live
instance below its share: it stops serving them, waits for their claims in
flight, then writes the new owner (epoch + 1). An instance silent for 3 s, or
whose PostgreSQL session is gone, is not live, so its slots are taken within
about 4 s. On a clean stop it releases every slot after draining.

None of this is needed for correctness: PostgreSQL arbitrates every claim.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg

from ango.cluster.router import Router
from ango.cluster.slots import fair_shares, plan
from ango.sql import queries

log = logging.getLogger("ango.cluster")

#: Seconds between beats.
BEAT_S = 1.0
#: Seconds without a beat after which an instance is dead (the view ango.live_instances).
DEAD_S = 3.0
#: Seconds one beat may take before it counts as failed.
BEAT_TIMEOUT_S = 2.0
#: Seconds a hand-over waits for the claims in flight of the slots it hands over.
DRAIN_TIMEOUT_S = 5.0


class Membership:
    """Heartbeat, map and slot moves of one instance (see the module docstring)."""

    def __init__(self, name: str, address: str, dsn: str, router: Router,
                 drain: Callable[[list[int]], Awaitable[None]]) -> None:
        """``drain(slots)``: wait for the claims in flight of ``slots`` served here."""
        self.name = name
        self.address = address
        self.dsn = dsn
        self.router = router
        self._drain = drain
        self._conn: psycopg.AsyncConnection | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.joined = False
        self.last_beat = 0.0  # monotonic time of the last beat that reached PostgreSQL
        self.beats = 0
        self.failures = 0
        self.taken = 0
        self.handed_over = 0
        self.live: dict[str, str] = {}
        self._warned = -3600.0  # when a shared instance name was last logged

    async def start(self) -> None:
        """First beat (joins the map), then one every BEAT_S in the background."""
        try:
            await asyncio.wait_for(self._beat(), BEAT_TIMEOUT_S * 5)
        except Exception as exc:
            log.warning("cluster: first beat failed (%s); retrying in the background", exc)
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while not self._closing:
            await asyncio.sleep(BEAT_S)
            if self._closing:
                return
            try:
                await asyncio.wait_for(self._beat(), BEAT_TIMEOUT_S)
            except Exception as exc:  # this loop must not die: reconnect next beat
                self.failures += 1
                await self._drop_connection()
                if self.joined and time.monotonic() - self.last_beat > DEAD_S:
                    log.warning("cluster: no beat reached PostgreSQL for %.1f s (%s): the "
                                "others take our slots; forwarding their claims to them",
                                time.monotonic() - self.last_beat, exc)
                    self.joined = False
                    self.router.detach()

    async def _connection(self) -> psycopg.AsyncConnection:
        if self._conn is None or self._conn.closed:
            self._conn = await psycopg.AsyncConnection.connect(
                self.dsn, autocommit=True, connect_timeout=2)
        return self._conn

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await conn.close()
            except Exception:
                pass

    async def _read_map(self, conn: psycopg.AsyncConnection
                        ) -> tuple[list[str | None], dict[str, str], int]:
        cur = await conn.execute(queries["instance_beat"],
                                 {"name": self.name, "address": self.address})
        if (await cur.fetchone())[0] and time.monotonic() - self._warned > 60:
            self._warned = time.monotonic()
            log.error("cluster: another live process uses the instance name %r: give each "
                      "instance its own (--instance-name, ANGO_INSTANCE_NAME); until then both "
                      "serve the same slots (PostgreSQL keeps the claims correct)", self.name)
        live = dict(await (await conn.execute(queries["live_instances"])).fetchall())
        rows = await (await conn.execute(queries["routing_map"])).fetchall()
        return [row[1] for row in rows], live, sum(row[2] for row in rows)

    async def _beat(self) -> None:
        conn = await self._connection()
        owners, live, version = await self._read_map(conn)
        self.last_beat = time.monotonic()
        self.live = live
        self.beats += 1
        if self.name not in live:  # our row is written but not yet visible as live: next beat
            self.router.apply(owners, live, version)
            return
        moves = plan(self.name, owners, list(live))
        if moves.take:
            rows = await (await conn.execute(
                queries["take_slots"], {"me": self.name, "slots": moves.take})).fetchall()
            for (slot,) in rows:
                owners[slot] = self.name
                version += 1
            self.taken += len(rows)
        for to, slots in moves.give.items():
            self.router.hold(slots)
            try:
                try:
                    await asyncio.wait_for(self._drain(slots), DRAIN_TIMEOUT_S)
                except TimeoutError:
                    log.warning("cluster: claims of %d slot(s) still in flight after %.0f s; "
                                "handing them over anyway (PostgreSQL keeps them correct)",
                                len(slots), DRAIN_TIMEOUT_S)
                rows = await (await conn.execute(
                    queries["hand_over_slots"],
                    {"me": self.name, "to": to, "slots": slots})).fetchall()
            except BaseException:  # failed or cancelled: serve them here again
                self.router.release_held(slots)
                raise
            for (slot,) in rows:
                owners[slot] = to
                version += 1
            self.handed_over += len(rows)
            log.info("cluster: handed %d slot(s) to %s", len(rows), to)
        self.router.apply(owners, live, version)
        if not self.joined:
            self.joined = True
            log.info("cluster: %s at %s joined; owns %d of %d slots; %d instance(s) live",
                     self.name, self.address, len(self.router.mine), len(owners), len(live))
        if self.beats % 600 == 1:
            await conn.execute(queries["forget_old_instances"])

    async def leave(self) -> None:
        """Stop beating and release every slot (after the claims in flight were answered)."""
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except BaseException:
                pass
        try:
            conn = await asyncio.wait_for(self._connection(), BEAT_TIMEOUT_S)
            await asyncio.wait_for(conn.execute(queries["release_slots"], {"me": self.name}),
                                   BEAT_TIMEOUT_S)
            await asyncio.wait_for(conn.execute(queries["leave_cluster"], {"me": self.name}),
                                   BEAT_TIMEOUT_S)
            log.info("cluster: %s released its slots and left", self.name)
        except Exception as exc:  # the others take them when our heartbeat goes stale
            log.warning("cluster: could not release our slots (%s); the others take them "
                        "within %.0f s", exc, DEAD_S + BEAT_S)
        await self._drop_connection()
        await self.router.close()

    def stats(self) -> dict[str, Any]:
        """What `ango stats` shows of the cluster."""
        owned = len(self.router.mine)
        share = fair_shares(list(self.live), self.router.slots).get(self.name)
        return {
            "instance": self.name, "address": self.address, "joined": self.joined,
            "slots": self.router.slots, "slots_owned": owned, "fair_share": share,
            "instances_live": sorted(self.live), "map_version": self.router.version,
            "beats": self.beats, "beat_failures": self.failures,
            "slots_taken": self.taken, "slots_handed_over": self.handed_over,
            "seconds_since_beat": (round(time.monotonic() - self.last_beat, 3)
                                   if self.last_beat else None),
            "peers": self.router.stats(),
        }
