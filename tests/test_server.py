"""The protocol server on real sockets: handshake, limits, robustness, shutdown, `ango serve`."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import stat
import struct
import subprocess
import threading
import time

import msgspec
import pytest
from ango.server import NOOP_CODE, Limits

import ango
from ango.framing import encode_frame
from ango.protocol import (
    PROTOCOL_VERSION,
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
)
from tests.hostile import raw
from tests.servers import (
    ANGO,
    TOKEN,
    InProcessServer,
    ServeProcess,
    closed_by_peer,
    connect,
    hello,
    issued,
    new_batch,
    recv,
    send,
)


def wait_for(predicate, timeout: float = 30.0) -> None:
    """Poll until ``predicate()`` holds (fails the test after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition never held")
        time.sleep(0.01)


class HeldAllocator:
    """A fake allocator whose claims wait until the test releases them."""

    def __init__(self) -> None:
        self.waiting: list[tuple[asyncio.Future, str | None]] = []
        self.max_waiting = 0
        self.request_ids: list[str | None] = []

    def claim(self, batch_id, customer_id, *, client_id=None, request_id=None):
        fut = asyncio.get_running_loop().create_future()
        self.waiting.append((fut, request_id))
        self.request_ids.append(request_id)
        self.max_waiting = max(self.max_waiting, len(self.waiting))
        return fut

    def release(self) -> int:
        """Answer every waiting claim with ``CODE-<request id>``; return how many."""
        waiting, self.waiting = self.waiting, []
        for fut, request_id in waiting:
            if not fut.done():
                fut.set_result(f"CODE-{request_id}")
        return len(waiting)

    async def expire(self, batch_id):
        return True

    async def batches(self):
        return []

    async def stats(self):
        return {"shards_alive": 0}


@pytest.fixture
def noop():
    with InProcessServer(None) as srv:
        yield srv


def authed(port: int):
    sock = connect(port)
    assert type(hello(sock)) is Welcome
    return sock


def claim_works(port: int) -> bool:
    """A fresh, well-behaved connection gets a claim answered."""
    with authed(port) as sock:
        send(sock, Claim(7, "b", "c"))
        resp = recv(sock)
        return type(resp) is Code and resp.id == 7


# --- handshake -------------------------------------------------------------------


def test_hello_with_the_token_is_welcomed_with_the_limits(noop):
    with connect(noop.port) as sock:
        resp = hello(sock)
    assert resp == Welcome(0, PROTOCOL_VERSION, f"ango/{ango.__version__}", 64 * 1024, 1024, 300.0)


@pytest.mark.parametrize("token", ["wrong", "", TOKEN + "x", TOKEN[:-1]])
def test_a_wrong_or_missing_token_is_refused_and_the_connection_closed(noop, token):
    with connect(noop.port) as sock:
        send(sock, Hello(1, PROTOCOL_VERSION, token), Claim(2, "b", "c"))
        resp = recv(sock)
        assert resp.id is None and resp.code == "unauthorized"
        assert closed_by_peer(sock)
    assert noop.server.claims_served == 0


def test_requests_before_hello_are_refused(noop):
    with connect(noop.port) as sock:
        send(sock, Claim(1, "b", "c"))
        resp = recv(sock)
        assert type(resp) is Error and resp.code == "unauthorized"
        assert closed_by_peer(sock)
    assert noop.server.claims_served == 0


def test_another_protocol_version_is_refused(noop):
    with connect(noop.port) as sock:
        send(sock, Hello(1, PROTOCOL_VERSION + 1, TOKEN))
        resp = recv(sock)
        assert resp.code == "protocol" and "version" in resp.message
        assert closed_by_peer(sock)


def test_a_hello_whose_optional_client_is_nil_is_welcomed(noop):
    with connect(noop.port) as sock:
        sock.sendall(raw({"type": "hello", "id": 1, "version": PROTOCOL_VERSION, "token": TOKEN,
                          "client": None}))
        assert type(recv(sock)) is Welcome


def test_a_hello_without_a_token_is_refused_unauthorized_after_the_delay():
    with InProcessServer(None, limits=Limits(auth_failure_delay=1.0)) as srv, \
            connect(srv.port) as sock:
        sock.sendall(raw({"type": "hello", "id": 1, "version": PROTOCOL_VERSION}))
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):  # not at once: a missing token waits like a wrong one
            sock.recv(1, socket.MSG_PEEK)
        sock.settimeout(10)
        resp = recv(sock)
        assert resp.id is None and resp.code == "unauthorized" and "no token" in resp.message
        assert closed_by_peer(sock)


