"""Import a file of codes as a new batch, streamed into PostgreSQL with COPY.

The file is read in blocks of whole lines (never whole into memory), each
validated (a fast check of the whole block, the exact line-by-line checks when
that finds anything unusual) and written to ``ango.codes`` in COPY text format,
by a reader thread that stays a few blocks ahead of the COPY. The whole import
is one transaction: the first bad row aborts it with an ``ImportFailed`` naming
the line and the reason, and nothing is imported.

Accepted formats:

* the original's CSV: a header holding ``client_id`` and ``code`` in any order,
  extra columns ignored; every row's client_id must equal the batch's client;
* one column of codes, with a ``code`` header or no header at all.

Spaces and tabs around each field are trimmed (inside a code they are kept).
A header never silently becomes a code: unless ``header`` says outright
whether line 1 is one, a first line that looks like a header and does not
name ``code`` (a header word such as ``voucher``, columns split by ``;``, tab
or ``|``, or a line unlike the lines after it) is refused. The file must not
change while it is read.
"""

from __future__ import annotations

import csv
import io
import itertools
import os
import queue
import re
import stat
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import BinaryIO

import psycopg

from ango import database
from ango.errors import (
    BatchExpired,
    BatchNotFound,
    DatabaseError,
    DatabaseMissing,
    DatabaseRefused,
    ImportFailed,
    ImportInterrupted,
    InvalidInput,
    Unavailable,
)
from ango.rules import parse_rules
from ango.sql import queries

MAX_CODE_LENGTH = 256
MAX_LINE_BYTES = 64 * 1024
_BLOCK_BYTES = 1 << 20
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
#: What a customer or request id must not hold (docs/PROTOCOL.md): control
#: characters (Unicode category Cc) and lone surrogates (not text, not storable).
_FORBIDDEN = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_COPY_LINE = re.compile(r"line (\d+)")
# First lines taken for a header of a one-column file (compared lower-case, without
# spaces, '-' and '_'), unless the caller says there is no header.
_HEADER_WORDS = frozenset({
    "code", "codes", "voucher", "vouchers", "vouchercode", "coupon", "coupons", "couponcode",
    "promo", "promocode", "discount", "discountcode", "giftcard", "giftcardcode", "ticket",
    "ticketcode", "redemptioncode", "serial", "serialnumber", "pin", "key", "id", "value",
    "clientid", "client",
})
_OTHER_DELIMITERS = (";", "\t", "|")
# A one-column first line unlike every one of at least this many lines after it
# (see _unlike) is taken for a header.
_SHAPE_SAMPLE = 20
# Held for the whole import transaction, so that imports run one at a time (see import_lock).
_IMPORT_LOCK = 0x616E6769


@dataclass(frozen=True)
class ImportResult:
    """What an import created."""

    batch_id: uuid.UUID
    imported: int


def parse_uuid(value: object, what: str) -> uuid.UUID:
    """Parse a UUID or raise InvalidInput naming ``what``."""
    if isinstance(value, uuid.UUID):
        return value
    if not isinstance(value, str):
        raise InvalidInput(f"{what} must be a UUID string, got {type(value).__name__}")
    if len(value) > 64:
        raise InvalidInput(f"{what} must be a UUID, got a string of {len(value)} characters")
    try:
        return uuid.UUID(value)
    except ValueError:
        raise InvalidInput(f"{what} must be a UUID, got {value[:80]!r}") from None


def check_text(value: object, what: str, limit: int) -> str:
    """A non-empty string of at most ``limit`` characters without control
    characters or lone surrogates, or InvalidInput naming ``what`` and where."""
    if not isinstance(value, str):
        raise InvalidInput(f"{what} must be a string, got {type(value).__name__}")
    if not value:
        raise InvalidInput(f"{what} must not be empty")
    if len(value) > limit:
        raise InvalidInput(f"{what} is longer than {limit} characters")
    bad = _FORBIDDEN.search(value)
    if bad:
        kind = "a lone surrogate" if bad.group() >= "\ud800" else "a control character"
        raise InvalidInput(f"{what} contains {kind} (U+{ord(bad.group()):04X}) "
                           f"at position {bad.start()}")
    return value


