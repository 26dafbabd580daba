"""The wire protocol between Ango clients and ``ango serve`` (spec: docs/PROTOCOL.md).

A frame (``ango.framing``) is a 4-byte big-endian unsigned length followed by
that many bytes of MessagePack: one map, tagged by its ``type`` key, decoded
into one of the ``msgspec.Struct`` classes below. Every request carries a client-chosen integer
``id`` that its response echoes, so a client may pipeline many requests and
match responses that arrive in any order.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from ango.errors import InvalidInput, ProtocolError

#: Bumped on any incompatible change; ``hello`` carries it and the server refuses others.
PROTOCOL_VERSION = 1
#: Largest frame payload either side accepts, in bytes (the 4-byte header excluded).
MAX_FRAME = 64 * 1024
#: The ``protocol`` error closing a direct connection (hello with ``shard``) that
#: sent something other than a claim; ``kind`` is the request's type.
CLAIMS_ONLY = ("this connection's hello named a shard: it carries claims only, not {kind!r}; "
               "send other requests on a connection without shard")

class _Message(msgspec.Struct, tag=True, tag_field="type"):
    """Common base: every message is a map with a ``type`` tag and an ``id``."""


# --- requests (client to server) -------------------------------------------------


class Hello(_Message, tag="hello", omit_defaults=True):
    """First frame of every connection: protocol version and token.

    ``token`` may be absent or nil so that the server can answer a missing
    token as it answers a wrong one (``unauthorized``, after the delay).
    """

    id: int
    version: int
    token: str | None = None
    client: str | None = None
    #: Protocol 1, added with issue 13: make this a direct connection to shard
    #: ``shard`` of the instance (claims only; see docs/PROTOCOL.md).
    shard: int | None = None


class Claim(_Message, tag="claim", omit_defaults=True):
    """Ask for a code of ``batch_id`` for ``customer_id``.

    ``forwarded`` (protocol 1, added with issue 13): set by an instance that
    forwards the claim to the owner of its routing slot; the receiver serves it
    itself and never forwards it again.
    """

    id: int
    batch_id: str
    customer_id: str
    client_id: str | None = None
    request_id: str | None = None
    forwarded: bool = False


class ListBatches(_Message, tag="batches"):
    """Ask for a page of batches with their counts.

    ``after`` is the ``next`` cursor of the previous page (None: from the
    start); ``limit`` the most batches wanted. A request with neither asks for
    the whole list in one answer, which the server refuses when it does not
    fit in a frame.
    """

    id: int
    after: str | None = None
    limit: Annotated[int, msgspec.Meta(ge=1)] | None = None


class Expire(_Message, tag="expire"):
    """Expire a batch; once answered, no claim of it succeeds."""

    id: int
    batch_id: str


class GetStats(_Message, tag="stats"):
    """Ask for health and counters."""

    id: int


class Ping(_Message, tag="ping"):
    """Cheap liveness check; answered with ``pong`` without touching the allocator."""

    id: int


class Lookup(_Message, tag="lookup"):
    """Who has ``code`` (issue 14); answered with ``code_info``."""

    id: int
    code: str


#: Most codes one ``customer_codes`` answer carries: 50 entries of the longest
#: fields still fit in a frame.
MAX_CUSTOMER_CODES_PER_FRAME = 50


class CustomerCodes(_Message, tag="customer_codes"):
    """The codes ``customer_id`` received (of ``batch_id`` if given), newest first."""

    id: int
    customer_id: str
    batch_id: str | None = None
    limit: int = MAX_CUSTOMER_CODES_PER_FRAME


class SetRules(_Message, tag="set_rules"):
    """Replace a batch's rules (nil: no limit); answered with ``rules_set``."""

    id: int
    batch_id: str
    rules: dict[str, Any] | None


class SetSchedule(_Message, tag="set_schedule"):
    """Change a batch's start and/or end; an absent field keeps its value, nil clears it."""

    id: int
    batch_id: str
    starts_at: str | None | msgspec.UnsetType = msgspec.UNSET
    expires_at: str | None | msgspec.UnsetType = msgspec.UNSET


class DeleteBatch(_Message, tag="delete"):
    """Delete an expired batch's unissued codes and leases (``purge``: every trace)."""

    id: int
    batch_id: str
    purge: bool = False


class GetPartitionMap(_Message, tag="partition_map"):
    """Ask which instance owns each routing slot (issue 13): ``partition_map_reply``."""

    id: int


Request = (Hello | Claim | ListBatches | Expire | GetStats | Ping | Lookup | CustomerCodes
    | SetRules | SetSchedule | DeleteBatch | GetPartitionMap)


# --- responses (server to client) ------------------------------------------------


class Welcome(_Message, tag="welcome", omit_defaults=True):
    """Answer to a good ``hello``: the connection may now send requests."""

    id: int
    version: int
    server: str
    max_frame: int
    max_in_flight: int
    idle_timeout: float
    #: Added with issue 13 (0 when unknown): the instance's shard processes and the
    #: database's partitions; a claim's shard is ``crc32 % partitions % shards``.
    shards: int = 0
    partitions: int = 0


