"""How a claim over TCP fails (issue 9, items 11 and 12): no server is known at once, a missing
token is told apart from a wrong one, and a claim that timed out can still be retrieved with the
request id the exception carries.
"""

from __future__ import annotations

import asyncio
import re
import socket
import time

import psycopg
import pytest
from ango.server import Limits
from click.testing import CliRunner

import ango
from ango.cli import EXIT_CONFIGURATION, EXIT_REFUSED, EXIT_UNAVAILABLE, main
from ango.client import ServerUnreachable
from ango.errors import AuthenticationFailed, ConfigurationError
from tests.servers import TOKEN, InProcessServer, issued, new_batch

BATCH = "5f0c6e2a-3b7d-4c1e-9a8f-2d4b6c8e0a1f"


class SilentAllocator:
    """Never answers a claim."""

    def claim(self, batch_id, customer_id, *, client_id=None, request_id=None):
        return asyncio.get_running_loop().create_future()


@pytest.fixture
def no_server() -> int:
    """A port on which nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def claim_cli(*args: str, env: dict | None = None):
    return CliRunner().invoke(main, ["claim", BATCH, "ann", *args], env=env)


def errors(result) -> list[str]:
    """The error lines (a --token on the command line also warns, on its own line)."""
    return [line for line in result.stderr.splitlines() if line.startswith("Error:")]


# --- item 11 ----------------------------------------------------------------------------------


def test_ango_claim_with_no_server_fails_at_once_in_one_line_with_its_own_status(no_server):
    started = time.monotonic()
    result = claim_cli("--port", str(no_server), "--token", "t", "--timeout", "60")
    assert time.monotonic() - started < 10  # it used to wait out the whole timeout
    assert result.exit_code == EXIT_UNAVAILABLE
    assert result.stdout == ""
    [line] = errors(result)
    assert f"127.0.0.1:{no_server}" in line and "connection refused" in line


def test_both_clients_fail_at_once_when_nothing_listens_unless_told_to_wait(no_server):
    started = time.monotonic()
    with pytest.raises(ServerUnreachable) as caught:
        ango.Client(port=no_server, token=TOKEN, timeout=60, wait_for_server=False)
    assert caught.value.retryable and isinstance(caught.value, ango.Unavailable)

    async def go() -> None:
        await ango.AsyncClient.connect(port=no_server, token=TOKEN, timeout=60,
                                       wait_for_server=False)

    with pytest.raises(ServerUnreachable):
        asyncio.run(go())

    async def first_call() -> None:  # connecting on the first call, not in connect()
        client = ango.AsyncClient(port=no_server, token=TOKEN, timeout=60, wait_for_server=False)
        await client.claim(BATCH, "ann")

    with pytest.raises(ServerUnreachable):
        asyncio.run(first_call())
    assert time.monotonic() - started < 10
    with pytest.raises(ango.Unavailable) as caught:  # by default a server starting is waited for
        ango.Client(port=no_server, token=TOKEN, timeout=0.5)
    assert type(caught.value) is ango.Unavailable


def test_a_missing_token_is_reported_as_missing_with_every_place_looked_at(tmp_path):
    with InProcessServer(None) as srv:  # a server that would refuse an empty token as wrong
        result = claim_cli("--port", str(srv.port), "--data-dir", str(tmp_path),
                           env={"ANGO_TOKEN": None, "ANGO_DATA_DIR": None})
        with pytest.raises(ConfigurationError, match="no token"):
            ango.Client(port=srv.port, data_dir=str(tmp_path))
    assert result.exit_code == EXIT_CONFIGURATION
    [line] = errors(result)
    assert "no token" in line and "ANGO_TOKEN" in line and str(tmp_path / "token") in line
    assert "wrong" not in line


def test_a_wrong_token_is_reported_as_wrong_naming_where_it_came_from(tmp_path):
    (tmp_path / "token").write_text("not-the-token\n")
    with InProcessServer(None) as srv:
        result = claim_cli("--port", str(srv.port), "--token", "nope")
        with pytest.raises(AuthenticationFailed) as caught:
            ango.Client(port=srv.port, data_dir=str(tmp_path), timeout=10)
    assert result.exit_code == EXIT_REFUSED
    [line] = errors(result)
    assert "wrong token" in line and "no token" not in line
    assert str(tmp_path / "token") in str(caught.value)


# --- item 12 ----------------------------------------------------------------------------------


def test_ango_claim_without_an_answer_prints_the_request_id_to_retry_with():
    with InProcessServer(SilentAllocator(), limits=Limits(shutdown_grace=0.1)) as srv:
        result = claim_cli("--port", str(srv.port), "--token", TOKEN, "--timeout", "0.5")
    assert result.exit_code == EXIT_UNAVAILABLE
    [line] = errors(result)
    assert re.search(r"retry with --request-id [0-9a-f]{32}$", line), line


def test_a_claim_that_timed_out_commits_later_and_its_request_id_retrieves_the_code(dsn):
    """The claim waits behind a lock on its batch past the client's timeout, then commits:
    the generated request id on the exception is how its code is found again."""
    batch = new_batch(dsn, 10)
    with InProcessServer(lambda: ango.Allocator(dsn, shards=1)) as srv:
        failures = []
        with psycopg.connect(dsn) as lock:
            lock.execute("SELECT 1 FROM ango.batches WHERE id = %s FOR UPDATE", (batch,))
            with ango.Client(port=srv.port, token=TOKEN, timeout=1) as client:
                with pytest.raises(ango.Unavailable) as caught:
                    client.claim(batch, "ann")
                failures.append(caught.value)

            async def go() -> None:
                async with await ango.AsyncClient.connect(port=srv.port, token=TOKEN,
                                                          timeout=1) as c:
                    await c.claim(batch, "bob")

            with pytest.raises(ango.Unavailable) as caught:
                asyncio.run(go())
            failures.append(caught.value)
            lock.rollback()  # the claims queued behind the lock now commit
        with ango.Client(port=srv.port, token=TOKEN, timeout=30) as client:
            codes = [client.claim(batch, who, request_id=exc.request_id)
                     for who, exc in zip(["ann", "bob"], failures, strict=True)]
    rids = [exc.request_id for exc in failures]
    assert all(re.fullmatch(r"[0-9a-f]{32}", rid) for rid in rids)
    assert sorted(issued(dsn)) == sorted(zip(codes, ["ann", "bob"], rids, strict=True))


def test_every_claim_failure_carries_the_request_id_sent():
    with InProcessServer(None) as srv, ango.Client(port=srv.port, token=TOKEN) as client:
        with pytest.raises(ango.InvalidInput) as caught:
            client.claim(BATCH, "x" * 70_000, request_id="mine")  # too big for a frame
    assert caught.value.request_id == "mine"