class _Rows:
    """Validated codes from a binary stream, in blocks of consecutive lines.

    Each block is a list of codes, one per line, in file order; ``header_lines``
    tells how many lines came before the first code. A block of whole lines is
    first checked as one string (a few C-speed scans); only when that finds
    anything unusual (quotes, control characters, spaces around a field, a
    client id spelled otherwise, bad UTF-8, an empty or long code...) do its
    lines go through the exact line-by-line checks, which accept what is fine
    and name the line of what is not.
    """

    def __init__(self, stream: BinaryIO, client_id: uuid.UUID, header: bool | None = None) -> None:
        self.stream = stream
        self.client_id = client_id
        self.header = header  # True/False: the caller says whether line 1 is a header
        self.header_lines = 0
        self.consumed = 0  # bytes of the stream behind the codes yielded so far
        self.width, self.code_at, self.client_at = 1, 0, None

    def _fail(self, line: int, reason: str) -> ImportFailed:
        return ImportFailed(f"line {line}: {reason}; nothing was imported")

    def _split(self, line_no: int, raw: bytes) -> list[str]:
        if len(raw) > MAX_LINE_BYTES:
            raise self._fail(line_no, f"line longer than {MAX_LINE_BYTES} bytes")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            reason = f"bytes that are not UTF-8 at column {exc.start + 1}"
            raise self._fail(line_no, reason) from None
        text = text.rstrip("\r\n")
        if text.startswith("\ufeff") and line_no == 1:
            text = text[1:]
        if '"' not in text:
            return [field.strip() for field in text.split(",")]
        try:
            fields = next(csv.reader([text], strict=True))
        except (csv.Error, StopIteration) as exc:
            raise self._fail(line_no, f"malformed CSV ({exc})") from None
        return [field.strip() for field in fields]

    def _code(self, line_no: int, fields: list[str]) -> str:
        """The code of one split line, or ImportFailed naming the line."""
        if len(fields) != self.width:
            raise self._fail(line_no, f"expected {self.width} column(s), found {len(fields)}")
        code = fields[self.code_at]
        if not code:
            raise self._fail(line_no, "empty code")
        if len(code) > MAX_CODE_LENGTH:
            raise self._fail(line_no, f"code longer than {MAX_CODE_LENGTH} characters")
        if _CONTROL.search(code):
            raise self._fail(line_no, "code contains a control character")
        client_at = self.client_at
        if client_at is not None and fields[client_at] != str(self.client_id):
            try:
                same = uuid.UUID(fields[client_at]) == self.client_id
            except ValueError:
                same = False
            if not same:
                raise self._fail(
                    line_no,
                    f"client_id {fields[client_at][:80]!r} differs from --client {self.client_id}",
                )
        return code

    def _slow(self, line_no: int, block: bytes) -> list[str]:
        """Every line of ``block`` checked on its own (the exact rules)."""
        lines = block.split(b"\n")
        if block.endswith(b"\n"):
            lines.pop()
        return [self._code(n, self._split(n, raw)) for n, raw in enumerate(lines, line_no)]

    def _fast(self, block: bytes) -> list[str] | None:
        """The codes of ``block`` if it holds nothing unusual, else None."""
        try:
            text = block.decode("utf-8")
        except UnicodeDecodeError:
            return None
        if "\r" in text:
            text = text.replace("\r\n", "\n")
        body = text[:-1] if text.endswith("\n") else text
        if self.width == 1:
            codes = body
        elif self.width == 2:
            # The original's CSV: drop the expected client id from every line, then
            # what remains must be one code per line.
            lines = body.count("\n") + 1
            if body.count(",") != lines:
                return None
            client = str(self.client_id)
            if self.client_at == 0:
                framed, cut = "\n" + body, "\n" + client + ","
                if framed.count(cut) != lines:
                    return None
                codes = framed.replace(cut, "\n")[1:]
            else:
                framed, cut = body + "\n", "," + client + "\n"
                if framed.count(cut) != lines:
                    return None
                codes = framed.replace(cut, "\n")[:-1]
        else:
            return None
        # Anything the exact checks might treat otherwise sends the block there:
        # a comma, a quote, an empty line, a space at either end of a code, or any
        # character that is not printable (controls, tabs, other whitespace).
        if (
            not codes
            or codes[0] in " \n"
            or codes[-1] in " \n"
            or "\n\n" in codes
            or " \n" in codes
            or "\n " in codes
            or "," in codes
            or '"' in codes
            or not codes.replace("\n", "").isprintable()
        ):
            return None
        split = codes.split("\n")
        if max(map(len, split)) > MAX_CODE_LENGTH:
            return None
        return split

    def _blocks(self) -> Iterator[bytes]:
        """Whole lines of the stream, about ``_BLOCK_BYTES`` at a time."""
        rest = b""
        while data := self.stream.read(_BLOCK_BYTES):
            data = rest + data if rest else data
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                rest = data
                if len(rest) > MAX_LINE_BYTES:
                    raise self._fail(self._next_line, f"line longer than {MAX_LINE_BYTES} bytes")
                continue
            rest = data[cut:]
            yield data[:cut] if rest else data
        if rest:
            yield rest

    def __iter__(self) -> Iterator[list[str]]:
        first = self.stream.readline(MAX_LINE_BYTES + 1)
        if not first:
            return
        if len(first) > MAX_LINE_BYTES:
            raise self._fail(1, f"line longer than {MAX_LINE_BYTES} bytes")
        if first.startswith(b"\xef\xbb\xbf"):
            first = first[3:]
        fields = self._split(1, first)
        lowered = [f.lower() for f in fields]
        self.consumed = len(first)
        self._next_line = 2
        blocks = self._blocks()
        if self.header is not False:
            self._refuse_other_delimiters(fields)
        if self.header or (self.header is None and "code" in lowered):
            self.header_lines = 1
            self.width = len(fields)
            self.code_at = lowered.index("code") if "code" in lowered else 0
            self.client_at = lowered.index("client_id") if "client_id" in lowered else None
            if self.client_at is None and self.width != 1:
                raise self._fail(
                    1, "a header with several columns must name 'client_id' and 'code'"
                )
        else:
            if self.header is None:
                ahead = next(blocks, None)
                self._refuse_header_like(fields, ahead)
                blocks = itertools.chain([ahead] if ahead else [], blocks)
            yield [self._code(1, fields)]
        for block in blocks:
            codes = self._fast(block)
            if codes is None:
                codes = self._slow(self._next_line, block)
            self._next_line += len(codes)
            self.consumed += len(block)
            yield codes

    def _refuse_other_delimiters(self, fields: list[str]) -> None:
        """A one-column line 1 that splits on another delimiter into header names."""
        if len(fields) != 1:
            return
        for delimiter in _OTHER_DELIMITERS:
            names = [f.strip().lower() for f in fields[0].split(delimiter)]
            if len(names) > 1 and ("code" in names or "client_id" in names):
                shown = {"\t": "tabs"}.get(delimiter, repr(delimiter))
                raise self._fail(1, f"the header {fields[0][:80]!r} separates columns with "
                                    f"{shown}: Ango reads comma-separated columns "
                                    "(client_id,code) or one code per line")

    def _refuse_header_like(self, fields: list[str], ahead: bytes | None) -> None:
        """Refuse a line 1 that looks like a header, since the caller did not say."""
        if len(fields) != 1:
            return
        first = fields[0]
        advice = ("pass --header (header=True) to skip it, or --no-header (header=False) "
                  "to import it as a code")
        word = re.sub(r"[\s_-]", "", first.lower())
        if word in _HEADER_WORDS:
            raise self._fail(1, f"{first[:80]!r} looks like a header, not a code: {advice}")
        if ahead is not None and (unlike := _unlike(first, ahead)):
            raise self._fail(1, f"{first[:80]!r} {unlike}: it looks like a header, not a "
                                f"code: {advice}")


