"""What docs/PROTOCOL.md settles, done by the server as written (issue 9, item 13): control
characters, UUID spellings, a request id reused by another customer, ``welcome`` before the
answers pipelined behind the hello, and the keys of ``stats``.

The range of ``id`` (−2^63 … 2^64 − 1, echoed; anything else ``protocol``) is pinned by
tests/test_bad_input.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import ango
from ango.errors import InvalidInput
from ango.protocol import PROTOCOL_VERSION, Claim, Code, GetStats, Hello, Ping, Stats, Welcome
from tests.hostile import module_dsn, raw  # noqa: F401 (module_dsn: a fixture)
from tests.servers import CLIENT_ID, TOKEN, InProcessServer, connect, issued, new_batch, recv, send

DOC = (Path(__file__).parent.parent / "docs" / "PROTOCOL.md").read_text()


@pytest.fixture(scope="module")
def env(module_dsn):  # noqa: F811
    """A server over a real allocator (2 shards) and a batch of 200 codes."""
    batch = new_batch(module_dsn, 200)
    with InProcessServer(lambda: ango.Allocator(module_dsn, shards=2)) as srv:
        yield srv, batch


def claim_on_the_wire(port: int, **fields) -> object:
    """One claim after a good hello; its answer."""
    message = {"type": "claim", "id": 4, "customer_id": "cust", "client_id": None,
               "request_id": None, **fields}
    with connect(port) as sock:
        sock.sendall(raw({"type": "hello", "id": 0, "version": PROTOCOL_VERSION, "token": TOKEN})
                     + raw(message))
        assert type(recv(sock)) is Welcome
        return recv(sock)


def claim_directly(srv: InProcessServer, *args, **kwargs) -> object:
    """``Allocator.claim`` in the server's loop: the code, or the exception."""
    async def go():
        try:
            return await srv.allocator.claim(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 (what the test checks)
            return exc

    return srv.call(go)


# --- control characters -----------------------------------------------------------------

C1_AND_C0 = ["\x80", "\x85", "\x9f", "\x00", "\x1b", "\x7f"]


@pytest.mark.parametrize("char", C1_AND_C0, ids=lambda c: f"U+{ord(c):04X}")
@pytest.mark.parametrize("field", ["customer_id", "request_id"])
def test_every_unicode_control_character_is_refused_on_the_wire_and_by_the_allocator(
        env, field, char, module_dsn):  # noqa: F811
    srv, batch = env
    before = len(issued(module_dsn))
    value = f"a{char}b"
    answer = claim_on_the_wire(srv.port, batch_id=batch, **{field: value})
    assert answer.code == "invalid_input" and "control character" in answer.message
    kwargs = {"request_id": value} if field == "request_id" else {}
    customer = value if field == "customer_id" else "cust"
    outcome = claim_directly(srv, batch, customer, **kwargs)
    assert type(outcome) is InvalidInput and "control character" in str(outcome)
    assert len(issued(module_dsn)) == before


def test_a_lone_surrogate_is_refused_by_the_allocator(env):
    srv, batch = env
    outcome = claim_directly(srv, batch, "a\ud800b")
    assert type(outcome) is InvalidInput and "surrogate" in str(outcome)


def test_text_that_is_not_a_control_character_is_kept_as_sent(env, module_dsn):  # noqa: F811
    srv, batch = env
    customer = "Zoë 😀\u2028\u00a0 ok"  # a line separator and a no-break space are not Cc
    answer = claim_on_the_wire(srv.port, batch_id=batch, customer_id=customer,
                               request_id="r-\u00e9\u200b")
    assert type(answer) is Code
    assert (answer.code, customer, "r-\u00e9\u200b") in issued(module_dsn)


# --- UUID spellings -------------------------------------------------------------------------


def test_the_documented_uuid_spellings_name_the_same_batch(env, module_dsn):  # noqa: F811
    srv, batch = env
    spellings = [batch, batch.upper(), batch.replace("-", ""), batch.replace("-", "").upper()]
    codes = [claim_on_the_wire(srv.port, batch_id=b, customer_id="uuid-forms",
                               client_id=CLIENT_ID.upper(), request_id="same")
             for b in spellings]
    assert all(type(c) is Code for c in codes) and len({c.code for c in codes}) == 1
    mine = [row for row in issued(module_dsn) if row[2] == "same"]
    assert mine == [(codes[0].code, "uuid-forms", "same")]
    with ango.Client(port=srv.port, token=TOKEN, timeout=30) as client:
        listed = client.batches()
    assert all(re.fullmatch(r"[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}", b[k])
               for b in listed for k in ("id", "client_id"))


@pytest.mark.parametrize("spell", [
    lambda b: "{" + b + "}",
    lambda b: "urn:uuid:" + b,
    lambda b: b[:8] + b[9:13] + "-" + b[13:],  # a hyphen missing
    lambda b: b.replace("-", "")[:4] + "-" + b.replace("-", "")[4:],  # hyphens elsewhere
    lambda b: " " + b,
    lambda b: b + "\n",
], ids=["braces", "urn", "hyphen-missing", "hyphen-elsewhere", "space", "newline"])
def test_other_uuid_spellings_are_invalid_input(env, spell, module_dsn):  # noqa: F811
    srv, batch = env
    before = len(issued(module_dsn))
    answer = claim_on_the_wire(srv.port, batch_id=spell(batch))
    assert answer.code == "invalid_input" and "UUID" in answer.message
    answer = claim_on_the_wire(srv.port, batch_id=batch, client_id=spell(CLIENT_ID))
    assert answer.code == "invalid_input" and "UUID" in answer.message
    assert type(claim_directly(srv, spell(batch), "cust")) is InvalidInput
    assert len(issued(module_dsn)) == before


# --- a request id reused by another customer -------------------------------------------------


def test_a_request_id_reused_by_another_customer_is_refused_and_the_first_keeps_its_code(
        env, module_dsn):  # noqa: F811
    srv, batch = env
    with ango.Client(port=srv.port, token=TOKEN, timeout=30) as client:
        code = client.claim(batch, "first", request_id="order-17")
        with pytest.raises(InvalidInput) as caught:
            client.claim(batch, "second", request_id="order-17")
        assert not caught.value.retryable
        assert client.claim(batch, "first", request_id="order-17") == code
    assert [row for row in issued(module_dsn) if row[2] == "order-17"] == [
        (code, "first", "order-17")]


# --- ordering ------------------------------------------------------------------------------


def test_welcome_is_the_first_frame_before_the_answers_pipelined_behind_the_hello(env):
    srv, batch = env
    with connect(srv.port) as sock:
        send(sock, Hello(1, PROTOCOL_VERSION, TOKEN), Ping(2), GetStats(3),
             Claim(4, batch, "pipelined", None, "pipe-1"), Ping(5))
        answers = [recv(sock) for _ in range(5)]
    assert type(answers[0]) is Welcome and answers[0].id == 1
    assert sorted(a.id for a in answers[1:]) == [2, 3, 4, 5]


# --- stats -------------------------------------------------------------------------------


def documented_keys(table_header: str) -> set[str]:
    """The keys in the first column of the table of docs/PROTOCOL.md under ``table_header``."""
    lines = DOC[DOC.index(table_header):].splitlines()[2:]
    return {re.match(r"\| `(\w+)` \|", line).group(1)
            for line in lines[:next(i for i, line in enumerate(lines) if not line.strip())]}


def test_stats_returns_exactly_the_documented_keys(env):
    srv, _ = env
    with connect(srv.port) as sock:
        send(sock, Hello(1, PROTOCOL_VERSION, TOKEN), GetStats(2))
        recv(sock)
        reply = recv(sock)
    assert type(reply) is Stats
    stats = reply.stats
    assert set(stats) == documented_keys("| key of `stats` |")
    assert set(stats["server"]) == documented_keys("| key of `server` |")
    per_shard_row = next(line for line in DOC.splitlines() if line.startswith("| `per_shard` |"))
    running = per_shard_row.split("running shard's map has")[1].split(";")[0]
    assert len(stats["per_shard"]) == stats["shards"] == 2
    for shard in stats["per_shard"]:
        assert set(shard) >= set(re.findall(r"`(\w+)`", running))


def test_stats_of_a_noop_server_are_the_server_keys_at_the_top_level():
    with InProcessServer(None) as srv, connect(srv.port) as sock:
        send(sock, Hello(1, PROTOCOL_VERSION, TOKEN), GetStats(2))
        recv(sock)
        reply = recv(sock)
    assert set(reply.stats) == documented_keys("| key of `server` |") | {"metrics"}