def test_a_second_hello_is_a_protocol_error_and_closes_the_connection(noop):
    with connect(noop.port) as sock:
        assert type(hello(sock)) is Welcome
        send(sock, Hello(5, PROTOCOL_VERSION, TOKEN), Ping(6))
        resp = recv(sock)
        assert resp.id is None and resp.code == "protocol" and "hello" in resp.message
        assert closed_by_peer(sock)  # the ping after it is never answered


def test_a_hello_with_a_field_of_the_wrong_type_is_a_protocol_error(noop):
    with connect(noop.port) as sock:
        sock.sendall(raw({"type": "hello", "id": 1, "version": PROTOCOL_VERSION, "token": 42}))
        resp = recv(sock)
        assert resp.id is None and resp.code == "protocol"
        assert closed_by_peer(sock)


def test_wrong_tokens_are_counted_per_address_and_never_lock_the_right_one_out():
    limits = Limits(auth_failure_delay=0.01, auth_failure_max_delay=0.05)
    with InProcessServer(None, limits=limits) as srv:
        for _ in range(30):
            with connect(srv.port) as sock:
                assert hello(sock, "wrong").code == "unauthorized"
        assert srv.call(lambda: srv.server.auth_failures("127.0.0.1")) == 30
        # Each wrong token waits longer, up to the maximum...
        assert srv.call(lambda: srv.server.auth_failed("127.0.0.1")) == 0.05
        # ...and the right one, from the same address, is welcomed at once.
        with connect(srv.port) as sock:
            assert type(hello(sock)) is Welcome


def test_wrong_token_and_pipelined_claims_issue_nothing_from_a_real_allocator(dsn):
    batch = new_batch(dsn, 10)
    with InProcessServer(lambda: ango.Allocator(dsn, shards=1)) as srv:
        with connect(srv.port) as sock:
            send(sock, Hello(1, PROTOCOL_VERSION, "nope"),
                 *(Claim(i, batch, "eve") for i in range(2, 50)))
            assert recv(sock).code == "unauthorized"
            assert closed_by_peer(sock)
        with connect(srv.port) as sock:  # no hello at all
            send(sock, *(Claim(i, batch, "eve") for i in range(50)))
            assert recv(sock).code == "unauthorized"
            assert closed_by_peer(sock)
    assert issued(dsn) == []


# --- broken input ----------------------------------------------------------------


def test_an_oversized_frame_is_refused_and_others_carry_on(noop):
    bystander = authed(noop.port)
    with authed(noop.port) as sock:
        sock.sendall(struct.pack(">I", 64 * 1024 + 1) + b"\x00" * 100)
        resp = recv(sock)
        assert resp.id is None and resp.code == "protocol" and "exceeds" in resp.message
        assert closed_by_peer(sock)
    send(bystander, Claim(5, "b", "c"))
    assert recv(bystander) == Code(5, NOOP_CODE)
    bystander.close()


def test_a_frame_of_exactly_the_maximum_size_is_accepted(noop):
    with authed(noop.port) as sock:
        body = msgspec.msgpack.encode({"type": "ping", "id": 3, "pad": b""})
        pad = 64 * 1024 - (len(body) - 2) - 3  # an empty bin is 2 bytes, a bin 16 header 3
        payload = msgspec.msgpack.encode({"type": "ping", "id": 3, "pad": b"\x00" * pad})
        assert len(payload) == 64 * 1024
        sock.sendall(struct.pack(">I", len(payload)) + payload)
        assert recv(sock) == Pong(3)


@pytest.mark.parametrize("garbage", [
    b"\x00\x00\x00\x05hello",  # a frame that is not MessagePack
    b"\x00\x00\x00\x01\xc1",  # a byte MessagePack never uses
    b"\x00\x00\x00\x03\x93\x01\x02",  # MessagePack, but an array
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # another protocol: a huge "length"
])
def test_garbage_is_refused_with_an_error_frame_and_others_carry_on(noop, garbage):
    bystander = authed(noop.port)
    with authed(noop.port) as sock:
        sock.sendall(garbage)
        resp = recv(sock)
        assert type(resp) is Error and resp.id is None and resp.code == "protocol"
        assert closed_by_peer(sock)
    send(bystander, Claim(1, "b", "c"))
    assert recv(bystander) == Code(1, NOOP_CODE)
    bystander.close()
    assert claim_works(noop.port)