def _unlike(first: str, block: bytes) -> str | None:
    """How ``first`` differs from every line of ``block`` in kind of character, if it does.

    Digits, lower-case and upper-case letters: a header such as ``Gutscheincode``
    over codes such as ``7KQ2-M9XD`` has no digit while every code has one.
    """
    head = block[:64 * 1024].decode("utf-8", "replace").splitlines()
    head = head[:1000] if len(head) > 1000 or len(block) <= 64 * 1024 else head[:-1]  # whole lines
    lines = [line.strip() for line in head]
    lines = [line for line in lines if line]
    if len(lines) < _SHAPE_SAMPLE:
        return None
    for kind, has in (("digit", str.isdigit), ("lower-case letter", str.islower),
                      ("upper-case letter", str.isupper)):
        mine = any(map(has, first))
        theirs = [any(map(has, line)) for line in lines]
        if all(theirs) and not mine:
            return f"has no {kind} while each of the {len(lines)} lines after it has one"
        if mine and not any(theirs):
            return f"has a {kind} while none of the {len(lines)} lines after it has one"
    return None


def _code_order(codes: list[str]) -> list[int]:
    """Positions in ``codes`` sorted by code; stable, so a repeat keeps file order.

    A block sent in code order makes consecutive primary-key insertions land on
    neighbouring index pages, which PostgreSQL does about a quarter faster than
    insertions in random order (measured on a million codes). ``seq`` still
    numbers the codes in file order.
    """
    return sorted(range(len(codes)), key=codes.__getitem__)


