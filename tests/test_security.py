"""Hostile clients against a server over a real allocator: token brute force, connection
floods, readers that never read. None of them lets a guess in, issues a code it should
not, or keeps a well-behaved client from getting its answers.

tests/test_server.py already pins the single cases (no token, wrong token, an address
blocked after too many wrong tokens, one connection over the maximum, a noop client
that does not read); these put them under load, concurrently, with PostgreSQL checked.
"""

from __future__ import annotations

import socket
import time

import psycopg
import pytest
from ango.server import NOOP_CODE, Limits

import ango
from ango.audit import violations
from ango.framing import encode_frame
from ango.protocol import PROTOCOL_VERSION, Claim, Code, Error, Hello, Ping, Pong
from tests.hostile import SilentFlood, module_dsn  # noqa: F401 (a fixture)
from tests.servers import TOKEN, InProcessServer, connect, hello, new_batch, recv, send


def issued_to(dsn: str, prefix: str) -> int:
    """Codes issued to customers whose id starts with ``prefix``."""
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT count(*) FROM ango.issues WHERE customer_id LIKE %s",
                            (prefix + "%",)).fetchone()[0]


def guesses(n: int) -> list[str]:
    """Wrong tokens, many of them close to the right one."""
    near = ["", TOKEN[:-1], TOKEN + "x", TOKEN.upper(), TOKEN[1:], " " + TOKEN, TOKEN + "\x00",
            TOKEN[:-1] + chr(ord(TOKEN[-1]) + 1), TOKEN[: len(TOKEN) // 2]]
    return [near[i] if i < len(near) else f"guess-{i:06d}" for i in range(n)]


def pending(sock: socket.socket) -> bool:
    """True when nothing has arrived on ``sock`` yet (and it is not closed)."""
    sock.setblocking(False)
    try:
        sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        sock.setblocking(True)
    return False


def pipelined_claims(sock: socket.socket, batch: str, n: int, prefix: str) -> list:
    """``n`` claims in one write, every answer read."""
    send(sock, *(Claim(i, batch, f"{prefix}{i % 97}", None, f"{prefix}{i}") for i in range(n)))
    return [recv(sock) for _ in range(n)]


@pytest.fixture(scope="module")
def batch(module_dsn):  # noqa: F811
    return new_batch(module_dsn, 50_000)


def test_a_brute_force_of_wrong_tokens_lets_none_in_issues_nothing_and_stalls_nobody(
        module_dsn, batch):  # noqa: F811
    limits = Limits(auth_failure_delay=0.5, auth_failure_max_delay=2.0)
    with InProcessServer(lambda: ango.Allocator(module_dsn, shards=2), limits=limits) as srv:
        good = connect(srv.port, timeout=30)
        assert hello(good).__class__.__name__ == "Welcome"
        attackers = []
        for token in guesses(300):
            sock = socket.create_connection(("127.0.0.1", srv.port), timeout=30,
                                            source_address=("127.0.0.2", 0))
            # Each guess comes with claims, in case one slipped through.
            sock.sendall(encode_frame(Hello(1, PROTOCOL_VERSION, token))
                         + b"".join(encode_frame(Claim(i, batch, "mallory", None, f"m{i}"))
                                    for i in range(2, 6)))
            attackers.append(sock)
        # While the wrong tokens wait for their slow refusal, the good client is served.
        answers = pipelined_claims(good, batch, 300, "good-")
        assert all(type(a) is Code for a in answers)
        assert any(pending(s) for s in attackers)
        # A correct token from the attacker's own address is never refused: at worst it
        # waits (retryable unavailable) for a slot among those its address holds.
        deadline = time.monotonic() + 30
        while True:
            with socket.create_connection(("127.0.0.1", srv.port), timeout=30,
                                          source_address=("127.0.0.2", 0)) as same_address:
                answer = hello(same_address)
            if type(answer) is not Error:
                break
            assert answer.code == "unavailable" and time.monotonic() < deadline
            time.sleep(0.1)
        assert answer.__class__.__name__ == "Welcome"
        refusals = []
        for sock in attackers:
            refusal = recv(sock)
            assert type(refusal) is Error and refusal.id is None
            # Beyond its budget of connections waiting for hello, the address is refused at once.
            assert refusal.code in ("unauthorized", "unavailable")
            refusals.append(refusal.code)
            with pytest.raises((ConnectionError, OSError)):
                recv(sock)  # closed: nothing after the hello was read
            sock.close()
        # Only the address's budget of connections was compared at a time, the rest
        # refused at once; every comparison was counted.
        compared = refusals.count("unauthorized")
        assert compared >= limits.max_unauthenticated_per_address
        assert srv.call(lambda: srv.server.auth_failures("127.0.0.2")) == compared
        assert len(refusals) == 300
        # The authenticated connection is served throughout.
        send(good, Ping(9))
        assert recv(good) == Pong(9)
        good.close()
    assert issued_to(module_dsn, "mallory") == 0
    assert issued_to(module_dsn, "good-") == 300


def test_a_flood_of_connections_beyond_the_maximum_harms_no_connected_client(
        module_dsn, batch):  # noqa: F811
    limits = Limits(max_connections=40, handshake_timeout=1.0)
    with InProcessServer(lambda: ango.Allocator(module_dsn, shards=2), limits=limits) as srv:
        good = ango.Client(port=srv.port, token=TOKEN, timeout=30)
        assert good.claim(batch, "flood-good-0", request_id="fg-0")
        flood = []
        for i in range(200):  # some authenticate and claim, most just sit there
            sock = connect(srv.port, timeout=30)
            if i % 4 == 0:
                sock.sendall(encode_frame(Hello(1, PROTOCOL_VERSION, TOKEN))
                             + encode_frame(Claim(2, batch, f"flood-{i}", None, f"f{i}")))
            flood.append(sock)
        for i in range(1, 101):  # the connected client goes on as if nothing happened
            assert good.claim(batch, f"flood-good-{i}", request_id=f"fg-{i}")
        refused = admitted = 0
        codes = 0
        for sock in flood:
            first = recv(sock)
            if type(first) is Error and first.id is None:
                assert first.code in ("unavailable", "unauthorized")
                refused += first.code == "unavailable"
                assert first.retryable == (first.code == "unavailable")
            else:
                admitted += 1
                codes += type(recv(sock)) is Code
            sock.close()
        assert refused >= 200 - limits.max_connections
        # Slots held by silent connections are freed by the handshake timeout.
        deadline = time.monotonic() + 30
        while srv.call(lambda: len(srv.server.connections)) > 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        with ango.Client(port=srv.port, token=TOKEN, timeout=30) as late:
            assert late.claim(batch, "flood-late", request_id="fl")
        good.close()
    assert issued_to(module_dsn, "flood-good-") == 101
    assert issued_to(module_dsn, "flood-") - issued_to(module_dsn, "flood-good-") \
        - issued_to(module_dsn, "flood-late") == codes
    with psycopg.connect(module_dsn) as conn:
        assert violations(conn) == []


def served_meanwhile(port: int, clients: int = 20) -> None:
    """New clients connect, authenticate and claim one after the other (each must succeed)."""
    for i in range(clients):
        with ango.Client(port=port, token=TOKEN, timeout=15) as client:
            assert client.claim("5f0c6e2a-3b7d-4c1e-9a8f-2d4b6c8e0a1f", f"c{i}") == NOOP_CODE


def test_a_flood_of_silent_connections_from_one_address_locks_no_new_client_out():
    limits = Limits(max_connections=100, max_unauthenticated_per_address=8)
    with InProcessServer(None, limits=limits) as srv:
        veteran = ango.Client(port=srv.port, token=TOKEN, timeout=15)
        with SilentFlood(srv.port, ["127.0.0.2"], 150) as flood:
            while flood.opened < 150:
                time.sleep(0.01)
            served_meanwhile(srv.port)
            assert veteran.claim("5f0c6e2a-3b7d-4c1e-9a8f-2d4b6c8e0a1f", "v") == NOOP_CODE
            held = srv.call(lambda: srv.server.stats()["unauthenticated"])
        veteran.close()
    assert held <= limits.max_unauthenticated_per_address


def test_a_flood_of_silent_connections_from_many_addresses_locks_no_new_client_out():
    limits = Limits(max_connections=200, max_unauthenticated=32,
                    max_unauthenticated_per_address=4)
    sources = [f"127.0.0.{i}" for i in range(2, 42)]  # 40 addresses x 4 > 32
    with InProcessServer(None, limits=limits) as srv:
        with SilentFlood(srv.port, sources, 4) as flood:
            while flood.opened < 160:
                time.sleep(0.01)
            served_meanwhile(srv.port)
            held = srv.call(lambda: srv.server.stats()["unauthenticated"])
    assert held <= limits.max_unauthenticated


def test_a_client_that_never_reads_is_held_back_and_issues_only_what_it_asked(module_dsn):  # noqa: F811
    """Its answers fill the kernel's buffers, then the server's up to the high-water mark;
    then the server stops reading it. Claims it sent are issued (at most once each) and
    recorded even though it never reads them."""
    slow_batch = new_batch(module_dsn, 30_000)
    good_batch = new_batch(module_dsn, 1000)
    limits = Limits(max_in_flight=256, write_high_water=64 * 1024, write_low_water=16 * 1024)
    with InProcessServer(lambda: ango.Allocator(module_dsn, shards=2), limits=limits) as srv:
        # A small receive buffer, so the kernel cannot absorb what the server answers.
        slow = socket.socket()
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.settimeout(30)
        slow.connect(("127.0.0.1", srv.port))
        assert hello(slow).__class__.__name__ == "Welcome"
        slow.setblocking(False)
        frames = b"".join(encode_frame(Claim(i, slow_batch, f"slow-{i % 500}", None, f"s{i}"))
                          for i in range(40_000))
        sent, stuck = 0, 0
        while sent < len(frames) and stuck < 25:  # until the buffers on the way are full
            try:
                sent += slow.send(frames[sent:sent + 65536])
                stuck = 0
            except BlockingIOError:
                stuck += 1
                time.sleep(0.02)
        requested = sent // len(encode_frame(Claim(0, slow_batch, "slow-0", None, "s0")))
        with ango.Client(port=srv.port, token=TOKEN, timeout=30) as good:
            codes = [good.claim(good_batch, f"patient-{i}", request_id=f"p{i}")
                     for i in range(100)]
        assert len(set(codes)) == 100
        assert srv.call(lambda: any(c._reading_paused for c in srv.server.connections))
        buffered = srv.call(lambda: max(c.transport.get_write_buffer_size()
                                        for c in srv.server.connections))
        assert buffered <= 4 * limits.write_high_water
        slow.close()  # walks away without reading a single answer
    issued = issued_to(module_dsn, "slow-")
    assert issued <= requested + 1
    with psycopg.connect(module_dsn) as conn:
        assert violations(conn) == []
