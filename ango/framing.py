"""Length-prefixed frames: the one reader and the one writer of every Ango byte stream.

A frame is a 4-byte big-endian unsigned length followed by that many bytes of
MessagePack. The wire protocol (``ango.protocol``, between clients and
``ango serve``) and the link between the allocator and its shard processes
(``ango.shards.messages``) both speak it, each with its own largest frame.

:class:`FrameReader` cuts complete frames out of bytes fed as they arrive;
:class:`FrameWriter` encodes messages into one buffer and writes them together
(once per event-loop pass, or at once when ``limit`` bytes are waiting).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from typing import Any

import msgspec

#: Bytes of the length prefix.
HEADER_SIZE = 4

HEADER = struct.Struct(">I")
#: ``unpack_header(buffer, offset) -> (length,)``.
unpack_header = HEADER.unpack_from
_pack_header = HEADER.pack_into

#: Bytes a writer holds before it writes without waiting for its flush.
WRITE_LIMIT = 256 * 1024

_encoder = msgspec.msgpack.Encoder()
_encode_into = _encoder.encode_into


class FrameError(Exception):
    """The byte stream is not a sequence of valid frames."""


class FrameTooLarge(FrameError):
    """A frame's length is above the largest allowed."""

    def __init__(self, size: int, max_frame: int) -> None:
        super().__init__(f"frame of {size} bytes exceeds the maximum of {max_frame}")
        self.size = size
        self.max_frame = max_frame


def encode_frame(message: Any) -> bytes:
    """``message`` as one length-prefixed frame (for a single write; see FrameWriter)."""
    buffer = bytearray()
    _encode_into(message, buffer, HEADER_SIZE)
    HEADER.pack_into(buffer, 0, len(buffer) - HEADER_SIZE)
    return bytes(buffer)


class FrameReader:
    """Complete frames out of a byte stream fed in pieces of any size.

    ``feed`` the bytes received, then iterate :meth:`frames`: it yields each
    complete frame's payload (a ``memoryview`` of the bytes received) and keeps
    a partial one for the next ``feed``. A frame is consumed once yielded, so a
    caller may stop iterating (paused, closing) and resume later. A header
    announcing more than ``max_frame`` bytes raises :class:`FrameTooLarge` when
    reached, after the frames before it: the stream cannot be trusted past it.
    """

    __slots__ = ("max_frame", "_data", "_pos", "_owned")

    def __init__(self, max_frame: int) -> None:
        self.max_frame = max_frame
        self._data: bytes | bytearray = b""  # bytes not yet consumed start at _pos
        self._pos = 0
        self._owned = False  # _data is a bytearray of ours, which may grow in place

    def __len__(self) -> int:
        """Bytes received and not yet consumed as frames."""
        return len(self._data) - self._pos

    def feed(self, data: bytes | bytearray) -> None:
        """Add received bytes (kept without a copy when nothing is pending)."""
        pos = self._pos
        held = self._data
        if pos >= len(held):
            self._data = data
            self._pos = 0
            self._owned = False
            return
        if self._owned and not pos:
            try:
                held += data  # amortised growth while a large frame trickles in
                return
            except BufferError:  # a payload view is still held: copy instead
                pass
        with memoryview(held) as view:
            rest = bytearray(view[pos:])
        rest += data
        self._data = rest
        self._pos = 0
        self._owned = True

    def held(self) -> bytes:
        """A copy of the bytes received and not yet consumed (a partial frame, or more)."""
        with memoryview(self._data) as view:
            return bytes(view[self._pos:])

    def clear(self) -> None:
        """Drop everything held."""
        self._data = b""
        self._pos = 0
        self._owned = False

    def frames(self) -> Iterator[memoryview]:
        """Each complete frame's payload, in order."""
        data = self._data
        pos = self._pos
        end = len(data)
        max_frame = self.max_frame
        with memoryview(data) as view:
            while end - pos >= HEADER_SIZE:
                (size,) = unpack_header(data, pos)
                if size > max_frame:
                    raise FrameTooLarge(size, max_frame)
                stop = pos + HEADER_SIZE + size
                if stop > end:
                    break
                self._pos = stop
                yield view[pos + HEADER_SIZE:stop]
                pos = stop


class FrameWriter:
    """Messages encoded as frames into one buffer and written together.

    ``append`` encodes a message after those waiting; the first one waiting
    calls ``schedule`` (which arranges for :meth:`flush`, e.g. at the end of
    the event-loop pass; None: every message is written at once). ``flush``
    hands the buffer to ``write`` and starts a new one (a transport may keep a
    view of what it was given). At ``limit`` bytes waiting the buffer is written
    without waiting for the flush, so it stays bounded. A message whose payload
    is above ``max_frame`` raises :class:`FrameTooLarge` and is left out.
    """

    __slots__ = ("max_frame", "limit", "_out", "_write", "_schedule")

    def __init__(self, write: Callable[[bytearray], object],
                 schedule: Callable[[], object] | None, *, max_frame: int,
                 limit: int = WRITE_LIMIT) -> None:
        self.max_frame = max_frame
        self.limit = limit
        self._out = bytearray()
        self._write = write
        self._schedule = schedule

    def __len__(self) -> int:
        """Bytes waiting to be written."""
        return len(self._out)

    def append(self, message: Any) -> None:
        """Encode ``message`` as one frame after those waiting."""
        out = self._out
        start = len(out)
        # encode_into writes at the offset and resizes the buffer to fit.
        _encode_into(message, out, start + HEADER_SIZE)
        size = len(out) - start - HEADER_SIZE
        if size > self.max_frame:
            del out[start:]
            raise FrameTooLarge(size, self.max_frame)
        _pack_header(out, start, size)
        if start:
            if len(out) >= self.limit:
                self.flush()
        elif self._schedule is not None:
            self._schedule()
        else:
            self.flush()

    def flush(self) -> None:
        """Write every frame waiting, in one piece."""
        if self._out:
            out = self._out
            self._out = bytearray()
            self._write(out)

    def clear(self) -> None:
        """Drop every frame waiting."""
        self._out = bytearray()
