"""The wire format: messages, framing, and docs/PROTOCOL.md agreeing with the encoder."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import msgspec
import pytest
from ango.server import NOOP_CODE
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ango.errors import ERRORS_BY_CODE
from ango.framing import encode_frame
from ango.protocol import (
    MAX_FRAME,
    PROTOCOL_VERSION,
    Batch,
    BatchList,
    Claim,
    Code,
    Error,
    Expire,
    Expired,
    GetStats,
    Hello,
    ListBatches,
    Ping,
    Pong,
    Stats,
    Welcome,
    request_decoder,
    response_decoder,
    salvage_id,
)
from tests.servers import InProcessServer, connect, hello, recv, send

DOC = Path(__file__).resolve().parent.parent / "docs" / "PROTOCOL.md"

REQUESTS = [
    Hello(0, PROTOCOL_VERSION, "tok", "me"),
    Claim(1, "b", "c"),
    Claim(2**64 - 1, "b", "c", "cl", "r"),
    ListBatches(3),
    Expire(4, "b"),
    GetStats(5),
    Ping(6),
]
RESPONSES = [
    Welcome(0, PROTOCOL_VERSION, "ango/x", MAX_FRAME, 10, 1.5),
    Code(1, "CODE"),
    BatchList(3, [Batch("b", "n", "cl", {"maxpercustomer": 2}, False, 3, 1, 2, "2026-01-01")]),
    Expired(4, True),
    Stats(5, {"shards_alive": 2, "per_shard": [{"x": 1}]}),
    Pong(6),
    Error(7, "batch_expired", "expired", False),
    Error(None, "protocol", "bye", False),
]


def hexdump(data: bytes) -> str:
    """Offset, 16 bytes in hex, and their printable characters, per line."""
    lines = []
    for off in range(0, len(data), 16):
        chunk = data[off:off + 16]
        hexpart = " ".join(f"{b:02x}" for b in chunk)
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        lines.append(f"{off:04x}  {hexpart:<47}  |{text}|")
    return "\n".join(lines)


#: The claim round trip shown byte by byte in docs/PROTOCOL.md.
EXAMPLE = [
    Hello(1, 1, "s3cret", "ango-python"),
    Welcome(1, 1, "ango/0.1.0", 65536, 1024, 300.0),
    Claim(2, "5f0c6e2a-3b7d-4c1e-9a8f-2d4b6c8e0a1f", "alice", None, "order-17"),
    Code(2, "LFXCTNCSBP"),
]


@pytest.mark.parametrize("msg", REQUESTS, ids=lambda m: type(m).__name__)
def test_every_request_round_trips_through_a_frame(msg):
    frame = encode_frame(msg)
    assert struct.unpack(">I", frame[:4])[0] == len(frame) - 4
    assert request_decoder.decode(frame[4:]) == msg


@pytest.mark.parametrize("msg", RESPONSES, ids=lambda m: type(m).__name__)
def test_every_response_round_trips_through_a_frame(msg):
    assert response_decoder.decode(encode_frame(msg)[4:]) == msg


def test_messages_are_maps_tagged_by_type_as_documented():
    doc = DOC.read_text()
    for msg in REQUESTS + RESPONSES:
        raw = msgspec.msgpack.decode(encode_frame(msg)[4:])
        assert isinstance(raw, dict) and "id" in raw
        assert f'`"{raw["type"]}"`' in doc, raw["type"]
        for field in raw:
            assert f"`{field}`" in doc, field


def test_every_error_code_is_documented():
    doc = DOC.read_text()
    for code in ERRORS_BY_CODE:
        assert f"`{code}`" in doc, code


def test_optional_fields_may_be_absent_and_unknown_fields_are_ignored():
    raw = msgspec.msgpack.encode({"type": "claim", "id": 9, "batch_id": "b", "customer_id": "c",
                                  "future_field": [1, 2]})
    assert request_decoder.decode(raw) == Claim(9, "b", "c", None, None)


def test_salvage_id_finds_the_id_of_an_invalid_request_only():
    assert salvage_id(msgspec.msgpack.encode({"type": "nope", "id": 12})) == 12
    assert salvage_id(msgspec.msgpack.encode([1, 2])) is None
    assert salvage_id(b"\xc1") is None


def test_the_byte_level_example_in_the_spec_is_what_the_encoder_produces():
    doc = DOC.read_text()
    for msg in EXAMPLE:
        assert hexdump(encode_frame(msg)) in doc, f"docs/PROTOCOL.md is stale for {msg}"


@pytest.fixture(scope="module")
def fuzz_server():
    with InProcessServer(None) as srv:
        yield srv


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(junk=st.one_of(
    st.binary(min_size=1, max_size=300),
    st.builds(lambda n, body: struct.pack(">I", n) + body,
              st.integers(0, 400), st.binary(max_size=300)),
    st.builds(msgspec.msgpack.encode, st.dictionaries(
        st.sampled_from(["type", "id", "batch_id", "customer_id", "token", "version"]),
        st.one_of(st.none(), st.integers(-2**63, 2**64 - 1), st.text(max_size=20),
                  st.sampled_from(["claim", "ping"])),
    )).map(lambda p: struct.pack(">I", len(p)) + p),
))
def test_any_bytes_after_hello_get_answers_or_an_error_and_never_harm_others(fuzz_server, junk):
    port = fuzz_server.port
    with connect(port, timeout=5) as sock:
        assert type(hello(sock)) is Welcome
        sock.sendall(junk)
        sock.shutdown(socket.SHUT_WR)  # the server answers what it can, then closes
        sock.settimeout(5)
        while True:
            try:
                resp = recv(sock)
            except ConnectionError:
                break
            assert type(resp) in (Code, Pong, Error, Welcome, BatchList, Expired, Stats)
            if type(resp) is Error and resp.id is None:
                break
    with connect(port, timeout=5) as other:
        assert type(hello(other)) is Welcome
        send(other, Claim(1, "b", "c"))
        assert recv(other) == Code(1, NOOP_CODE)
