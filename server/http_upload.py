"""``POST /api/v1/codes/upload``: a multipart CSV streamed into the COPY importer.

The request body is parsed as it arrives (python-multipart's streaming
parser). The file part goes to ``ango.importer.import_codes``, which runs in a
worker thread and reads it through :class:`Pipe`, a bounded byte queue: the
event loop waits when the importer is behind, so memory stays constant
whatever the file's size. When the form's text fields come after the file
(the importer needs the batch name before the first row), the file is spooled
to a temporary file on disk instead and imported from there at the end; still
constant memory.

The batch's client is the form field ``client_id`` if given, else the
``client_id`` of the CSV's first row (the original's CSV carries it on every
row; the importer checks every row against it).
"""

from __future__ import annotations

import asyncio
import collections
import csv
import io
import tempfile
import threading
from collections.abc import Awaitable, Callable
from typing import Any, BinaryIO

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from ango.errors import AngoError
from ango.importer import ImportResult, import_codes, parse_uuid, top_up

#: Bytes of the file waiting for the importer at most (the pipe's bound).
PIPE_BYTES = 1 << 20
#: Largest text field (batch_name, rules, client_id, starts_at, expires_at).
MAX_FIELD_BYTES = 64 * 1024
#: The file's first bytes kept to find the client id of its first row.
MAX_PREFIX_BYTES = 128 * 1024
_FIELDS = ("batch_name", "rules", "client_id", "starts_at", "expires_at")


class UploadError(AngoError):
    """The upload was refused before anything was imported."""

    code = "invalid_input"


class TooLarge(AngoError):
    """The request body is larger than allowed."""

    code = "payload_too_large"


class Pipe(io.RawIOBase):
    """Bytes from the event loop to a reading thread, at most ``limit`` waiting.

    The loop side calls ``await write(data)`` (waits while the pipe is full)
    and ``end()`` at the end, or ``abort(exc)``; the thread side reads it as
    a blocking file (wrap it in ``io.BufferedReader`` for ``readline``). When
    the reader stops early it calls ``stop_reading()`` and writes are dropped.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, limit: int = PIPE_BYTES) -> None:
        super().__init__()
        self._loop = loop
        self._limit = limit
        self._chunks: collections.deque[memoryview] = collections.deque()
        self._size = 0
        self._cond = threading.Condition()
        self._eof = False
        self._error: BaseException | None = None
        self._reader_gone = False
        self._space = asyncio.Event()
        self._space.set()

    def readable(self) -> bool:  # noqa: D102
        return True

    def readinto(self, buffer: Any) -> int:  # noqa: D102
        out = memoryview(buffer).cast("B")
        with self._cond:
            while not self._chunks and not self._eof and self._error is None:
                self._cond.wait()
            if self._error is not None:
                raise self._error
            if not self._chunks:
                return 0
            n = 0
            while self._chunks and n < len(out):
                chunk = self._chunks[0]
                take = min(len(chunk), len(out) - n)
                out[n:n + take] = chunk[:take]
                n += take
                if take == len(chunk):
                    self._chunks.popleft()
                else:
                    self._chunks[0] = chunk[take:]
            was_full = self._size >= self._limit
            self._size -= n
            if was_full and self._size < self._limit:
                self._loop.call_soon_threadsafe(self._space.set)
            return n

    def stop_reading(self) -> None:
        """Called by the reading thread when it will read no more."""
        with self._cond:
            self._reader_gone = True
            self._chunks.clear()
            self._size = 0
        self._loop.call_soon_threadsafe(self._space.set)

    async def write(self, data: bytes) -> None:
        """Queue ``data`` for the reader, waiting while ``limit`` bytes are queued."""
        while True:
            await self._space.wait()
            with self._cond:
                if self._reader_gone:
                    return
                if self._size < self._limit:
                    self._chunks.append(memoryview(data))
                    self._size += len(data)
                    if self._size >= self._limit:
                        self._space.clear()
                    self._cond.notify()
                    return
                self._space.clear()

    def end(self) -> None:
        """No more data: the reader gets end of file once it has read the rest."""
        with self._cond:
            self._eof = True
            self._cond.notify()

    def abort(self, exc: BaseException) -> None:
        """The reader's next read raises ``exc`` (the client went away)."""
        with self._cond:
            self._error = exc
            self._cond.notify()


def client_of_first_row(prefix: bytes) -> str | None:
    """The ``client_id`` field of the first row under a CSV header naming it, if any."""
    lines = prefix.split(b"\n", 2)
    if len(lines) < 2:
        return None
    try:
        header, first = (line.decode("utf-8-sig").strip("\r") for line in lines[:2])
        names = [name.strip().lower() for name in next(csv.reader([header]))]
        row = next(csv.reader([first]))
    except (UnicodeDecodeError, csv.Error, StopIteration):
        return None  # the importer names the line and what is wrong with it
    if "client_id" not in names or len(row) <= names.index("client_id"):
        return None
    return row[names.index("client_id")].strip()