def _copy_blocks(rows: _Rows, batch_key: int, seq: int = 0) -> Iterator[tuple[int, str, int]]:
    """(last seq so far, COPY text of the next block, bytes read) for ``ango.codes``;
    the codes are numbered after ``seq`` (0 for a new batch, its total for a top-up)."""
    for codes in rows:
        first = seq + 1
        seq += len(codes)
        text = "".join([
            f"{codes[i]}\t{batch_key}\t{first + i}\n" for i in _code_order(codes)
        ])
        if "\\" in text:  # the only character COPY text format needs escaped here
            text = text.replace("\\", "\\\\")
        yield seq, text, rows.consumed


class _Background:
    """Run an iterator in a thread, a few items ahead of the consumer.

    Reading and checking the file is Python work, while sending it is mostly
    waiting for the server to insert and index: overlapping the two hides most
    of the former. The queue is short, so only a few blocks are in memory.
    """

    _DONE = object()

    def __init__(self, items: Iterator, depth: int = 4) -> None:
        self._items = items
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ango-import-reader", daemon=True)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for item in self._items:
                if not self._put(item):
                    return
        except BaseException as exc:  # handed to the consumer, raised there
            self._put(_Raised(exc))
            return
        self._put(self._DONE)

    def __enter__(self) -> _Background:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()

    def __iter__(self) -> Iterator:
        while (item := self._queue.get()) is not self._DONE:
            if isinstance(item, _Raised):
                raise item.exc
            yield item


@dataclass(frozen=True)
class _Raised:
    exc: BaseException


def import_codes(
    dsn: str,
    source: str | Path | BinaryIO,
    client_id: str | uuid.UUID,
    batch_name: str,
    rules: str | dict | None = None,
    *,
    progress: Callable[[int], None] | None = None,
    header: bool | None = None,
    on_wait: Callable[[], None] | None = None,
    starts_at: str | datetime | None = None,
    expires_at: str | datetime | None = None,
) -> ImportResult:
    """Create a batch from a file of codes; all or nothing.

    ``starts_at`` / ``expires_at`` (aware datetimes or ISO 8601 text) schedule
    the batch (see ango.schedules).

    ``header`` says whether line 1 is a header (True) or a code (False); when
    None, a line 1 naming ``code`` is a header and one that looks like a header
    otherwise is refused. ``progress`` is called now and then with the number
    of bytes read; ``on_wait`` once, before waiting for another import to end
    (imports run one at a time). Raises ImportFailed (naming the line; ImportInterrupted when
    the database failed and a retry is safe) or InvalidInput; on any error
    nothing is imported.
    """
    from ango.schedules import check_order, parse_instant

    schedule = (parse_instant(starts_at, "starts_at"), parse_instant(expires_at, "expires_at"))
    check_order(*schedule)
    client = parse_uuid(client_id, "client id")
    if not isinstance(batch_name, str) or not batch_name.strip() or len(batch_name) > 200:
        raise InvalidInput("batch name must be 1 to 200 characters")
    if _CONTROL.search(batch_name):
        raise InvalidInput("batch name contains a control character")
    parsed = parse_rules(rules)
    options = _Options(parsed.to_json(), progress, header, on_wait, schedule)
    return _from_source(source, lambda stream: _import(dsn, stream, client, batch_name, options))


def _from_source(source: str | Path | BinaryIO, load: Callable[[BinaryIO], ImportResult]
                 ) -> ImportResult:
    """``load`` a path (opened and closed here) or a binary stream."""
    if isinstance(source, (str, Path)):
        with open(source, "rb") as stream:
            return load(stream)
    return load(source)


@dataclass(frozen=True)
class _Options:
    """How one import stores its batch, reads its file and reports (see import_codes)."""

    rules_json: object
    progress: Callable[[int], None] | None
    header: bool | None
    on_wait: Callable[[], None] | None
    schedule: tuple[datetime | None, datetime | None] = (None, None)


