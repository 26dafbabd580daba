"""Direct connections (issue 13): a hello naming a shard hands the connection to that
shard process, which serves its claims with no server hop.

Real `ango serve` processes, real sockets and sockets passed between processes,
real PostgreSQL.
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import uuid
import zlib

import pytest
from ango.server import Limits

import ango
from ango import database
from ango.framing import encode_frame
from ango.importer import import_codes
from ango.protocol import (
    PROTOCOL_VERSION,
    Claim,
    Code,
    GetStats,
    Hello,
    ListBatches,
    Ping,
    Welcome,
)
from ango.tokens import create_token, revoke_token
from tests.cluster_harness import wait_for
from tests.servers import (
    ANGO,
    TOKEN,
    InProcessServer,
    ServeProcess,
    closed_by_peer,
    connect,
    issued,
    recv,
    send,
)

pytestmark = pytest.mark.timeout(300)

ALICE = "a11ce000-0000-4000-8000-000000000001"
BOB = "b0b00000-0000-4000-8000-000000000002"
SHARDS = 2


def batch_of(dsn: str, client_id: str, count: int) -> str:
    prefix = uuid.uuid4().hex[:8]
    body = "code\n" + "".join(f"{prefix}-{i:05d}\n" for i in range(count))
    return str(import_codes(dsn, io.BytesIO(body.encode()), client_id, prefix).batch_id)


def serve(dsn: str) -> ServeProcess:
    return ServeProcess("--dsn", dsn, "--shards", str(SHARDS), "--no-http",
                        env={"ANGO_TOKEN": TOKEN}).start()


def direct(port: int, shard: int, token: str = TOKEN) -> tuple:
    """A connection whose hello names ``shard``, and its welcome."""
    sock = connect(port, timeout=60)
    send(sock, Hello(0, PROTOCOL_VERSION, token, shard=shard))
    return sock, recv(sock)


def shard_of(welcome: Welcome, batch: str, customer: str) -> int:
    """The shard of the instance that owns the claim's customer counters."""
    h = zlib.crc32(f"{batch}/{customer}".encode())
    return h % welcome.partitions % welcome.shards


