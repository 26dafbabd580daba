"""Is PostgreSQL there? One watcher per Allocator, for readiness and the log.

The watcher asks PostgreSQL a trivial question every second on a connection of
its own (reconnecting as needed) and on demand from :meth:`DatabaseWatch.check`
(readiness probes). It logs an outage once when it starts (warning) and once
when it ends (info), however many claims wait meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import psycopg

from ango.background import stop_task
from ango.sql import queries

log = logging.getLogger("ango.health")

CHECK_EVERY_S = 1.0
CHECK_TIMEOUT_S = 1.0


def describe_dsn(dsn: str) -> str:
    """``host:port/dbname`` of a DSN, never its password (for logs)."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "?"
    host = params.get("host") or params.get("hostaddr") or "localhost"
    return f"{host}:{params.get('port') or 5432}/{params.get('dbname') or params.get('user') or ''}"


class DatabaseWatch:
    """Tracks whether PostgreSQL answers; see the module docstring."""

    def __init__(self, dsn: str, *, every: float = CHECK_EVERY_S,
                 timeout: float = CHECK_TIMEOUT_S) -> None:
        self.dsn = dsn
        self.every = every
        self.timeout = timeout
        self.up = True  # the Allocator has just migrated through it
        self.error: str | None = None
        self.down_since: float | None = None
        self.version: str | None = None
        self.last_ok: float | None = None
        self._conn: psycopg.AsyncConnection | None = None
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Check once (reading the server version), then every ``every`` seconds."""
        await self.check()
        self._task = asyncio.create_task(self._loop())

    async def close(self) -> None:
        """Stop watching and close the connection."""
        await stop_task(self._task)
        self._task = None
        await self._drop()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.every)
            await self.check()

    async def check(self, timeout: float | None = None) -> str | None:
        """Ask PostgreSQL now (within ``timeout``, else the watch's own); None if it
        answered, else why not."""
        async with self._lock:
            try:
                await asyncio.wait_for(self._ping(), timeout or self.timeout)
            except (psycopg.Error, OSError, TimeoutError) as exc:
                await self._drop()
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else (
                    f"no answer within {self.timeout:g} s")
                self._went_down(reason)
                return reason
            self._came_back()
            return None

    async def _ping(self) -> None:
        if self._conn is None or self._conn.closed:
            self._conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
            if self.version is None:
                row = await (await self._conn.execute(queries["server_version"])).fetchone()
                self.version = row[0]
        await self._conn.execute(queries["ping"])

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 1.0)

    def _went_down(self, reason: str) -> None:
        self.error = reason
        if self.up:
            self.up = False
            self.down_since = time.monotonic()
            log.warning("database %s unreachable: %s; claims wait for it, then answer "
                        "unavailable", describe_dsn(self.dsn), reason,
                        extra={"event": "database_down", "reason": reason})

    def _came_back(self) -> None:
        self.last_ok = time.monotonic()
        self.error = None
        if not self.up:
            self.up = True
            down = time.monotonic() - (self.down_since or time.monotonic())
            self.down_since = None
            log.info("database %s reachable again after %.1f s", describe_dsn(self.dsn), down,
                     extra={"event": "database_up", "outage_s": round(down, 1)})
