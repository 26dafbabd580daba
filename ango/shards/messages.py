"""Messages between the Allocator and its shard processes, and the protocol of their link.

Frames (``ango.framing``) carry msgpack bodies: msgspec tagged-union Structs
encoded as arrays (compact and fast to decode).
Claims travel in batches: one frame per event-loop pass, not one per claim.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import msgspec

from ango.framing import FrameReader, FrameWriter

MAX_FRAME = 64 * 1024 * 1024
#: Bytes already read from a connection that its hand-off carries at most (else
#: it stays with the server), and the largest hand-off message.
MAX_HANDOFF_PENDING = 64 * 1024
MAX_HANDOFF = MAX_HANDOFF_PENDING + 1024


class Claim(msgspec.Struct, array_like=True):
    """One claim, tagged with the parent's id for it."""

    tag: int
    batch_id: str
    customer_id: str
    client_id: str | None
    request_id: str


class Claims(msgspec.Struct, tag="claims", array_like=True):
    """Claims for the shard to serve."""

    claims: list[Claim]


class StatsRequest(msgspec.Struct, tag="stats", array_like=True):
    """Ask the shard for its counters."""

    tag_id: int


class ForgetSlots(msgspec.Struct, tag="forget_slots", array_like=True):
    """Drop the counters of the customers in these routing slots (another instance
    owns them now); they are read again from PostgreSQL if the slots come back."""

    slots: list[int]
    slot_count: int


class RevokeTokens(msgspec.Struct, tag="revoke_tokens", array_like=True):
    """Close the direct connections authenticated with these client tokens (revoked)."""

    token_ids: list[int]


class Shutdown(msgspec.Struct, tag="shutdown", array_like=True):
    """Finish the claims in hand, release leases and exit."""


class Ping(msgspec.Struct, tag="ping", array_like=True):
    """Are you there? Answered with a Pong by the shard's event loop."""

    seq: int


class Result(msgspec.Struct, array_like=True):
    """The outcome of one claim: a code, or an error code and message."""

    tag: int
    code: str | None
    error: str | None = None
    message: str | None = None


class Results(msgspec.Struct, tag="results", array_like=True):
    """Outcomes, sent as soon as a group commit has committed.

    ``groups`` carries ``(claims, seconds)`` of each group commit finished
    since the last frame: the parent tallies them, so the counts outlive the
    shard process (a kill -9 loses none that were reported with their answers).
    """

    results: list[Result]
    groups: list[tuple[int, float]] = []
    #: Codes issued on direct connections since the last frame (answered there).
    direct: int = 0


class Ready(msgspec.Struct, tag="ready", array_like=True):
    """The shard is registered and has recovered its leases."""

    owner: str
    recovered: int


class StatsReply(msgspec.Struct, tag="stats_reply", array_like=True):
    """The shard's counters."""

    tag_id: int
    stats: dict[str, Any]


class Pong(msgspec.Struct, tag="pong", array_like=True):
    """The answer to a Ping: the shard's loop is turning."""

    seq: int


class StartFailed(msgspec.Struct, tag="start_failed", array_like=True):
    """The shard could not start (PostgreSQL's error, as text); it exits."""

    reason: str


class Direct(msgspec.Struct, array_like=True):
    """A client connection handed to the shard (issue 13), sent with its socket
    (SCM_RIGHTS) on the shard's hand-off socket: the scope its token was
    authenticated with, its limits, and the bytes the server had already read."""

    scope_name: str
    client_id: str | None
    token_id: int | None
    max_in_flight: int
    max_frame: int
    max_connections: int
    idle_timeout: float
    pending: bytes


ToShard = Claims | StatsRequest | Shutdown | Ping | ForgetSlots | RevokeTokens
FromShard = Results | Ready | StatsReply | Pong | StartFailed


class FramedProtocol(asyncio.Protocol):
    """Reads frames and hands each decoded message to ``on_message``; writes each sent at once.

    A frame over ``MAX_FRAME`` raises FrameTooLarge out of ``data_received``:
    the transport closes and ``on_lost`` hears why.
    """

    def __init__(self, decoder: msgspec.msgpack.Decoder, on_message: Callable[[Any], None],
                 on_lost: Callable[[Exception | None], None]) -> None:
        self._decoder = decoder
        self._on_message = on_message
        self._on_lost = on_lost
        self._reader = FrameReader(MAX_FRAME)
        self._writer = FrameWriter(self._write, None, max_frame=MAX_FRAME)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        decode = self._decoder.decode
        on_message = self._on_message
        for payload in self._reader.frames():
            on_message(decode(payload))

    def connection_lost(self, exc: Exception | None) -> None:
        self._on_lost(exc)

    def send(self, message: Any) -> None:
        """Encode and write one message (no-op once the link is closed)."""
        if self.transport is not None and not self.transport.is_closing():
            self._writer.append(message)

    def _write(self, frame: bytearray) -> None:
        self.transport.write(frame)
