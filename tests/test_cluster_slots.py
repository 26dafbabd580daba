"""Fair shares of routing slots and the moves toward them (ango.cluster.slots), no database."""

from __future__ import annotations

import random
import zlib

from ango.cluster.slots import fair_shares, plan, slot_of

SLOTS = 1024


def converge(owners: list[str | None], live: list[str], rounds: int = 20) -> int:
    """Let every live instance apply its plan in turn until nothing moves; the rounds taken."""
    for round_ in range(rounds):
        moved = False
        for me in random.sample(live, len(live)):
            moves = plan(me, owners, live)
            for s in moves.take:
                owners[s] = me
            for to, slots in moves.give.items():
                for s in slots:
                    assert owners[s] == me, "handed over a slot it does not own"
                    owners[s] = to
            moved |= bool(moves.take or moves.give)
        if not moved:
            return round_
    raise AssertionError(f"no fixed point after {rounds} rounds")


def counts(owners: list[str | None]) -> dict[str, int]:
    found: dict[str, int] = {}
    for o in owners:
        if o is not None:
            found[o] = found.get(o, 0) + 1
    return found


def test_fair_shares_cover_every_slot_and_differ_by_one_at_most():
    shares = fair_shares(["c", "a", "b"], SLOTS)
    assert sum(shares.values()) == SLOTS
    assert shares == {"a": 342, "b": 341, "c": 341}
    assert fair_shares([], SLOTS) == {}


def test_a_lone_instance_takes_every_slot():
    owners: list[str | None] = [None] * SLOTS
    converge(owners, ["a"])
    assert counts(owners) == {"a": SLOTS}


def test_newcomers_get_their_share_handed_over():
    owners: list[str | None] = ["a"] * SLOTS
    converge(owners, ["a", "b", "c"])
    assert counts(owners) == fair_shares(["a", "b", "c"], SLOTS)


def test_the_slots_of_a_dead_instance_go_to_the_live_ones():
    owners: list[str | None] = [None] * SLOTS
    converge(owners, ["a", "b", "c"])
    converge(owners, ["a", "c"])  # b died: its slots have no live owner
    assert counts(owners) == fair_shares(["a", "c"], SLOTS)
    assert "b" not in owners


def test_nothing_moves_once_balanced():
    owners: list[str | None] = [None] * SLOTS
    live = ["ango-0", "ango-1", "ango-2"]
    converge(owners, live)
    for me in live:
        moves = plan(me, owners, live)
        assert moves.take == [] and moves.give == {}


def test_an_instance_above_its_share_gives_nothing_while_slots_are_free():
    owners: list[str | None] = ["a"] * 700 + [None] * (SLOTS - 700)
    moves = plan("a", owners, ["a", "b"])
    assert moves.give == {} and moves.take == []
    assert len(plan("b", owners, ["a", "b"]).take) == SLOTS - 700


def test_slot_of_is_the_documented_crc32():
    batch = "5f0c6e2a-3b7d-4c1e-9a8f-2d4b6c8e0a1f"
    assert slot_of(batch, "alice", SLOTS) == zlib.crc32(f"{batch}/alice".encode()) % SLOTS
    assert slot_of(batch, "alice", SLOTS) == 284  # the example of docs/PROTOCOL.md


def test_a_shard_forgets_the_counters_of_slots_that_moved_away_and_only_those():
    from ango.shards import messages as m
    from ango.shards.claims import BatchMeta
    from ango.shards.worker import Shard

    shard = Shard("postgresql://unused", 0, 1, "instance", [0])  # connects only in start()
    held = shard.group_commit
    batch = "5f0c6e2a-3b7d-4c1e-9a8f-2d4b6c8e0a1f"
    held.batches[batch] = BatchMeta(7, "client", 2, None, False)
    customers = [f"customer-{i}" for i in range(200)]
    for c in customers:
        held.counters.load((7, c), 2, {0: 1.0})
    moved = {slot_of(batch, c, SLOTS) for c in customers[:50]}
    shard.receive(m.ForgetSlots(sorted(moved), SLOTS))
    kept = [c for c in customers if slot_of(batch, c, SLOTS) not in moved]
    assert len(held.counters) == len(kept) >= 100
    for c in kept:  # a kept counter still knows its taken slot
        assert held.counters.reserve((7, c), 2, None, 0.0) == 1


def test_a_server_outside_a_cluster_answers_an_empty_map():
    import ango
    from tests.servers import TOKEN, InProcessServer

    with InProcessServer(None) as srv, ango.Client("127.0.0.1", srv.port, TOKEN) as client:
        found = client.partition_map()
    assert found["slots"] == 0 and found["owners"] == [] and found["addresses"] == []


def test_moved_and_forwarded_are_optional_on_the_wire():
    import msgspec

    from ango.framing import encode_frame
    from ango.protocol import Claim, Code, request_decoder, response_decoder

    # A code answer without ``moved`` (an older server) is not moved; one that is says so.
    plain = msgspec.msgpack.encode({"type": "code", "id": 1, "code": "X"})
    assert response_decoder.decode(plain) == Code(1, "X", False)
    assert b"moved" not in encode_frame(Code(1, "X"))
    assert response_decoder.decode(encode_frame(Code(1, "X", True))[4:]).moved is True
    # A claim leaves ``forwarded`` out unless set.
    assert b"forwarded" not in encode_frame(Claim(2, "b", "c", None, "r"))
    assert request_decoder.decode(encode_frame(Claim(2, "b", "c", None, "r", True))[4:]
                                  ).forwarded is True
