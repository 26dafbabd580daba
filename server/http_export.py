"""``GET /api/v1/batches/{id}/export``: a batch's codes streamed as they leave PostgreSQL.

``ango.export.export_codes`` (one ``COPY … TO STDOUT``, constant memory) runs
in a worker thread and writes into a :class:`Spout`, a bounded queue of chunks
(at most :data:`SPOUT_CHUNKS` of up to 1 MiB, the exporter's own write size):
the thread waits while the client is behind, so memory stays constant whatever
the batch's size. The answer goes out as ASGI ``more_body`` chunks (HTTP/1.1
chunked encoding). An error before the first chunk is an ordinary JSON error;
one after it (PostgreSQL gone mid-export) can no longer change the status, so
the connection is closed without the final chunk and the client sees a
truncated transfer, never a short file that looks complete.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from ango import database
from ango.errors import AngoError
from ango.export import export_codes

log = logging.getLogger("ango.server.http")

#: Chunks waiting for the client at most, per export.
SPOUT_CHUNKS = 2
_END = object()


class ExportStopped(AngoError):
    """The client went away (or the server stopped): the export ends early."""

    code = "cancelled"


class Spout:
    """Bytes from a writing thread to the event loop, at most ``limit`` chunks waiting.

    The thread side is a binary file (``write``, ``flush``) that blocks while
    the queue is full, then :meth:`finish`; the loop side awaits :meth:`next`
    and calls :meth:`stop` when it will read no more (the thread's next write
    then raises ExportStopped, which ends the COPY).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, limit: int = SPOUT_CHUNKS) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[Any] = asyncio.Queue(limit)
        self._stopped = False

    # --- the thread side ---------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Queue a copy of ``data`` (the exporter reuses its buffer), waiting for room."""
        if len(data):
            self._put(bytes(data))
        return len(data)

    def flush(self) -> None:
        """Nothing to flush: every write is queued whole."""

    def finish(self, error: BaseException | None = None) -> None:
        """The export ended (with ``error`` if it failed)."""
        try:
            self._put(_END if error is None else error)
        except ExportStopped:
            pass  # nobody reads any more

    def _put(self, item: Any) -> None:
        if self._stopped:
            raise ExportStopped("the client went away")
        future = asyncio.run_coroutine_threadsafe(self._queue.put(item), self._loop)
        while True:
            try:
                future.result(timeout=1.0)
                return
            except concurrent.futures.TimeoutError:
                # A reader that stopped drains the queue, so the put completes;
                # a loop that stopped never will: give up rather than hang the thread.
                if not self._loop.is_running():
                    future.cancel()
                    raise ExportStopped("the server stopped") from None

    # --- the loop side -----------------------------------------------------------------

    async def next(self) -> bytes | None:
        """The next chunk, None at the end; raises the export's error."""
        item = await self._queue.get()
        if item is _END:
            return None
        if isinstance(item, BaseException):
            raise item
        return item

    def stop(self) -> None:
        """Read no more: the writing thread stops at its next write."""
        self._stopped = True
        while not self._queue.empty():  # wakes a thread waiting for room
            self._queue.get_nowait()


def run_export(dsn: str, batch_id: str, what: str, fmt: str, spout: Spout) -> None:
    """The worker thread's part: export into ``spout``, then tell it how it ended."""
    try:
        with database.connect(dsn, autocommit=True) as conn:
            export_codes(conn, batch_id, what, spout, fmt)
    except BaseException as exc:  # noqa: BLE001 - handed to the loop, which answers it
        spout.finish(exc)
    else:
        spout.finish()


class Streamed:
    """A response body sent in chunks as an export produces them."""

    __slots__ = ("first", "spout", "headers", "on_end")

    def __init__(self, first: bytes | None, spout: Spout, headers: list[tuple[bytes, bytes]],
                 on_end: Callable[[], None]) -> None:
        self.first = first      # the first chunk, read before the status was chosen
        self.spout = spout
        self.headers = headers  # content-type included
        self.on_end = on_end    # called once, however the stream ends

    async def send(self, send: Callable[[dict], Awaitable[None]],
                   receive: Callable[[], Awaitable[dict]], status: int, timeout: float) -> None:
        """Send the answer; stop when the client goes away or reads nothing for ``timeout`` s."""
        gone = asyncio.ensure_future(_disconnected(receive))
        try:
            await send({"type": "http.response.start", "status": status,
                        "headers": self.headers})
            chunk = self.first
            while chunk is not None:
                if gone.done():
                    return  # nobody to send to: stop the export (finally)
                await asyncio.wait_for(
                    send({"type": "http.response.body", "body": chunk, "more_body": True}),
                    timeout)
                chunk = await self.spout.next()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except TimeoutError:
            log.warning("HTTP export: the client read nothing for %g s; closed", timeout)
        except Exception as exc:  # noqa: BLE001 - the status is sent: close, unfinished
            log.warning("HTTP export failed after its first bytes: %s", exc)
        finally:
            gone.cancel()
            self.spout.stop()
            self.on_end()


async def _disconnected(receive: Callable[[], Awaitable[dict]]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