def test_garbage_before_hello_is_refused(noop):
    with connect(noop.port) as sock:
        sock.sendall(b"\x00\x00\x00\x04\xde\xad\xbe\xef")
        assert recv(sock).code == "protocol"
        assert closed_by_peer(sock)


def test_truncated_frames_harm_nobody(noop):
    frame = encode_frame(Claim(1, "b", "c"))
    for cut in (1, 3, 4, 10, len(frame) - 1):
        sock = authed(noop.port)
        sock.sendall(frame[:cut])
        sock.close()  # the rest never comes
    assert claim_works(noop.port)
    # Sent byte by byte, a frame is still one claim.
    with authed(noop.port) as sock:
        for i in range(len(frame)):
            sock.sendall(frame[i:i + 1])
        assert recv(sock) == Code(1, NOOP_CODE)


def test_a_valid_frame_with_an_invalid_request_gets_an_error_for_its_id(noop):
    with authed(noop.port) as sock:
        for bad in ({"type": "claim", "id": 4, "batch_id": 5, "customer_id": "c"},
                    {"type": "claim", "id": 4},
                    {"type": "teleport", "id": 4}):
            payload = msgspec.msgpack.encode(bad)
            sock.sendall(struct.pack(">I", len(payload)) + payload)
            resp = recv(sock)
            assert type(resp) is Error and resp.id == 4 and resp.code == "invalid_input"
        send(sock, Claim(5, "b", "c"))  # the connection is still good
        assert recv(sock) == Code(5, NOOP_CODE)


# --- pipelining, flow control, limits ------------------------------------------------


def test_ten_thousand_pipelined_claims_on_one_connection(noop):
    n = 10_000
    with authed(noop.port) as sock:
        send(sock, *(Claim(i, "b", f"c{i}", None, f"r{i}") for i in range(n)))
        ids = [recv(sock).id for _ in range(n)]
    assert sorted(ids) == list(range(n))
    assert noop.server.claims_served == n


def test_ten_thousand_pipelined_claims_against_the_allocator_are_all_distinct(dsn):
    n = 10_000
    batch = new_batch(dsn, n + 100)
    with InProcessServer(lambda: ango.Allocator(dsn, shards=2)) as srv:
        with authed(srv.port) as sock:
            sock.settimeout(120)
            claims = {i: Claim(i, batch, f"cust-{i % 997}", None, f"r{i}") for i in range(n)}
            answers: dict[int, object] = {}
            for _ in range(5):  # a retryable answer is re-sent with its request id, as clients do
                waiting = [claims[i] for i in claims if type(answers.get(i)) is not Code]
                if not waiting:
                    break
                send(sock, *waiting)
                for _ in waiting:
                    r = recv(sock)
                    assert type(r) is Code or r.code == "unavailable", r
                    answers[r.id] = r
    responses = list(answers.values())
    assert sorted(r.id for r in responses) == list(range(n))
    assert all(type(r) is Code for r in responses), [r for r in responses if type(r) is not Code]
    codes = [r.code for r in responses]
    assert len(set(codes)) == n
    assert sorted(row[0] for row in issued(dsn)) == sorted(codes)


def test_responses_may_come_out_of_order_and_match_by_id():
    alloc = HeldAllocator()
    with InProcessServer(alloc) as srv, authed(srv.port) as sock:
        send(sock, Claim(10, "b", "c", None, "slow"))
        wait_for(lambda: len(alloc.waiting) == 1)
        send(sock, Ping(11))
        assert recv(sock) == Pong(11)  # answered while the claim still waits
        srv.call(alloc.release)
        assert recv(sock) == Code(10, "CODE-slow")


def test_a_half_closed_connection_gets_every_answer_then_eof():
    alloc = HeldAllocator()
    with InProcessServer(alloc, limits=Limits(max_in_flight=8)) as srv, authed(srv.port) as sock:
        send(sock, *(Claim(i, "b", "c", None, str(i)) for i in range(20)), Ping(20))
        sock.shutdown(socket.SHUT_WR)
        answered: list = []

        def read_all() -> None:
            while True:
                try:
                    answered.append(recv(sock))
                except ConnectionError:
                    return

        reader = threading.Thread(target=read_all)
        reader.start()
        while reader.is_alive() and len(answered) < 21:
            srv.call(alloc.release)
            time.sleep(0.01)
        reader.join(30)
        assert not reader.is_alive()  # the server closed after the last answer
    assert sorted(r.id for r in answered) == list(range(21))


