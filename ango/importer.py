"""Import a file of codes as a new batch, streamed into PostgreSQL with COPY.

The file is read line by line (never whole into memory), validated row by row,
and written to ``ango.codes`` in COPY text format in chunks. The whole import is
one transaction: the first bad row aborts it with an ``ImportFailed`` naming the
line and the reason, and nothing is imported.

Accepted formats:

* the original's CSV: a header holding ``client_id`` and ``code`` in any order,
  extra columns ignored; every row's client_id must equal the batch's client;
* one column of codes, with a ``code`` header or no header at all.
"""

from __future__ import annotations

import csv
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import psycopg

from ango.errors import ImportFailed, InvalidInput
from ango.rules import parse_rules
from ango.sql import queries

MAX_CODE_LENGTH = 256
MAX_LINE_BYTES = 64 * 1024
_CHUNK_ROWS = 5000
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_COPY_LINE = re.compile(r"line (\d+)")


@dataclass(frozen=True)
class ImportResult:
    """What an import created."""

    batch_id: uuid.UUID
    imported: int


def parse_uuid(value: object, what: str) -> uuid.UUID:
    """Parse a UUID or raise InvalidInput naming ``what``."""
    if isinstance(value, uuid.UUID):
        return value
    if not isinstance(value, str) or len(value) > 64:
        raise InvalidInput(f"{what} must be a UUID, got {str(value)[:80]!r}")
    try:
        return uuid.UUID(value)
    except ValueError:
        raise InvalidInput(f"{what} must be a UUID, got {value[:80]!r}") from None


class _Rows:
    """Validated (line number, code) pairs from a binary stream."""

    def __init__(self, stream: BinaryIO, client_id: uuid.UUID, progress) -> None:
        self.stream = stream
        self.client_id = client_id
        self.progress = progress
        self.header_lines = 0

    def _fail(self, line: int, reason: str) -> ImportFailed:
        return ImportFailed(f"line {line}: {reason}; nothing was imported")

    def _split(self, line_no: int, raw: bytes) -> list[str]:
        if len(raw) > MAX_LINE_BYTES:
            raise self._fail(line_no, f"line longer than {MAX_LINE_BYTES} bytes")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self._fail(line_no, f"bytes that are not UTF-8 at column {exc.start + 1}") from None
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

    def __iter__(self) -> Iterator[tuple[int, str]]:
        lines = iter(self.stream)
        try:
            first = next(lines)
        except StopIteration:
            return
        line_no = 1
        consumed = len(first)
        fields = self._split(1, first)
        lowered = [f.lower() for f in fields]
        if "code" in lowered:
            self.header_lines = 1
            width = len(fields)
            code_at = lowered.index("code")
            client_at = lowered.index("client_id") if "client_id" in lowered else None
            if client_at is None and width != 1:
                raise self._fail(1, "a header with several columns must name 'client_id' and 'code'")
            pending: list[str] | None = None
        else:
            width, code_at, client_at = 1, 0, None
            pending = fields
        client = str(self.client_id)
        progress = self.progress
        while True:
            if pending is None:
                try:
                    raw = next(lines)
                except StopIteration:
                    break
                line_no += 1
                consumed += len(raw)
                if progress is not None and line_no % 8192 == 0:
                    progress(consumed)
                fields = self._split(line_no, raw)
            else:
                fields, pending = pending, None
            if len(fields) != width:
                raise self._fail(line_no, f"expected {width} column(s), found {len(fields)}")
            code = fields[code_at]
            if not code:
                raise self._fail(line_no, "empty code")
            if len(code) > MAX_CODE_LENGTH:
                raise self._fail(line_no, f"code longer than {MAX_CODE_LENGTH} characters")
            if _CONTROL.search(code):
                raise self._fail(line_no, "code contains a control character")
            if client_at is not None and fields[client_at] != client:
                try:
                    same = uuid.UUID(fields[client_at]) == self.client_id
                except ValueError:
                    same = False
                if not same:
                    raise self._fail(
                        line_no,
                        f"client_id {fields[client_at][:80]!r} differs from --client {client}",
                    )
            yield line_no, code
        if progress is not None:
            progress(consumed)


