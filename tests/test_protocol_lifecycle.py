"""The messages added for the life of a batch and of a code: frames and docs agree."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec
import pytest

import ango
from ango.framing import encode_frame
from ango.protocol import (
    CodeInfo,
    CustomerCode,
    CustomerCodeList,
    CustomerCodes,
    DeleteBatch,
    Deleted,
    Lookup,
    RulesSet,
    ScheduleSet,
    SetRules,
    SetSchedule,
    request_decoder,
    response_decoder,
)
from tests.servers import TOKEN, InProcessServer, new_batch

DOC = Path(__file__).resolve().parent.parent / "docs" / "PROTOCOL.md"

REQUESTS = [
    Lookup(1, "CODE-1"),
    CustomerCodes(2, "ann"),
    CustomerCodes(3, "ann", "5f0c6e2a-3b7d-4c1e-9a8f-2d4b6c8e0a1f", 10),
    SetRules(4, "b", {"maxpercustomer": 1}),
    SetRules(5, "b", None),
    SetSchedule(6, "b", "2030-01-01T00:00:00Z", None),
    SetSchedule(7, "b", expires_at="2030-01-01T00:00:00Z"),
    DeleteBatch(8, "b", True),
]
RESPONSES = [
    CodeInfo(1, "CODE-1", "never_imported"),
    CodeInfo(1, "CODE-1", "issued", "b", "name", "cl", "ann", "2026-01-01T00:00:00+00:00", "r"),
    CustomerCodeList(2, [CustomerCode("C", "b", "n", "2026-01-01T00:00:00+00:00", "r")]),
    RulesSet(4, {"maxpercustomer": 1}),
    ScheduleSet(6, "b", "2030-01-01T00:00:00+00:00", None),
    Deleted(8, "b", True, 10, 3),
]


@pytest.mark.parametrize("msg", REQUESTS + RESPONSES, ids=lambda m: f"{type(m).__name__}{m.id}")
def test_added_messages_round_trip_and_are_documented(msg):
    frame = encode_frame(msg)
    decoder = request_decoder if any(msg is r for r in REQUESTS) else response_decoder
    assert decoder.decode(frame[4:]) == msg
    raw = msgspec.msgpack.decode(frame[4:])
    doc = DOC.read_text()
    assert f'`"{raw["type"]}"`' in doc, raw["type"]
    for field in raw:
        assert f"`{field}`" in doc, field
    for item in raw.get("codes", []):
        for field in item:
            assert f"`{field}`" in doc, field


def test_an_absent_schedule_field_keeps_its_value_and_nil_clears_it():
    raw = msgspec.msgpack.encode({"type": "set_schedule", "id": 1, "batch_id": "b",
                                  "expires_at": None})
    msg = request_decoder.decode(raw)
    assert msg.starts_at is msgspec.UNSET and msg.expires_at is None
    assert "starts_at" not in msgspec.msgpack.decode(encode_frame(msg)[4:])


def test_rules_schedule_and_delete_over_the_protocol(dsn):
    batch = new_batch(dsn, 10, {"maxpercustomer": 3})
    with InProcessServer(lambda: ango.Allocator(dsn, shards=1)) as srv:
        with ango.Client(port=srv.port, token=TOKEN, timeout=30) as client:
            client.claim(batch, "ann")
            assert client.set_rules(batch, {"maxpercustomer": 1}) == {"maxpercustomer": 1}
            with pytest.raises(ango.RuleViolation):
                client.claim(batch, "ann")
            with pytest.raises(ango.InvalidInput, match="unknown key"):
                client.set_rules(batch, {"nope": 1})
            schedule = client.set_schedule(batch, expires_at="2099-01-01T00:00:00Z")
            assert schedule["starts_at"] is None and schedule["expires_at"].startswith("2099")
            schedule = client.set_schedule(batch, starts_at=None)  # the end is kept
            assert schedule["expires_at"].startswith("2099")
            with pytest.raises(ango.InvalidInput, match="is live"):
                client.delete(batch)
            client.expire(batch)

        async def go():
            async with await ango.AsyncClient.connect(port=srv.port, token=TOKEN,
                                                      timeout=30) as c:
                with pytest.raises(ango.BatchExpired):
                    await c.set_rules(batch, None)
                with pytest.raises(ango.BatchExpired):
                    await c.set_schedule(batch, expires_at=None)
                return await c.delete(batch), await c.delete(batch, purge=True)

        deleted, purged = asyncio.run(go())
    assert deleted == {"batch_id": batch, "purged": False, "codes_deleted": 9,
                       "issues_deleted": 0}
    assert purged == {"batch_id": batch, "purged": True, "codes_deleted": 1,
                      "issues_deleted": 1}