def _import(dsn, stream, client, batch_name, options: _Options) -> ImportResult:
    """One import of a new batch."""
    batch_id = uuid.uuid4()

    def create(conn: psycopg.Connection) -> tuple[int, int]:
        conn.execute(queries["ensure_client"], (client,))
        (batch_key,) = conn.execute(
            queries["insert_batch"],
            (batch_id, client, batch_name, psycopg.types.json.Jsonb(options.rules_json)),
        ).fetchone()
        if options.schedule != (None, None):
            starts_at, expires_at = options.schedule
            conn.execute(queries["set_batch_schedule"],
                         {"key": batch_key, "starts_at": starts_at, "expires_at": expires_at})
        return batch_key, 0

    def finish(conn: psycopg.Connection, batch_key: int, added: int) -> None:
        conn.execute(queries["set_batch_total"], (added, batch_key))
        conn.execute(queries["insert_lease_cursor"], (batch_key, added))

    lost = (f"batch {batch_id} may or may not have been created (`ango batches` tells); "
            "retrying is safe, since a retry of a committed import is refused whole as "
            "already in the database")
    added = _load(dsn, stream, client, options, create, finish, lost)
    return ImportResult(batch_id, added)


def _load(dsn: str, stream: BinaryIO, client: uuid.UUID, options: _Options,
          begin: Callable[[psycopg.Connection], tuple[int, int]],
          finish: Callable[[psycopg.Connection, int, int], None], lost: str) -> int:
    """One import transaction, with any database failure told as an ImportFailed.

    ``begin`` gives the batch key and the last seq, the file's codes are COPYed
    after it, ``finish`` records how many; returns that. ``lost`` says what may
    have happened when the connection broke during the COMMIT.
    """
    try:
        with database.connect(dsn) as conn:
            return _load_on(conn, dsn, stream, client, options, begin, finish, lost)
    except (DatabaseRefused, DatabaseMissing, DatabaseError) as exc:
        raise ImportFailed(f"{exc}; nothing was imported") from exc
    except Unavailable as exc:
        raise ImportInterrupted(
            f"{exc}; nothing was imported, and retrying the import is safe") from exc


def _load_on(conn, dsn, stream, client, options: _Options, begin, finish, lost: str) -> int:
    progress = options.progress
    # Where the file starts, to read it again for an error report.
    start = stream.tell() if stream.seekable() else None
    before = _file_state(stream)
    rows = _Rows(stream, client, options.header)
    try:
        if not conn.execute(queries["import_try_lock"], (_IMPORT_LOCK,)).fetchone()[0]:
            if options.on_wait is not None:
                options.on_wait()
            conn.execute(queries["import_lock"], (_IMPORT_LOCK,))
        batch_key, first = begin(conn)
        seq = first
        with (
            _Background(_copy_blocks(rows, batch_key, first)) as blocks,
            conn.cursor().copy(queries["copy_codes"]) as copy,
        ):
            for done, text, consumed in blocks:
                copy.write(text)
                seq = done
                if progress is not None:
                    progress(consumed)
        if seq == first:
            raise ImportFailed("the file holds no codes; nothing was imported")
        _refuse_if_changed(stream, before)
        finish(conn, batch_key, seq - first)
    except psycopg.errors.UniqueViolation as exc:
        conn.rollback()
        raise _duplicate_error(conn, stream, start, rows, exc) from None
    except Exception:
        conn.rollback()
        raise
    try:
        conn.commit()
    except psycopg.OperationalError as exc:
        # The COMMIT may or may not have reached the server before the connection broke.
        raise ImportInterrupted(
            f"{database.translate(exc, dsn)} while committing: {lost}") from exc
    return seq - first