class _Part:
    __slots__ = ("name", "filename", "header_name", "header_value", "value")

    def __init__(self) -> None:
        self.name: str | None = None
        self.filename: str | None = None
        self.header_name = bytearray()
        self.header_value = bytearray()
        self.value = bytearray()


class Upload:
    """One upload request: feed it the body with :meth:`feed`, then :meth:`finish`.

    Multipart callbacks are synchronous; they only record what to do, and
    :meth:`feed` then does it (awaiting the pipe) before parsing more.
    """

    #: The form fields read (others are ignored).
    wanted: tuple[str, ...] = _FIELDS

    def __init__(self, dsn: str, boundary: bytes, *,
                 run: Callable[..., Awaitable[Any]], only_client: str | None = None) -> None:
        self._dsn = dsn
        self._only_client = only_client  # a client-scoped token uploads for its client only
        self._run = run  # runs a blocking function in a worker thread
        self._loop = asyncio.get_running_loop()
        self.fields: dict[str, str] = {}
        self._part: _Part | None = None
        self._file_seen = False
        self._streaming = False  # the file part began and goes straight to the import
        self._file_done = False
        self._prefix = bytearray()
        self._pipe: Pipe | None = None
        self._spool: BinaryIO | None = None
        self._import: asyncio.Future[ImportResult] | None = None
        self._todo: list[tuple[str, Any]] = []
        self._parser = MultipartParser(boundary, {
            "on_part_begin": self._on_part_begin,
            "on_header_field": lambda d, s, e: self._part.header_name.extend(d[s:e]),
            "on_header_value": lambda d, s, e: self._part.header_value.extend(d[s:e]),
            "on_header_end": self._on_header_end,
            "on_headers_finished": self._on_headers_finished,
            "on_part_data": self._on_part_data,
            "on_part_end": self._on_part_end,
        })

    # --- parser callbacks (synchronous: record only) -------------------------------

    def _on_part_begin(self) -> None:
        self._part = _Part()

    def _on_header_end(self) -> None:
        part = self._part
        if bytes(part.header_name).strip().lower() == b"content-disposition":
            _, options = parse_options_header(bytes(part.header_value))
            name = options.get(b"name")
            filename = options.get(b"filename")
            part.name = name.decode("utf-8", "replace") if name is not None else None
            part.filename = filename.decode("utf-8", "replace") if filename is not None else None
        part.header_name.clear()
        part.header_value.clear()

    def _on_headers_finished(self) -> None:
        if self._part.name == "file":
            # Decided here, in step with the parser: the file streams into the
            # import unless fields it needs are still to come (then it is spooled).
            self._streaming = not self._fields_pending()
            self._todo.append(("file_begin", self._part.filename))

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self._part
        if part.name == "file":
            if self._file_done:
                raise UploadError("more than one 'file' part")
            self._todo.append(("file_data", data[start:end]))
        elif part.name in self.wanted:
            part.value.extend(data[start:end])
            if len(part.value) > MAX_FIELD_BYTES:
                raise TooLarge(f"form field {part.name!r} is longer than {MAX_FIELD_BYTES} bytes")

    def _on_part_end(self) -> None:
        part = self._part
        if part.name == "file":
            self._file_done = True
            self._todo.append(("file_end", None))
        elif part.name in self.wanted:
            if self._streaming:
                # The import has started with the fields it had: this one would be lost.
                raise UploadError(f"form field {part.name!r} comes after the file; "
                                  "send the form fields before the file")
            try:
                self.fields[part.name] = part.value.decode("utf-8")
            except UnicodeDecodeError:
                raise UploadError(f"form field {part.name!r} is not UTF-8") from None
        self._part = None

    # --- the loop side -------------------------------------------------------------

    async def feed(self, data: bytes) -> None:
        """Parse the next bytes of the body and pass the file on."""
        try:
            self._parser.write(data)
        except FormParserError as exc:
            raise UploadError(f"malformed multipart body ({exc})") from None
        todo, self._todo = self._todo, []
        for what, arg in todo:
            if what == "file_data":
                await self._file_data(arg)
            elif what == "file_begin":
                self._file_begin(arg)
            else:
                await self._file_end()

    def _file_begin(self, filename: str | None) -> None:
        if self._file_seen:
            raise UploadError("more than one 'file' part")
        self._file_seen = True
        if not filename or not filename.lower().endswith(".csv"):
            raise UploadError("File must be a CSV (its name must end in .csv)")
        if self._fields_pending():
            # The text fields come later: keep the file on disk until they have.
            self._spool = tempfile.TemporaryFile(prefix="ango-upload-")

    async def _file_data(self, data: bytes) -> None:
        if self._spool is not None:
            self._spool.write(data)
        elif self._pipe is not None:
            await self._pipe.write(data)
        else:
            self._prefix += data
            if self._prefix.count(b"\n") >= 2 or len(self._prefix) >= MAX_PREFIX_BYTES:
                await self._start_streaming()

    async def _start_streaming(self) -> None:
        self._pipe = Pipe(self._loop)
        pipe = self._pipe
        client = self._client(bytes(self._prefix))
        self._import = self._loop.create_task(self._run(self._import_from, pipe, client))
        prefix, self._prefix = bytes(self._prefix), bytearray()
        if prefix:
            await pipe.write(prefix)

    def _import_from(self, pipe: Pipe, client: str) -> ImportResult:
        try:
            return self._import_codes(io.BufferedReader(pipe, 1 << 16), client)
        finally:
            pipe.stop_reading()

    def _fields_pending(self) -> bool:
        return "batch_name" not in self.fields

    def _import_codes(self, stream: BinaryIO, client: str) -> ImportResult:
        fields = self.fields
        return import_codes(self._dsn, stream, client, fields.get("batch_name", ""),
                            fields.get("rules") or None, starts_at=fields.get("starts_at"),
                            expires_at=fields.get("expires_at"))

    def _client(self, prefix: bytes) -> str:
        client = self.fields.get("client_id") or client_of_first_row(prefix) or self._only_client
        if not client:
            raise UploadError("CSV must contain 'code' and 'client_id' columns "
                              "(or give the form field client_id)")
        only = self._only_client
        if only is not None and str(parse_uuid(client, "client_id")) != only:
            raise UploadError(f"this token uploads for client {only} only, not {client}")
        return client

    async def _file_end(self) -> None:
        if self._spool is None and self._pipe is None:
            await self._start_streaming()  # a file of fewer than two lines
        # The pipe ends with the body (finish): until then the import cannot
        # commit, so a form field after the file still refuses it whole.

    def _check_fields(self) -> None:
        if not self._file_seen:
            raise UploadError("No CSV file provided (form field 'file')")
        if not self.fields.get("batch_name", "").strip():
            raise UploadError("Batch name is required (form field 'batch_name')")

    async def finish(self) -> ImportResult:
        """The body has ended: wait for the import (or run it from the spool)."""
        try:
            self._parser.finalize()
        except FormParserError as exc:
            raise UploadError(f"malformed multipart body ({exc})") from None
        self._check_fields()
        if not self._file_done:
            raise UploadError("the multipart body ended inside the file")
        if self._pipe is not None:
            self._pipe.end()
        if self._import is not None:
            return await self._import
        spool = self._spool
        assert spool is not None
        spool.seek(0)
        client = self._client(spool.read(MAX_PREFIX_BYTES))
        spool.seek(0)
        return await self._run(self._import_codes, spool, client)

    async def abort(self, exc: BaseException) -> None:
        """Stop: the import (if started) fails and rolls back; wait for it to end."""
        if self._pipe is not None:
            self._pipe.abort(exc)
        if self._import is not None:
            try:
                await self._import
            except BaseException:  # noqa: BLE001 - the import's own failure is expected here
                pass
        self.close()

    def close(self) -> None:
        """Remove the spool file, if any."""
        if self._spool is not None:
            self._spool.close()
            self._spool = None


class TopUp(Upload):
    """``POST /api/v1/batches/{id}/codes``: the file's codes added to an existing batch
    (``ango.importer.top_up``: the same checks as an import, all or nothing).

    No form field but the file: the batch's client is the batch's own (a
    ``client_id`` column, if any, must name it on every row), so the file
    always streams, never spooled.
    """

    wanted = ()

    def __init__(self, dsn: str, boundary: bytes, batch_id: str, *,
                 run: Callable[..., Awaitable[Any]]) -> None:
        super().__init__(dsn, boundary, run=run)
        self._batch_id = batch_id

    def _fields_pending(self) -> bool:
        return False

    def _client(self, prefix: bytes) -> str:
        return ""  # top_up checks the file against the batch's client itself

    def _import_codes(self, stream: BinaryIO, client: str) -> ImportResult:
        return top_up(self._dsn, stream, self._batch_id)

    def _check_fields(self) -> None:
        if not self._file_seen:
            raise UploadError("No CSV file provided (form field 'file')")
