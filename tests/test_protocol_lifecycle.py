"""The messages added for the life of a batch and of a code: frames and docs agree."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from ango.protocol import (
    CodeInfo,
    CustomerCode,
    CustomerCodeList,
    CustomerCodes,
    Lookup,
    encode_frame,
    request_decoder,
    response_decoder,
)

DOC = Path(__file__).resolve().parent.parent / "docs" / "PROTOCOL.md"

REQUESTS = [
    Lookup(1, "CODE-1"),
    CustomerCodes(2, "ann"),
    CustomerCodes(3, "ann", "5f0c6e2a-3b7d-4c1e-9a8f-2d4b6c8e0a1f", 10),
]
RESPONSES = [
    CodeInfo(1, "CODE-1", "never_imported"),
    CodeInfo(1, "CODE-1", "issued", "b", "name", "cl", "ann", "2026-01-01T00:00:00+00:00", "r"),
    CustomerCodeList(2, [CustomerCode("C", "b", "n", "2026-01-01T00:00:00+00:00", "r")]),
]


@pytest.mark.parametrize("msg", REQUESTS + RESPONSES, ids=lambda m: type(m).__name__)
def test_added_messages_round_trip_and_are_documented(msg):
    frame = encode_frame(msg)
    decoder = request_decoder if msg in REQUESTS else response_decoder
    assert decoder.decode(frame[4:]) == msg
    raw = msgspec.msgpack.decode(frame[4:])
    doc = DOC.read_text()
    assert f'`"{raw["type"]}"`' in doc, raw["type"]
    for field in raw:
        assert f"`{field}`" in doc, field
    for item in raw.get("codes", []):
        for field in item:
            assert f"`{field}`" in doc, field