def top_up(
    dsn: str,
    source: str | Path | BinaryIO,
    batch_id: str | uuid.UUID,
    client_id: str | uuid.UUID | None = None,
    *,
    progress: Callable[[int], None] | None = None,
    header: bool | None = None,
    on_wait: Callable[[], None] | None = None,
) -> ImportResult:
    """Add a file's codes to an existing batch; all or nothing, same checks as an import.

    Codes must be new across all batches. Like an import it runs under the
    import lock; the batch row is locked ``FOR NO KEY UPDATE`` (claims, which
    lock it ``FOR KEY SHARE``, go on; an expiry or a rule or schedule change
    waits), the codes are numbered after the batch's last ``seq``, and the
    batch's total and lease cursor grow in the same transaction: once it
    commits, shards lease the new codes at their next need, without a restart,
    and a batch that was exhausted is claimable again. Raises BatchNotFound,
    BatchExpired, ImportFailed (naming the line) or InvalidInput.
    """
    bid = parse_uuid(batch_id, "batch id")
    given = None if client_id is None else parse_uuid(client_id, "client id")
    # The batch's client, to check the file's client_id column against.
    with database.connect(dsn, autocommit=True) as conn:
        row = conn.execute(queries["batch_for_top_up"], (bid,)).fetchone()
    if row is None:
        raise BatchNotFound(f"no batch with id {bid}")
    client = row[1]
    if given is not None and given != client:
        raise InvalidInput(f"batch {bid} belongs to client {client}, not {given}")

    def begin(conn: psycopg.Connection) -> tuple[int, int]:
        row = conn.execute(queries["lock_batch_for_top_up"], (bid,)).fetchone()
        if row is None:
            raise BatchNotFound(f"no batch with id {bid}")
        key, _, total, expired = row
        if expired:
            raise BatchExpired(f"batch {bid} has expired; codes cannot be added to it")
        return key, total

    def finish(conn: psycopg.Connection, batch_key: int, added: int) -> None:
        conn.execute(queries["grow_batch"], {"key": batch_key, "added": added})

    options = _Options(None, progress, header, on_wait)
    lost = (f"the codes may or may not have been added to batch {bid} (`ango batches` "
            "tells); retrying is safe, since a retry of a committed top-up is refused whole "
            "as already in the database")
    return _from_source(source, lambda stream: ImportResult(
        bid, _load(dsn, stream, client, options, begin, finish, lost)))


def _file_state(stream: BinaryIO) -> tuple[int, int] | None:
    """Size and modification time of the regular file behind ``stream``, if it is one."""
    try:
        found = os.fstat(stream.fileno())
    except (AttributeError, OSError, io.UnsupportedOperation):
        return None
    return (found.st_size, found.st_mtime_ns) if stat.S_ISREG(found.st_mode) else None


def _refuse_if_changed(stream: BinaryIO, before: tuple[int, int] | None) -> None:
    """ImportFailed if the file was written to while it was read: what was read is unsure."""
    after = _file_state(stream)
    if before is None or after == before:
        return
    if after is None or after[0] != before[0]:
        now = "gone" if after is None else f"{after[0]:,} bytes"
        change = f"from {before[0]:,} bytes to {now}"
    else:
        change = "in place, same size"
    raise ImportFailed(f"the file changed while it was read ({change}); nothing was imported: "
                       "import it again once nothing writes to it")


def _duplicate_error(
    conn, stream: BinaryIO, start: int | None, rows: _Rows, exc: psycopg.Error
) -> ImportFailed:
    """Name the line and whether the code repeats in the file or is already stored.

    PostgreSQL names the COPY row it refused; the file is read again (it was
    valid, and reading is deterministic) to find which code and line that row
    was, and then once more for an earlier line with the same code. Nothing but
    the current block is held in memory.
    """
    match = _COPY_LINE.search(exc.diag.context or "")
    if not match or start is None:
        return ImportFailed(f"a code is repeated ({exc.diag.message_detail}); nothing was imported")
    row = int(match.group(1))
    found = _code_at_row(stream, start, rows, row)
    if found is None:
        return ImportFailed(f"a code is repeated ({exc.diag.message_detail}); nothing was imported")
    code, line = found
    earlier = _first_line_of(stream, start, rows, code)
    if earlier is not None and earlier < line:
        return ImportFailed(
            f"line {line}: code {code!r} is repeated in the file (first on line "
            f"{earlier}); nothing was imported"
        )
    owner = conn.execute(queries["find_code"], (code,)).fetchone()
    where = f" (batch {owner[0]})" if owner else ""
    return ImportFailed(
        f"line {line}: code {code!r} is already in the database{where}; nothing was imported"
    )


def _again(stream: BinaryIO, start: int, read: _Rows) -> _Rows:
    """The file read again from ``start`` as ``read`` read it."""
    stream.seek(start)
    return _Rows(stream, read.client_id, read.header)


def _code_at_row(stream: BinaryIO, start: int, read: _Rows, row: int) -> tuple[str, int] | None:
    """The code sent as COPY row ``row`` (from 1), and its line in the file."""
    rows = _again(stream, start, read)
    done = 0
    for codes in rows:
        if done + len(codes) >= row:
            at = _code_order(codes)[row - done - 1]
            return codes[at], rows.header_lines + done + at + 1
        done += len(codes)
    return None


def _first_line_of(stream: BinaryIO, start: int, read: _Rows, code: str) -> int | None:
    """The first line of the file holding ``code``."""
    rows = _again(stream, start, read)
    done = 0
    for codes in rows:
        if code in codes:
            return rows.header_lines + done + codes.index(code) + 1
        done += len(codes)
    return None