def test_in_flight_limit_holds_back_further_requests_without_dropping_them():
    alloc = HeldAllocator()
    with InProcessServer(alloc, limits=Limits(max_in_flight=4)) as srv, authed(srv.port) as sock:
        send(sock, *(Claim(i, "b", "c", None, str(i)) for i in range(30)))
        answered = []
        while len(answered) < 30:
            wait_for(lambda: len(alloc.waiting) > 0)
            released = srv.call(alloc.release)
            answered += [recv(sock) for _ in range(released)]
    assert sorted(r.id for r in answered) == list(range(30))
    assert alloc.max_waiting == 4


def test_a_client_that_does_not_read_is_paused_with_bounded_buffers(noop):
    limits = noop.server.limits
    slow = authed(noop.port)
    slow.setblocking(False)
    frame = encode_frame(Claim(1, "b", "c" * 200))
    chunk = frame * 1000
    sent = 0
    stuck = 0
    rest = memoryview(chunk)
    while stuck < 50:  # write whole frames until the kernel buffers on both sides are full
        try:
            n = slow.send(rest)
            sent += n
            rest = rest[n:] or memoryview(chunk)
            stuck = 0
        except BlockingIOError:
            stuck += 1
            time.sleep(0.02)

    def buffered() -> int:
        return noop.call(lambda: sum(c.transport.get_write_buffer_size()
                                     for c in noop.server.connections))

    assert srv_paused(noop)
    # Unsent answers stay near the high-water mark, however much the client sends.
    assert buffered() <= limits.write_high_water + len(chunk) * 4
    assert claim_works(noop.port)  # others are not affected
    # Reading everything afterwards gets every answer.
    slow.setblocking(True)
    slow.settimeout(30)
    complete = sent // len(frame)
    for _ in range(complete):
        assert type(recv(slow)) is Code
    slow.close()


def srv_paused(srv: InProcessServer) -> bool:
    """Some connection of the server has stopped reading."""
    return srv.call(lambda: any(c._reading_paused for c in srv.server.connections))


def test_connections_beyond_the_maximum_are_refused_as_unavailable():
    with InProcessServer(None, limits=Limits(max_connections=2)) as srv:
        a, b = authed(srv.port), authed(srv.port)
        with connect(srv.port) as third:
            resp = recv(third)
            assert resp.code == "unavailable" and resp.retryable
            assert closed_by_peer(third)
        send(a, Ping(1))
        assert recv(a) == Pong(1)
        b.close()
        wait_for(lambda: len(srv.server.connections) == 1)
        assert claim_works(srv.port)
        a.close()


def test_an_idle_connection_is_closed_and_a_silent_one_too():
    with InProcessServer(None, limits=Limits(idle_timeout=0.2, handshake_timeout=0.2)) as srv:
        idle = authed(srv.port)
        resp = recv(idle)
        assert resp.id is None and resp.code == "unavailable" and resp.retryable
        assert closed_by_peer(idle)
        with connect(srv.port) as silent:
            assert recv(silent).code == "unauthorized"
            assert closed_by_peer(silent)


# --- operations ------------------------------------------------------------------


def test_every_operation_in_noop_mode(noop):
    with authed(noop.port) as sock:
        send(sock, Claim(1, "b", "c"), ListBatches(2), Expire(3, "b"), GetStats(4), Ping(5))
        got = {r.id: r for r in (recv(sock) for _ in range(5))}
    assert got[1] == Code(1, NOOP_CODE)
    assert got[2] == BatchList(2, [])
    assert got[3] == Expired(3, False)
    assert type(got[4]) is Stats and got[4].stats["noop"] is True
    assert got[5] == Pong(5)


