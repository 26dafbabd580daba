"""ango.Client and ango.AsyncClient against real servers: operations, errors, retries, restarts."""

from __future__ import annotations

import asyncio
import re
import signal
import threading

import pytest
from ango.server import NOOP_CODE, Limits

import ango
from ango.errors import AuthenticationFailed
from tests.servers import TOKEN, InProcessServer, ServeProcess, issued, new_batch

UNKNOWN = "00000000-0000-4000-8000-000000000000"


class FlakyAllocator:
    """Answers ``unavailable`` to the first ``failures`` claims, then a code per request id."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.request_ids: list[str | None] = []

    def claim(self, batch_id, customer_id, *, client_id=None, request_id=None):
        self.request_ids.append(request_id)
        fut = asyncio.get_running_loop().create_future()
        if len(self.request_ids) <= self.failures:
            fut.set_exception(ango.Unavailable("shard restarting"))
        else:
            fut.set_result(f"CODE-{request_id}")
        return fut


class SilentAllocator:
    """Never answers a claim."""

    def claim(self, batch_id, customer_id, *, client_id=None, request_id=None):
        return asyncio.get_running_loop().create_future()


@pytest.fixture
def served(dsn):
    """An in-process server on a real allocator with two shards."""
    with InProcessServer(lambda: ango.Allocator(dsn, shards=2)) as srv:
        yield srv


def test_sync_client_round_trips_every_operation(dsn, served):
    batch = new_batch(dsn, 3, {"maxpercustomer": 1})
    with ango.Client(port=served.port, token=TOKEN, timeout=30) as client:
        code = client.claim(batch, "ann", request_id="r-1")
        assert client.claim(batch, "ann", request_id="r-1") == code
        with pytest.raises(ango.RuleViolation):
            client.claim(batch, "ann")
        [listed] = client.batches()
        assert listed["id"] == batch and listed["issued"] == 1 and listed["available"] == 2
        assert listed["rules"] == {"maxpercustomer": 1} and listed["expired"] is False
        assert set(listed) >= {"id", "name", "client_id", "rules", "expired", "total", "issued",
                               "available", "created_at"}
        stats = client.stats()
        assert stats["shards_alive"] == 2 and stats["server"]["connections"] == 1
        assert client.expire(batch) is True
        assert client.expire(batch) is False
        with pytest.raises(ango.BatchExpired):
            client.claim(batch, "bob")
    assert [(c, who, rid) for c, who, rid in issued(dsn)] == [(code, "ann", "r-1")]


def test_async_client_round_trips_every_operation(dsn, served):
    batch = new_batch(dsn, 2)

    async def go():
        async with await ango.AsyncClient.connect(port=served.port, token=TOKEN, timeout=30) as c:
            first = await c.claim(batch, "ann", client_id="c0ffee00-0000-4000-8000-000000000001")
            second = await c.claim(batch, "bob")
            with pytest.raises(ango.BatchExhausted):
                await c.claim(batch, "cy")
            listed = await c.batches()
            stats = await c.stats()
            expired = await c.expire(batch)
            return first, second, listed, stats, expired

    first, second, listed, stats, expired = asyncio.run(go())
    assert first != second
    assert [(b["id"], b["issued"], b["available"]) for b in listed] == [(batch, 2, 0)]
    assert stats["shards"] == 2 and stats["server"]["claims_served"] == 2
    assert expired is True
    assert sorted(row[0] for row in issued(dsn)) == sorted([first, second])


def test_server_errors_arrive_as_the_embedded_exception_classes(dsn, served):
    batch = new_batch(dsn, 1)
    with ango.Client(port=served.port, token=TOKEN, timeout=30) as client:
        with pytest.raises(ango.BatchNotFound):
            client.claim(UNKNOWN, "ann")
        with pytest.raises(ango.InvalidInput):
            client.claim("not-a-uuid", "ann")
        with pytest.raises(ango.InvalidInput):
            client.claim(batch, "")
        with pytest.raises(ango.BatchNotFound):
            client.expire(UNKNOWN)
        with pytest.raises(ango.InvalidInput):
            client.claim(batch, "x" * 70_000)  # larger than a frame: refused before sending
        client.claim(batch, "ann")  # the connection is still good
        with pytest.raises(ango.BatchExhausted):
            client.claim(batch, "bob")


def test_async_client_pipelines_concurrent_claims_over_one_connection(dsn, served):
    n = 2000
    batch = new_batch(dsn, n)

    async def go():
        async with await ango.AsyncClient.connect(port=served.port, token=TOKEN, timeout=60) as c:
            return await asyncio.gather(*(c.claim(batch, f"cust-{i}") for i in range(n)))

    codes = asyncio.run(go())
    assert len(set(codes)) == n
    assert sorted(row[0] for row in issued(dsn)) == sorted(codes)
    assert served.server.connections_accepted == 1


def test_a_wrong_token_raises_authentication_failed_without_retrying():
    with InProcessServer(None, limits=Limits(auth_failure_delay=0)) as srv:
        with pytest.raises(AuthenticationFailed):
            ango.Client(port=srv.port, token="wrong", timeout=10)

        async def go():
            await ango.AsyncClient.connect(port=srv.port, token="wrong", timeout=10)

        with pytest.raises(AuthenticationFailed):
            asyncio.run(go())
        assert srv.server.connections_accepted == 2
        assert srv.server.claims_served == 0


def test_clients_reconnect_after_the_server_drops_the_connection():
    with InProcessServer(None) as srv:
        def drop_all():
            for conn in list(srv.server.connections):
                conn.transport.abort()

        with ango.Client(port=srv.port, token=TOKEN) as client:
            assert client.claim("b", "c") == NOOP_CODE
            srv.call(drop_all)
            assert client.claim("b", "c") == NOOP_CODE

        async def go():
            async with await ango.AsyncClient.connect(port=srv.port, token=TOKEN) as c:
                assert await c.claim("b", "c") == NOOP_CODE
                srv.call(drop_all)
                return await asyncio.gather(*(c.claim("b", "c") for _ in range(50)))

        assert asyncio.run(go()) == [NOOP_CODE] * 50
        assert srv.server.connections_accepted == 4


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_unavailable_is_retried_with_the_same_generated_request_id(kind):
    alloc = FlakyAllocator(failures=3)
    with InProcessServer(alloc) as srv:
        if kind == "sync":
            with ango.Client(port=srv.port, token=TOKEN, timeout=30) as client:
                code = client.claim("b", "c")
        else:
            async def go():
                async with await ango.AsyncClient.connect(port=srv.port, token=TOKEN,
                                                          timeout=30) as c:
                    return await c.claim("b", "c")

            code = asyncio.run(go())
    [rid] = set(alloc.request_ids)
    assert len(alloc.request_ids) == 4
    assert re.fullmatch(r"[0-9a-f]{32}", rid)
    assert code == f"CODE-{rid}"


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_claim_without_an_answer_gives_up_after_the_timeout_as_unavailable(kind):
    with InProcessServer(SilentAllocator(), limits=Limits(shutdown_grace=0.1)) as srv:
        if kind == "sync":
            with ango.Client(port=srv.port, token=TOKEN, timeout=0.3) as client:
                with pytest.raises(ango.Unavailable):
                    client.claim("b", "c")
        else:
            async def go():
                async with await ango.AsyncClient.connect(port=srv.port, token=TOKEN,
                                                          timeout=0.3) as c:
                    await c.claim("b", "c")

            with pytest.raises(ango.Unavailable):
                asyncio.run(go())


def test_no_server_is_unavailable_after_the_timeout():
    with InProcessServer(None) as srv:
        port = srv.port
    with pytest.raises(ango.Unavailable):
        ango.Client(port=port, token=TOKEN, timeout=0.3)

    async def go():
        await ango.AsyncClient.connect(port=port, token=TOKEN, timeout=0.3)

    with pytest.raises(ango.Unavailable):
        asyncio.run(go())


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_the_server_restarts_under_connected_clients_without_a_duplicate(dsn, tmp_path, sig):
    """Claims in flight when the server stops are answered (SIGTERM) or retried with the
    same request id on the next server (SIGKILL): every code is issued once, to one answer."""
    batch = new_batch(dsn, 30_000)
    env = {"ANGO_TOKEN": TOKEN, "ANGO_DATA_DIR": str(tmp_path)}
    first = ServeProcess("--dsn", dsn, "--shards", "2", env=env).start()
    port = first.port
    warmed_up = threading.Event()  # enough claims served by the first server
    restarted = threading.Event()  # the second server is ready
    second: list[ServeProcess] = []
    sync_codes: list[str] = []
    first_rc: list[int] = []

    def keep_going(count: int, after_restart: list[int]) -> bool:
        """Claim until some claims went through the second server (and never too many)."""
        if restarted.is_set():
            after_restart[0] += 1
        return count < 25_000 and after_restart[0] < 300

    def sync_claims() -> None:
        after = [0]
        with ango.Client(port=port, token=TOKEN, timeout=90) as client:
            while keep_going(len(sync_codes), after):
                i = len(sync_codes)
                sync_codes.append(client.claim(batch, f"sync-{i}", request_id=f"s-{i}"))

    async def go() -> list[str]:
        codes: list[str] = []
        after = [0]
        async with await ango.AsyncClient.connect(port=port, token=TOKEN, timeout=90) as c:

            async def worker(w: int) -> None:
                while keep_going(len(codes), after):
                    codes.append(await c.claim(batch, f"cust-{w}-{len(codes) % 50}"))
                    if len(codes) >= 1000:
                        warmed_up.set()

            await asyncio.gather(*(worker(w) for w in range(50)))
        return codes

    def restart() -> None:
        warmed_up.wait(120)
        first_rc.append(first.stop(sig))  # while 50 claims are in flight
        second.append(ServeProcess("--dsn", dsn, "--shards", "2", port=port, env=env).start())
        restarted.set()

    restarter = threading.Thread(target=restart)
    syncer = threading.Thread(target=sync_claims)
    restarter.start()
    syncer.start()
    try:
        codes = asyncio.run(go())
        syncer.join(120)
        restarter.join(120)
    finally:
        first.kill()
        for proc in second:
            proc.stop()
    assert first_rc == [0 if sig == signal.SIGTERM else -signal.SIGKILL] and len(second) == 1
    assert len(codes) < 25_000 and len(sync_codes) < 25_000
    everything = codes + sync_codes
    assert len(set(everything)) == len(everything)
    assert sorted(row[0] for row in issued(dsn)) == sorted(everything)