def audit_clean(dsn: str) -> None:
    done = subprocess.run([*ANGO, "audit", "--dsn", dsn], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def server_stats(port: int) -> dict:
    with connect(port, timeout=60) as sock:
        send(sock, Hello(0, PROTOCOL_VERSION, TOKEN))
        assert type(recv(sock)) is Welcome
        send(sock, GetStats(1))
        return recv(sock).stats


def test_claims_over_direct_connections_are_issued_once_and_recorded(dsn):
    batch = batch_of(dsn, ALICE, 400)
    srv = serve(dsn)
    try:
        codes: dict[str, str] = {}
        socks = []
        for shard in range(SHARDS):
            sock, welcome = direct(srv.port, shard)
            assert type(welcome) is Welcome
            assert (welcome.shards, welcome.partitions > 0) == (SHARDS, True)
            socks.append(sock)
        # Each shard gets claims of its own customers and of the other's: both are served.
        claims = [Claim(i, batch, f"cust-{i % 50}", request_id=f"req-{i}") for i in range(120)]
        for i, claim in enumerate(claims):
            send(socks[i % SHARDS], claim)
        answers = {}
        for i in range(len(claims)):
            answer = recv(socks[i % SHARDS])
            answers[answer.id] = answer
        assert all(type(a) is Code for a in answers.values()), answers
        codes = {f"req-{i}": a.code for i, a in answers.items()}
        assert len(set(codes.values())) == len(claims)
        # The same request id again (on the other shard): the recorded code, not a second one.
        send(socks[1], Claim(500, batch, "cust-0", request_id="req-0"))
        assert recv(socks[1]) == Code(500, codes["req-0"])
        rows = issued(dsn)
        assert {r: c for c, _, r in rows} == codes
        assert server_stats(srv.port)["server"]["handed_off"] == SHARDS
        # Counted with the others' (reported to the supervisor with the next results).
        wait_for(lambda: server_stats(srv.port)["claims_served"] == len(claims) + 1,
                 "direct claims counted")
        for sock in socks:
            sock.close()
    finally:
        srv.stop()
    audit_clean(dsn)


def test_a_client_token_on_a_direct_connection_reaches_only_its_client(dsn):
    mine, theirs = batch_of(dsn, ALICE, 10), batch_of(dsn, BOB, 10)
    with database.connect(dsn, autocommit=True) as conn:
        secret = create_token(conn, ALICE, "alice")[0]
    srv = serve(dsn)
    try:
        sock, welcome = direct(srv.port, 0, secret)
        assert type(welcome) is Welcome
        send(sock, Claim(1, mine, "ann"), Claim(2, theirs, "ann"),
             Claim(3, mine, "ann", client_id=BOB))
        answers = {a.id: a for a in (recv(sock), recv(sock), recv(sock))}
        assert type(answers[1]) is Code
        for i in (2, 3):
            assert (answers[i].code, answers[i].retryable) == ("batch_not_found", False)
        assert [c for _, c, _ in issued(dsn)] == ["ann"]
        sock.close()
    finally:
        srv.stop()


def test_bad_frames_and_other_requests_on_a_direct_connection_are_refused_clearly(dsn):
    batch = batch_of(dsn, ALICE, 10)
    srv = serve(dsn)
    try:
        sock, _ = direct(srv.port, 0)
        send(sock, Claim(1, "not-a-uuid", "ann"), Claim(2, batch, "x" * 300))
        answers = {a.id: a for a in (recv(sock), recv(sock))}
        assert answers[1].code == "invalid_input" and "batch id" in answers[1].message
        assert answers[2].code == "invalid_input" and "customer id" in answers[2].message
        sock.sendall(encode_frame({"type": "claim", "id": 3}))  # no batch
        answer = recv(sock)
        assert (answer.id, answer.code) == (3, "invalid_input")
        for other in (Ping(4), ListBatches(5)):
            again, _ = direct(srv.port, 1)
            send(again, other)
            answer = recv(again)
            assert (answer.id, answer.code) == (None, "protocol")
            assert "claims only" in answer.message and other.__struct_config__.tag in answer.message
            assert closed_by_peer(again)
        sock.sendall(b"\x00\x00\x00\x03abc")  # not MessagePack
        answer = recv(sock)
        assert (answer.id, answer.code) == (None, "protocol")
        assert closed_by_peer(sock)
        # The shards live on: a direct claim is still served.
        last, _ = direct(srv.port, 1)
        send(last, Claim(6, batch, "bob"))
        assert type(recv(last)) is Code
        last.close()
        assert srv.proc.poll() is None
    finally:
        srv.stop()


def test_revoking_a_token_closes_its_direct_connections(dsn):
    batch = batch_of(dsn, ALICE, 10)
    with database.connect(dsn, autocommit=True) as conn:
        secret = create_token(conn, ALICE, "to-revoke")[0]
    srv = serve(dsn)
    try:
        sock, _ = direct(srv.port, 1, secret)
        send(sock, Claim(1, batch, "ann"))
        assert type(recv(sock)) is Code
        with database.connect(dsn, autocommit=True) as conn:
            revoke_token(conn, "to-revoke")
        sock.settimeout(30)
        answer = recv(sock)
        assert (answer.id, answer.code) == (None, "unauthorized") and "revoked" in answer.message
        assert closed_by_peer(sock)
        again = connect(srv.port)
        send(again, Hello(0, PROTOCOL_VERSION, secret, shard=1))
        assert recv(again).code == "unauthorized"
        again.close()
    finally:
        srv.stop()


def cluster_instance(dsn: str) -> ServeProcess:
    return ServeProcess("--dsn", dsn, "--shards", str(SHARDS), "--no-http",
                        "--instance-name", "direct-0", env={"ANGO_TOKEN": TOKEN}).start()


def test_a_direct_client_sends_each_claim_to_its_shard_and_survives_a_shard_kill(dsn):
    batch = batch_of(dsn, ALICE, 2000)
    srv = cluster_instance(dsn)

    async def run() -> tuple[dict[str, str], list[str]]:
        client = await ango.AsyncClient.connect("127.0.0.1", srv.port, TOKEN, timeout=60,
                                                cluster=True, direct=True)
        async with client:
            # The owner's connection is opened by the first claims; then direct ones.
            first = [await client.claim(batch, f"cust-{i}", request_id=f"warm-{i}")
                     for i in range(20)]
            routes = client._routes
            assert sorted(k[1] for k in routes.shard_clients) == list(range(SHARDS))
            assert server_stats(srv.port)["server"]["handed_off"] == SHARDS
            victim = server_stats(srv.port)["per_shard"][0]["pid"]
            tasks = {f"req-{i}": asyncio.create_task(
                client.claim(batch, f"cust-{i % 40}", request_id=f"req-{i}"))
                for i in range(600)}
            pending = set(tasks.values())
            while len(pending) > 500:
                _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            os.kill(victim, signal.SIGKILL)  # with claims in flight on its direct connection
            await asyncio.gather(*tasks.values())
            after = {f"after-{i}": await client.claim(batch, f"late-{i}", request_id=f"after-{i}")
                     for i in range(40)}
            codes = {r: t.result() for r, t in tasks.items()} | after
            return codes, first

    try:
        codes, first = asyncio.run(run())
    finally:
        srv.stop()
    recorded = {r: c for c, _, r in issued(dsn)}
    assert len(set(codes.values())) == len(codes) == 640
    assert {r: recorded[r] for r in codes} == codes  # each answered code is the one recorded
    assert len(recorded) == len(codes) + len(first)
    audit_clean(dsn)


def test_the_blocking_client_claims_over_direct_connections(dsn):
    batch = batch_of(dsn, ALICE, 100)
    srv = cluster_instance(dsn)
    try:
        with ango.Client("127.0.0.1", srv.port, TOKEN, timeout=60, cluster=True,
                         direct=True) as client:
            codes = {f"r-{i}": client.claim(batch, f"cust-{i}", request_id=f"r-{i}")
                     for i in range(40)}
            assert client.claim(batch, "cust-0", request_id="r-0") == codes["r-0"]
            assert sorted(k[1] for k in client._routes.shard_clients) == list(range(SHARDS))
            assert client._routes.direct_failed == 0
        assert server_stats(srv.port)["server"]["handed_off"] == SHARDS
    finally:
        srv.stop()
    assert {r: c for c, _, r in issued(dsn)} == codes


def test_a_tls_connection_naming_a_shard_stays_with_the_server_claims_only(dsn, tmp_path):
    import ssl

    from ango.server.tls import self_signed

    cert, key = self_signed(tmp_path)
    batch = batch_of(dsn, ALICE, 10)
    srv = ServeProcess("--dsn", dsn, "--shards", str(SHARDS), "--no-http", "--tls-cert", cert,
                       "--tls-key", key, env={"ANGO_TOKEN": TOKEN}).start()
    context = ssl.create_default_context(cafile=cert)
    try:
        with context.wrap_socket(connect(srv.port, timeout=60),
                                 server_hostname="127.0.0.1") as sock:
            send(sock, Hello(0, PROTOCOL_VERSION, TOKEN, shard=1), Claim(1, batch, "ann"))
            assert type(recv(sock)) is Welcome
            assert type(recv(sock)) is Code
            send(sock, Ping(2))
            answer = recv(sock)
            assert (answer.id, answer.code) == (None, "protocol")
            assert "claims only" in answer.message
        with ango.Client("127.0.0.1", srv.port, TOKEN, timeout=60, tls=context) as client:
            assert client.stats()["server"]["handed_off"] == 0
    finally:
        srv.stop()


def test_an_idle_direct_connection_is_closed_as_an_idle_one_is_by_the_server(dsn):
    batch = batch_of(dsn, ALICE, 10)
    limits = Limits(idle_timeout=0.5)
    with InProcessServer(lambda: ango.Allocator(dsn, shards=SHARDS), limits=limits) as srv:
        sock, welcome = direct(srv.port, 1)
        assert welcome.idle_timeout == 0.5
        send(sock, Claim(1, batch, "ann"))
        assert type(recv(sock)) is Code
        sock.settimeout(30)
        answer = recv(sock)  # nothing sent meanwhile
        assert (answer.id, answer.code, answer.message) == (None, "unavailable", "idle timeout")
        assert answer.retryable and closed_by_peer(sock)
        assert srv.server.handed_off == 1
