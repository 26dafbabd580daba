"""Protocol fuzzing against running servers: whatever arrives, well-behaved clients keep
getting correct answers, nothing is issued wrongly, and the server's memory stays bounded.

Two targets: ``ango serve --noop`` as a process (volume, and its RSS measured by
psutil) and an in-process server over a real ``ango.Allocator`` (fewer frames,
checked against PostgreSQL). The number of frames tried is printed at the end.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
import socket
import struct
import threading

import psutil
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ango
from ango.audit import violations
from ango.protocol import (
    MAX_FRAME,
    PROTOCOL_VERSION,
    Claim,
    Code,
    Error,
    Expire,
    GetStats,
    Hello,
    ListBatches,
    Ping,
    Response,
    Welcome,
)
from tests.hostile import (
    WellBehaved,
    any_text,
    as_frame,
    drain,
    garbage,
    good_hello,
    module_dsn,  # noqa: F401 (a fixture)
    uuids,
    valid_requests,
    wrong_types,
)
from tests.servers import TOKEN, InProcessServer, ServeProcess, connect, new_batch

#: Frames sent, per target, across the module (printed by the last test).
TRIED: collections.Counter = collections.Counter()
#: RSS growth allowed over the whole module: generous, a leak per frame would blow it.
RSS_SLACK = 64 * 1024 * 1024
FUZZ = settings(deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

frames = st.one_of(valid_requests().map(as_frame), wrong_types.map(as_frame), garbage)


@pytest.fixture(scope="module")
def noop_serve():
    """``ango serve --noop`` with a well-behaved client claiming throughout."""
    proc = ServeProcess("--noop", env={"ANGO_TOKEN": TOKEN}).start()
    try:
        with WellBehaved(proc.port, "any", expect="NOOP") as good:
            blast(proc.port, random.Random(0), 2000, "noop")  # warm up before measuring
            proc.rss_before = psutil.Process(proc.proc.pid).memory_info().rss
            yield proc, good
        assert good.problems == []
        assert good.served > 0
    finally:
        proc.stop()


def exchange(port: int, payload: bytes) -> list:
    """Authenticate, send ``payload``, half-close, and read every answer until the close."""
    with connect(port, timeout=10) as sock:
        sock.sendall(good_hello() + payload)
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        answers = drain(sock)
    assert answers and type(answers[0]) is Welcome
    closing = [a for a in answers if type(a) is Error and a.id is None]
    assert len(closing) <= 1 and (not closing or answers[-1] is closing[0])
    return answers[1:]


def mutate(rng: random.Random, data: bytes) -> bytes:
    """A valid frame damaged in one of several ways."""
    how = rng.randrange(6)
    if how == 0 and data:  # flip bytes
        b = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return bytes(b)
    if how == 1:  # truncated
        return data[:rng.randrange(len(data) + 1)]
    if how == 2:  # the header lies about the length
        return struct.pack(">I", rng.choice([0, 1, len(data), MAX_FRAME, MAX_FRAME + 1,
                                             2**32 - 1])) + data[4:]
    if how == 3:  # payload bytes shuffled
        body = bytearray(data[4:])
        rng.shuffle(body)
        return data[:4] + bytes(body)
    if how == 4:  # random bytes in a frame
        return as_frame_bytes(rng.randbytes(rng.randrange(64)))
    return data  # intact


def as_frame_bytes(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def seed_frames(rng: random.Random) -> list[bytes]:
    """Valid frames of every request type, to mutate."""
    i = rng.randrange(2**32)
    return [as_frame(m) for m in (
        Claim(i, "b", "c"), Claim(i, str(rng.random()), "c" * rng.randrange(300), "x", "r"),
        ListBatches(i), Expire(i, "b"), GetStats(i), Ping(i),
        Hello(i, PROTOCOL_VERSION, TOKEN), {"type": "claim", "id": i, "batch_id": [1]},
    )]


def blast(port: int, rng: random.Random, count: int, target: str) -> None:
    """``count`` mutated frames over connections of up to 50 frames each."""
    sent = 0
    while sent < count:
        batch = [mutate(rng, rng.choice(seed_frames(rng))) for _ in range(rng.randint(1, 50))]
        for answer in exchange(port, b"".join(batch)):
            assert isinstance(answer, Response.__args__)
        sent += len(batch)
    TRIED[target] += sent


def test_twenty_thousand_mutated_frames_against_serve_noop(noop_serve):
    proc, good = noop_serve
    blast(proc.port, random.Random(1), 20_000, "noop")
    assert good.problems == []


@settings(FUZZ, max_examples=300)
@given(payload=st.lists(frames, min_size=1, max_size=12), cut=st.none() | st.integers(0, 300))
def test_any_frames_of_any_message_get_answers_or_a_clean_close(noop_serve, payload, cut):
    proc, good = noop_serve
    data = b"".join(payload)
    answers = exchange(proc.port, data if cut is None else data[:cut])
    for answer in answers:
        if type(answer) is Code:
            assert answer.code == "NOOP"
    TRIED["noop"] += len(payload)


def test_memory_of_serve_noop_stays_bounded(noop_serve):
    proc, good = noop_serve
    blast(proc.port, random.Random(2), 5000, "noop")
    after = psutil.Process(proc.proc.pid).memory_info().rss
    assert after - proc.rss_before < RSS_SLACK, (proc.rss_before, after)
    assert good.problems == []


# --- against the real allocator --------------------------------------------------------


@pytest.fixture(scope="module")
def real(module_dsn):  # noqa: F811
    """A server over ``ango.Allocator`` (2 shards), a batch, and a well-behaved client."""
    batch = new_batch(module_dsn, 20_000, {"maxpercustomer": 2})
    other = new_batch(module_dsn, 5000)
    with InProcessServer(lambda: ango.Allocator(module_dsn, shards=2)) as srv:
        with WellBehaved(srv.port, other) as good:
            yield srv, batch, good, []
    assert good.problems == []


@settings(FUZZ, max_examples=60)
@given(data=st.data())
def test_fuzzed_claims_against_the_allocator_issue_only_what_they_answer(real, data):
    srv, batch, good, handed = real
    claims = data.draw(st.lists(st.builds(
        lambda b, cust, cl, rid: (b, cust, cl, rid),
        st.one_of(st.just(batch), uuids, any_text),
        st.one_of(st.sampled_from(["ann", "bob", "cy"]), any_text),
        st.one_of(st.none(), st.just("c0ffee00-0000-4000-8000-000000000001"), any_text),
        st.one_of(st.none(), st.sampled_from(["r1", "r2", "r3"]), any_text),
    ), min_size=1, max_size=8))
    noise = data.draw(st.lists(st.one_of(wrong_types.map(as_frame),
                                         valid_requests(st.just(batch)).map(as_frame)),
                               max_size=4))
    sent = {i: c for i, c in enumerate(claims, start=2**63 + 12345)}
    payload = b"".join(as_frame(Claim(i, *c)) for i, c in sent.items()) + b"".join(noise)
    for answer in exchange(srv.port, payload):
        if type(answer) is Code and answer.id in sent:
            b, customer, _, rid = sent[answer.id]
            handed.append((answer.code, b, customer, rid))
    TRIED["allocator"] += len(sent) + len(noise)


def test_what_the_fuzzed_allocator_answered_is_what_postgres_recorded(real, module_dsn):  # noqa: F811
    srv, batch, good, handed = real
    answers = dict(good.answers)  # before reading the database: answered means committed
    with psycopg.connect(module_dsn) as conn:
        issues = {code: (customer, rid) for code, customer, rid in conn.execute(
            "SELECT code, customer_id, request_id FROM ango.issues")}
        assert violations(conn) == []
    for code, _, customer, rid in handed:
        assert issues[code][0] == customer
        if rid is not None:
            assert issues[code][1] == rid
    for rid, code in answers.items():
        assert issues[code] == (f"good-{int(rid.split('-')[1]) % 50}", rid)
    assert good.problems == []


def test_report_frames_tried(capsys):
    total = sum(TRIED.values())
    with capsys.disabled():
        print(f"\nprotocol fuzzing: {total} frames tried ({dict(TRIED)})")
    assert TRIED["noop"] >= 20_000 and TRIED["allocator"] > 0


# --- found by fuzzing ------------------------------------------------------------------

#: MessagePack maps holding a str that is not UTF-8 (0xc9 cannot follow 'l' or start a str).
NOT_UTF8 = [
    b"\x82\xa4type\xa5cl\xc9im\xa2id\x05",  # in the type tag
    b"\x84\xa4type\xa5claim\xa2id\x05\xa8batch_id\xa3\xc9\xc9x\xabcustomer_id\xa1c",  # a field
]


@pytest.mark.parametrize("payload", NOT_UTF8, ids=["tag", "field"])
def test_a_string_that_is_not_utf8_gets_an_error_frame_and_others_carry_on(payload):
    """msgspec raises UnicodeDecodeError here, neither DecodeError nor ValidationError; it
    used to escape ``Connection._handle`` and drop the connection without an answer."""
    with InProcessServer(None) as srv:
        answers = exchange(srv.port, as_frame_bytes(payload) + as_frame(Ping(6)))
        assert answers[0] == Error(5, "invalid_input", answers[0].message, False)
        assert answers[1].id == 6
        assert exchange(srv.port, as_frame(Claim(1, "b", "c"))) == [Code(1, "NOOP")]


@pytest.fixture
def lying_server():
    """A TCP server that answers anything with one frame whose type tag is not UTF-8."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn, contextlib.suppress(OSError):  # clients now drop and retry: resets
                conn.recv(65536)
                conn.sendall(as_frame_bytes(b"\x82\xa4type\xa5we\xc9come\xa2id\x01"))
                conn.recv(65536)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join(5)
    listener.close()


def test_clients_treat_an_answer_that_is_not_utf8_as_lost_never_as_definitive(lying_server):
    """A frame a client cannot decode drops the connection; what was pending is retried,
    then reported as the retryable Unavailable (issue 9, item 3), never as ProtocolError."""
    with pytest.raises(ango.Unavailable):
        ango.Client(port=lying_server, token=TOKEN, timeout=1)

    async def go() -> None:
        await ango.AsyncClient.connect(port=lying_server, token=TOKEN, timeout=1)

    with pytest.raises(ango.Unavailable):
        asyncio.run(go())