def _copy_line(code: str, batch_key: int, seq: int) -> str:
    return f"{code.replace(chr(92), chr(92) * 2)}\t{batch_key}\t{seq}\n"


def import_codes(
    dsn: str,
    source: str | Path | BinaryIO,
    client_id: str | uuid.UUID,
    batch_name: str,
    rules: str | dict | None = None,
    *,
    progress: Callable[[int], None] | None = None,
) -> ImportResult:
    """Create a batch from a file of codes; all or nothing.

    ``progress`` is called now and then with the number of bytes read.
    Raises ImportFailed (naming the line) or InvalidInput; on any error nothing
    is imported.
    """
    client = parse_uuid(client_id, "client id")
    if not isinstance(batch_name, str) or not batch_name.strip() or len(batch_name) > 200:
        raise InvalidInput("batch name must be 1 to 200 characters")
    if _CONTROL.search(batch_name):
        raise InvalidInput("batch name contains a control character")
    parsed = parse_rules(rules)
    if isinstance(source, (str, Path)):
        with open(source, "rb") as stream:
            return _import(dsn, stream, client, batch_name, parsed.to_json(), progress)
    return _import(dsn, source, client, batch_name, parsed.to_json(), progress)


def _import(dsn, stream, client, batch_name, rules_json, progress) -> ImportResult:
    batch_id = uuid.uuid4()
    rows = _Rows(stream, client, progress)
    seq = 0
    with psycopg.connect(dsn) as conn:
        try:
            conn.execute(queries["ensure_client"], (client,))
            (batch_key,) = conn.execute(
                queries["insert_batch"],
                (batch_id, client, batch_name, psycopg.types.json.Jsonb(rules_json)),
            ).fetchone()
            with conn.cursor().copy(queries["copy_codes"]) as copy:
                chunk: list[str] = []
                for _line, code in rows:
                    seq += 1
                    chunk.append(_copy_line(code, batch_key, seq))
                    if len(chunk) >= _CHUNK_ROWS:
                        copy.write("".join(chunk))
                        chunk.clear()
                if chunk:
                    copy.write("".join(chunk))
            if seq == 0:
                raise ImportFailed("the file holds no codes; nothing was imported")
            conn.execute(queries["set_batch_total"], (seq, batch_key))
            conn.execute(queries["insert_lease_cursor"], (batch_key, seq))
        except psycopg.errors.UniqueViolation as exc:
            conn.rollback()
            raise _duplicate_error(conn, stream, rows.header_lines, exc) from None
        except Exception:
            conn.rollback()
            raise
        conn.commit()
    return ImportResult(batch_id, seq)


def _duplicate_error(conn, stream, header_lines: int, exc: psycopg.Error) -> ImportFailed:
    """Name the line and whether the code repeats in the file or is already stored."""
    match = _COPY_LINE.search(exc.diag.context or "")
    if not match or not stream.seekable():
        return ImportFailed(f"a code is repeated ({exc.diag.message_detail}); nothing was imported")
    row = int(match.group(1))
    line = row + header_lines
    stream.seek(0)
    seen: dict[str, int] = {}
    for line_no, code in _rescan(stream):
        if line_no == line:
            if code in seen:
                return ImportFailed(
                    f"line {line}: code {code!r} is repeated in the file (first on line "
                    f"{seen[code]}); nothing was imported"
                )
            owner = conn.execute(queries["find_code"], (code,)).fetchone()
            where = f" (batch {owner[0]})" if owner else ""
            return ImportFailed(
                f"line {line}: code {code!r} is already in the database{where}; "
                "nothing was imported"
            )
        seen.setdefault(code, line_no)
    return ImportFailed(f"line {line}: duplicate code; nothing was imported")


def _rescan(stream: BinaryIO) -> Iterator[tuple[int, str]]:
    """Codes by line number, for error reports on a file already validated."""
    first = True
    code_at = 0
    for line_no, raw in enumerate(stream, start=1):
        text = raw.decode("utf-8").rstrip("\r\n").lstrip("\ufeff")
        fields = [f.strip() for f in next(csv.reader([text]), [""])]
        if first:
            first = False
            lowered = [f.lower() for f in fields]
            if "code" in lowered:
                code_at = lowered.index("code")
                continue
        yield line_no, fields[code_at] if code_at < len(fields) else ""