class Code(_Message, tag="code", omit_defaults=True):
    """Answer to ``claim``: the code, committed before this frame was sent.

    ``moved`` (added with issue 13; absent means false): the instance that
    answered does not own the claim's routing slot (it forwarded the claim):
    a client routing claims itself should fetch the ``partition_map`` again.
    """

    id: int
    code: str
    moved: bool = False


class Batch(msgspec.Struct):
    """One batch and its counts, as listed by ``batches``."""

    id: str
    name: str
    client_id: str
    rules: dict[str, Any] | None
    expired: bool
    total: int
    issued: int
    available: int
    created_at: str
    starts_at: str | None = None   # added in ango 0.2 (issue 14): the schedule
    expires_at: str | None = None


class BatchList(_Message, tag="batch_list"):
    """Answer to ``batches``: one page; ``next`` is the cursor of the next one (None: the last)."""

    id: int
    batches: list[Batch]
    next: str | None = None


class Expired(_Message, tag="expired"):
    """Answer to ``expire``: ``changed`` is False when the batch already was expired."""

    id: int
    changed: bool


class Stats(_Message, tag="stats_reply"):
    """Answer to ``stats``: a map of counters (see docs/PROTOCOL.md)."""

    id: int
    stats: dict[str, Any]


class Pong(_Message, tag="pong"):
    """Answer to ``ping``."""

    id: int


class Error(_Message, tag="error"):
    """A request failed (``id`` set) or the connection is being closed (``id`` nil).

    ``code`` is one of the ``ango.errors`` codes; ``retryable`` means the same
    request (same ``request_id``) may be sent again later.
    """

    id: int | None
    code: str
    message: str
    retryable: bool = False


class CodeInfo(_Message, tag="code_info"):
    """Answer to ``lookup``; ``status`` is issued, available, expired or never_imported."""

    id: int
    code: str
    status: str
    batch_id: str | None = None
    batch_name: str | None = None
    client_id: str | None = None
    customer_id: str | None = None
    issued_at: str | None = None
    request_id: str | None = None


class CustomerCode(msgspec.Struct):
    """One code a customer received, as listed by ``customer_codes``."""

    code: str
    batch_id: str
    batch_name: str
    issued_at: str
    request_id: str


class CustomerCodeList(_Message, tag="customer_code_list"):
    """Answer to ``customer_codes``, newest first."""

    id: int
    codes: list[CustomerCode]


class RulesSet(_Message, tag="rules_set"):
    """Answer to ``set_rules``: the rules now in force, in canonical form."""

    id: int
    rules: dict[str, Any] | None


class ScheduleSet(_Message, tag="schedule"):
    """Answer to ``set_schedule``: the batch's schedule now (ISO 8601 or nil)."""

    id: int
    batch_id: str
    starts_at: str | None
    expires_at: str | None


class Deleted(_Message, tag="deleted"):
    """Answer to ``delete``: what was removed."""

    id: int
    batch_id: str
    purged: bool
    codes_deleted: int
    issues_deleted: int


class PartitionMap(_Message, tag="partition_map_reply"):
    """Answer to ``partition_map``: who owns each routing slot.

    ``version`` grows whenever an owner changes; ``slots`` is the slot count and
    ``hash`` how a claim's slot is computed (docs/PROTOCOL.md); ``owners[s]`` is
    an index into ``addresses`` (``host:port`` of an instance) or -1 when the
    slot has no live owner (send its claims to any instance). Empty
    ``addresses``: not a cluster; send every claim to this instance.
    """

    id: int
    version: int
    slots: int
    hash: str
    addresses: list[str]
    owners: list[int]


Response = (Welcome | Code | BatchList | Expired | Stats | Pong | Error | CodeInfo
            | CustomerCodeList | RulesSet | ScheduleSet | Deleted | PartitionMap)


class _Envelope(msgspec.Struct):
    """What can be salvaged from a well-formed but invalid request: its id."""

    id: int | None = None


# --- decoding --------------------------------------------------------------------

request_decoder = msgspec.msgpack.Decoder(Request)
response_decoder = msgspec.msgpack.Decoder(Response)
envelope_decoder = msgspec.msgpack.Decoder(_Envelope)


def decode_request(payload: bytes | memoryview) -> tuple[Any, Error | None]:
    """The request in a frame, or None and the error that answers it: with the
    request's id when one could be salvaged (answer it, keep the connection), with
    a nil id when not (send it and close the connection)."""
    try:
        return request_decoder.decode(payload), None
    # A str that is not UTF-8 raises UnicodeDecodeError: a malformed request too.
    except (msgspec.ValidationError, UnicodeDecodeError) as exc:
        request_id = salvage_id(payload)
        code = ProtocolError.code if request_id is None else InvalidInput.code
        return None, Error(request_id, code, f"invalid request: {exc}", False)
    except msgspec.DecodeError:
        return None, Error(None, ProtocolError.code, "malformed frame: not a MessagePack map",
                           False)


def salvage_id(payload: bytes | memoryview) -> int | None:
    """The ``id`` of a payload that is a map with an integer ``id``, else None."""
    try:
        return envelope_decoder.decode(payload).id
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