def test_every_operation_against_the_allocator(dsn):
    batch = new_batch(dsn, 3, {"maxpercustomer": 1})
    with InProcessServer(lambda: ango.Allocator(dsn, shards=2)) as srv, authed(srv.port) as sock:
        sock.settimeout(60)
        send(sock, Claim(1, batch, "ann", None, "r1"))
        code = recv(sock)
        assert type(code) is Code
        send(sock, Claim(2, batch, "ann", None, "r1"))  # the same request again
        assert recv(sock) == Code(2, code.code)
        send(sock, Claim(3, batch, "ann", None, "r2"))
        assert recv(sock).code == "rule_violation"
        send(sock, ListBatches(4))
        listing = recv(sock)
        assert [(b.id, b.total, b.issued, b.available, b.expired) for b in listing.batches] == [
            (batch, 3, 1, 2, False)]
        assert listing.batches[0].rules == {"maxpercustomer": 1}
        send(sock, GetStats(5))
        stats = recv(sock).stats
        assert stats["shards_alive"] == 2 and stats["server"]["claims_served"] == 2
        send(sock, Expire(6, batch))
        assert recv(sock) == Expired(6, True)
        send(sock, Expire(7, batch))
        assert recv(sock) == Expired(7, False)
        send(sock, Claim(8, batch, "bob", None, "r3"))
        assert recv(sock).code == "batch_expired"
        send(sock, Claim(9, "not-a-uuid", "bob"))
        assert recv(sock).code == "invalid_input"
        send(sock, Claim(10, "00000000-0000-4000-8000-000000000000", "bob"))
        assert recv(sock).code == "batch_not_found"
        send(sock, Expire(11, "00000000-0000-4000-8000-000000000000"))
        assert recv(sock).code == "batch_not_found"
    assert [(c, who) for c, who, _ in issued(dsn)] == [(code.code, "ann")]


# --- shutdown ----------------------------------------------------------------------


def test_shutdown_answers_the_claims_in_flight_then_closes():
    alloc = HeldAllocator()
    srv = InProcessServer(alloc).__enter__()
    sock = authed(srv.port)
    send(sock, *(Claim(i, "b", "c", None, str(i)) for i in range(5)))
    wait_for(lambda: len(alloc.waiting) == 5)
    srv.loop.call_soon_threadsafe(srv._stop.set)
    wait_for(lambda: srv.server.draining)
    send(sock, Claim(99, "b", "c"))  # arrives while draining
    late = recv(sock)
    assert late.id == 99 and late.code == "unavailable" and late.retryable
    srv.call(alloc.release)
    answers = [recv(sock) for _ in range(5)]
    assert sorted((r.id, r.code) for r in answers) == [(i, f"CODE-{i}") for i in range(5)]
    bye = recv(sock)
    assert bye.id is None and bye.code == "unavailable"
    assert closed_by_peer(sock)
    srv.stop()


# --- `ango serve` ----------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_ango_serve_generates_a_private_token_and_exits_0_on_a_signal(tmp_path, sig):
    env = {"ANGO_DATA_DIR": str(tmp_path), "ANGO_TOKEN": ""}
    proc = ServeProcess("--noop", env=env).start()
    try:
        token_file = tmp_path / "token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        assert str(token_file) in proc.stderr
        token = token_file.read_text().strip()
        assert len(token) >= 32
        with connect(proc.port) as sock:
            assert type(hello(sock, token)) is Welcome
        with ango.Client(port=proc.port, data_dir=str(tmp_path)) as client:  # finds the file
            assert client.claim("b", "c") == NOOP_CODE
    finally:
        rc = proc.stop(sig)
    assert rc == 0


def test_ango_serve_and_ango_claim_against_the_database(dsn, tmp_path):
    batch = new_batch(dsn, 5)
    env = {"ANGO_TOKEN": "s3cret", "ANGO_DATA_DIR": str(tmp_path)}
    proc = ServeProcess("--dsn", dsn, "--shards", "1", env=env).start()
    try:
        def claim(*args: str, token: str = "s3cret"):
            return subprocess.run(
                [*ANGO, "claim", *args,
                 "--port", str(proc.port)],
                capture_output=True, text=True, env=dict(os.environ, ANGO_TOKEN=token), timeout=60)

        ok = claim(batch, "alice", "--request-id", "order-1")
        assert ok.returncode == 0, ok.stderr
        again = claim(batch, "alice", "--request-id", "order-1")
        assert again.stdout == ok.stdout
        missing = claim("00000000-0000-4000-8000-000000000000", "alice")
        assert missing.returncode != 0 and "batch_not_found" in missing.stderr
        refused = claim(batch, "alice", token="guess")
        assert refused.returncode != 0 and "unauthorized" in refused.stderr
        assert "serving on 127.0.0.1" in proc.stderr
    finally:
        rc = proc.stop()
    assert rc == 0
    assert issued(dsn) == [(ok.stdout.strip(), "alice", "order-1")]


def test_port_in_use_is_a_clear_error(noop):
    result = subprocess.run(
        [*ANGO, "serve", "--noop", "--port",
         str(noop.port), "--token", "t"], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "cannot serve" in result.stderr
