"""TLS end to end, with a self-signed certificate made by the test (the `openssl` command)."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess

import pytest
from ango.server import NOOP_CODE, Limits

import ango
from ango.errors import ProtocolError
from tests.servers import (
    ANGO,
    TOKEN,
    InProcessServer,
    ServeProcess,
    closed_by_peer,
    connect,
    issued,
    new_batch,
)

BATCH = "5f0c6e2a-3b7d-4c1e-9a8f-2d4b6c8e0a1f"
pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


@pytest.fixture(scope="module")
def cert(tmp_path_factory) -> tuple[str, str]:
    """A self-signed certificate for localhost and 127.0.0.1, and its key."""
    from ango.server.tls import self_signed

    return self_signed(tmp_path_factory.mktemp("tls"))


def server_tls(cert: tuple[str, str]) -> ssl.SSLContext:
    from ango.server.tls import server_context

    return server_context(*cert)


def trusting(cert: tuple[str, str]) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=cert[0])


def test_tls_end_to_end_with_a_self_signed_certificate(dsn, cert):
    batch = new_batch(dsn, 10)
    with InProcessServer(lambda: ango.Allocator(dsn, shards=1), tls=server_tls(cert)) as srv:
        with ango.Client(port=srv.port, token=TOKEN, timeout=30, tls=trusting(cert)) as client:
            first = client.claim(batch, "ann", request_id="r1")
            assert client.claim(batch, "ann", request_id="r1") == first
            assert [b["id"] for b in client.batches()] == [batch]

        async def pipelined() -> list[str]:
            async with await ango.AsyncClient.connect(port=srv.port, token=TOKEN, timeout=30,
                                                      tls=trusting(cert)) as client:
                return await asyncio.gather(*(client.claim(batch, f"c{i}") for i in range(5)))

        codes = asyncio.run(pipelined())
    assert sorted(code for code, _, _ in issued(dsn)) == sorted([first, *codes])


def test_a_plain_text_client_against_a_tls_only_server_gets_a_clear_error(cert):
    with InProcessServer(None, tls=server_tls(cert)) as srv:
        with pytest.raises(ProtocolError, match="requires TLS"):
            ango.Client(port=srv.port, token=TOKEN, timeout=5)

        async def plain() -> None:
            await ango.AsyncClient.connect(port=srv.port, token=TOKEN, timeout=5)

        with pytest.raises(ProtocolError, match="requires TLS"):
            asyncio.run(plain())


def test_a_server_certificate_the_client_does_not_trust_is_refused_at_once(cert):
    with InProcessServer(None, tls=server_tls(cert)) as srv:
        for tls in (True, ssl.create_default_context()):  # the system CAs only
            with pytest.raises(ProtocolError, match="certificate verify failed"):
                ango.Client(port=srv.port, token=TOKEN, timeout=30, tls=tls)


def test_a_tls_client_against_a_plain_text_server_gets_a_clear_error(cert):
    with InProcessServer(None) as srv:
        with pytest.raises(ProtocolError, match="does the server speak TLS"):
            ango.Client(port=srv.port, token=TOKEN, timeout=30, tls=trusting(cert))


def test_tls_optional_serves_tls_and_plain_text_clients(cert):
    with InProcessServer(None, tls=server_tls(cert), tls_required=False) as srv:
        with ango.Client(port=srv.port, token=TOKEN, tls=trusting(cert)) as secure, \
                ango.Client(port=srv.port, token=TOKEN) as plain:
            assert secure.claim(BATCH, "a") == plain.claim(BATCH, "b") == NOOP_CODE


def test_a_silent_tls_handshake_is_closed_by_the_handshake_timeout(cert):
    with InProcessServer(None, tls=server_tls(cert), limits=Limits(handshake_timeout=0.3)) as srv:
        with connect(srv.port) as sock:
            sock.sendall(b"\x16\x03\x01")  # the start of a ClientHello, then nothing
            assert closed_by_peer(sock)
        assert srv.call(lambda: srv.server.stats()["unauthenticated"]) == 0


def test_ango_serve_with_a_certificate_and_ango_claim_with_its_ca(cert, tmp_path):
    serve = ServeProcess("--noop", "--tls-cert", cert[0], "--tls-key", cert[1],
                         "--data-dir", str(tmp_path), env={"ANGO_TOKEN": TOKEN}).start()
    try:
        assert "TLS only" in serve.stderr
        out = subprocess.run([*ANGO, "claim", BATCH, "ann", "--port", str(serve.port),
                              "--tls-ca", cert[0]], capture_output=True, text=True, timeout=60,
                             env={"ANGO_TOKEN": TOKEN, "PATH": "/usr/bin:/bin"})
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == NOOP_CODE
    finally:
        assert serve.stop() == 0


def test_ango_serve_beyond_loopback_without_tls_warns(tmp_path):
    serve = ServeProcess("--noop", "--host", "0.0.0.0", "--data-dir", str(tmp_path),
                         env={"ANGO_TOKEN": TOKEN}).start()
    try:
        assert "without TLS" in serve.stderr
    finally:
        serve.stop()
    local = ServeProcess("--noop", "--data-dir", str(tmp_path), env={"ANGO_TOKEN": TOKEN}).start()
    try:
        assert "without TLS" not in local.stderr
    finally:
        local.stop()
