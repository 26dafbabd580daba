"""Metrics, `ango stats`, logs and readiness, against real servers and PostgreSQL."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time

import pytest
from ango.server import Limits
from prometheus_client.parser import text_string_to_metric_families
from psycopg.conninfo import make_conninfo

import ango
from ango.client import Client
from ango.errors import AuthenticationFailed, BatchExhausted
from ango.health import describe_dsn
from ango.logs import JsonFormatter, RateLimit
from tests.servers import ANGO, TOKEN, InProcessServer, ServeProcess, hello, new_batch
from tests.servers import connect as raw_connect


def scrape(srv: InProcessServer) -> dict[tuple[str, tuple], float]:
    """Every sample of the server's /metrics body, parsed by prometheus_client's parser."""
    body, content_type = srv.call(srv.server.metrics.render)
    assert content_type.startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, metric: str, **labels: str) -> float:
    return samples[(metric, tuple(sorted(labels.items())))]


def wait_for(predicate, timeout: float = 30.0, every: float = 0.1):
    """Poll until ``predicate()`` is true (generous bound: it only guards against a hang)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(every)
    raise AssertionError(f"not within {timeout} s")


@pytest.fixture
def served(dsn):
    with InProcessServer(lambda: ango.Allocator(dsn, shards=2)) as srv:
        yield srv


def test_metrics_move_after_claims(dsn, served):
    batch = new_batch(dsn, 5)
    before = scrape(served)
    assert value(before, "ango_claims_total", outcome="ok") == 0
    name = batch_name(dsn, batch)
    assert value(before, "ango_codes_available", batch=batch, name=name) == 5

    with Client("127.0.0.1", served.port, TOKEN) as client:
        codes = [client.claim(batch, f"cust-{i}") for i in range(5)]
        with pytest.raises(BatchExhausted):
            client.claim(batch, "one-too-many")
        after = scrape(served)

    assert len(set(codes)) == 5
    assert value(after, "ango_claims_total", outcome="ok") == 5
    assert value(after, "ango_claims_total", outcome="batch_exhausted") == 1
    assert value(after, "ango_claim_duration_seconds_count") == 6
    assert value(after, "ango_claim_duration_seconds_bucket", le="+Inf") == 6
    assert value(after, "ango_claim_duration_seconds_sum") > 0
    # Every code was issued by some group commit; the histogram adds them up.
    assert value(after, "ango_group_commit_size_sum") == 5
    assert value(after, "ango_group_commit_duration_seconds_count") >= 1
    assert value(after, "ango_shard_claims_served_total") == 5
    assert value(after, "ango_connections_opened_total", protocol="binary") == 1
    assert value(after, "ango_connections", protocol="binary") == 1
    assert value(after, "ango_shards_alive") == 2
    assert value(after, "ango_database_up") == 1
    assert ("ango_leases_held", ()) in after and ("ango_codes_held", ()) in after
    # The cache of codes available is at most a few seconds old.
    wait_for(lambda: value(scrape(served), "ango_codes_available", batch=batch, name=name) == 0,
             timeout=15, every=0.5)
    closed = wait_for(lambda: (s := scrape(served)) and
                      value(s, "ango_connections", protocol="binary") == 0 and s)
    assert value(closed, "ango_connections_opened_total", protocol="binary") == 1


def batch_name(dsn: str, batch: str) -> str:
    return next(b["name"] for b in _batches(dsn) if b["id"] == batch)


def _batches(dsn: str) -> list[dict]:
    from ango import batches, database

    with database.connect(dsn, autocommit=True) as conn:
        return [b.to_dict() for b in batches.list_batches(conn)]


def test_shard_counters_survive_a_shard_kill_9(dsn, served):
    batch = new_batch(dsn, 100)
    with Client("127.0.0.1", served.port, TOKEN, timeout=30) as client:
        for i in range(40):
            client.claim(batch, f"before-{i}")
        old_pids = served.call(served.allocator.shard_pids)
        served.call(lambda: served.allocator.kill_shard(0))
        wait_for(lambda: served.call(served.allocator.shard_pids)[0] not in (None, old_pids[0])
                 and served.call(lambda: served.allocator.shards_alive) == 2)
        for i in range(30):
            client.claim(batch, f"after-{i}")
        samples = scrape(served)
        stats = client.stats()

    assert value(samples, "ango_shard_restarts_total") == 1
    assert value(samples, "ango_shard_claims_served_total") == 70
    assert value(samples, "ango_group_commit_size_sum") == 70
    assert value(samples, "ango_claims_total", outcome="ok") == 70
    assert stats["claims_served"] == 70
    assert sum(s["claims_served"] for s in stats["per_shard"]) == 70
    assert stats["per_shard"][0]["restarts"] == 1
    assert stats["metrics"]["claims"]["ok"] == 70


def test_wrong_tokens_are_counted_and_logged_once_per_address(dsn, caplog):
    limits = Limits(auth_failure_delay=0.01)
    with InProcessServer(lambda: ango.Allocator(dsn, shards=1), limits=limits) as srv, \
            caplog.at_level(logging.WARNING, logger="ango.server"):
        for _ in range(3):
            with raw_connect(srv.port) as sock:
                answer = hello(sock, "wrong-token")
                assert answer.code == AuthenticationFailed.code
        samples = scrape(srv)
    assert value(samples, "ango_auth_failures_total", protocol="binary") == 3
    lines = [r for r in caplog.records if getattr(r, "event", None) == "auth_failed"]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert lines[0].address == "127.0.0.1" and "wrong-token" not in lines[0].getMessage()


def test_rate_limit_reports_the_hits_it_held_back():
    limit = RateLimit(every=10.0)
    assert limit.hit("a", now=0.0) == 1
    assert limit.hit("a", now=1.0) is None
    assert limit.hit("a", now=2.0) is None
    assert limit.hit("b", now=2.0) == 1
    assert limit.hit("a", now=10.5) == 3  # this one and the two held back


@pytest.mark.parametrize("dsn", [
    "postgresql://ango:s3cret@db.example:6543/codes",
    "host=db.example port=6543 dbname=codes user=ango password=s3cret",
])
def test_the_logged_database_is_host_port_db_without_the_password(dsn):
    assert describe_dsn(dsn) == "db.example:6543/codes"


def test_serve_refuses_an_unknown_log_format_without_a_traceback():
    found = subprocess.run([*ANGO, "serve", "--log-format", "xml"], capture_output=True,
                           text=True, timeout=60)
    assert found.returncode == 2 and "xml" in found.stderr and "Traceback" not in found.stderr


def test_json_log_lines_carry_the_extra_fields():
    record = logging.LogRecord("ango.x", logging.WARNING, __file__, 1, "hello %s", ("you",), None)
    record.event = "thing"
    line = json.loads(JsonFormatter().format(record))
    assert line["msg"] == "hello you" and line["level"] == "warning"
    assert line["logger"] == "ango.x" and line["event"] == "thing"


# --- `ango serve` as a process: logs and `ango stats` ---------------------------------


def test_serve_json_logs_name_versions_and_never_the_secrets(dsn, tmp_path):
    password = "pw-" + os.urandom(6).hex()  # trust authentication ignores it; logs must too
    dsn_with_password = make_conninfo(dsn, password=password)
    batch = new_batch(dsn, 10)
    server = ServeProcess("--dsn", dsn_with_password, "--shards", "2", "--token", TOKEN,
                          "--log-format", "json", "--data-dir", str(tmp_path))
    server.start()
    try:
        with Client("127.0.0.1", server.port, TOKEN) as client:
            code = client.claim(batch, "customer-1")
            pids = [s["pid"] for s in client.stats()["per_shard"]]
        with raw_connect(server.port) as sock:
            assert hello(sock, "not-the-token").code == AuthenticationFailed.code
        os.kill(pids[1], signal.SIGKILL)
        wait_for(lambda: "shard_restarted" in server.stderr)
    finally:
        assert server.stop() == 0

    lines = [json.loads(line) for line in server.stderr_lines if line.strip()]
    started = [line for line in lines if line.get("event") == "started"]
    assert len(started) == 1
    start = started[0]
    assert start["level"] == "info" and f"serving on 127.0.0.1:{server.port}" in start["msg"]
    assert start["ango_version"] == ango.__version__
    assert start["python_version"].count(".") == 2
    assert start["postgres_version"][:2].isdigit()
    assert start["database"] == describe_dsn(dsn)
    assert start["port"] == server.port and start["shards"] == 2
    events = {line.get("event"): line for line in lines}
    assert events["auth_failed"]["level"] == "warning"
    assert events["auth_failed"]["address"] == "127.0.0.1"
    assert events["shard_died"]["level"] == "warning" and events["shard_died"]["shard"] == 1
    everything = server.stderr
    assert password not in everything
    assert TOKEN not in everything and "not-the-token" not in everything
    assert code not in everything


def test_ango_stats_prints_a_table_and_json(dsn, tmp_path):
    batch = new_batch(dsn, 10)
    server = ServeProcess("--dsn", dsn, "--shards", "2", "--token", TOKEN,
                          "--data-dir", str(tmp_path))
    server.start()
    try:
        with Client("127.0.0.1", server.port, TOKEN) as client:
            for i in range(3):
                client.claim(batch, f"c{i}")
        env = dict(os.environ, ANGO_TOKEN=TOKEN)
        args = [*ANGO, "stats", "--port", str(server.port)]
        as_json = subprocess.run([*args, "--json"], capture_output=True, text=True, env=env,
                                 timeout=60, check=True)
        table = subprocess.run(args, capture_output=True, text=True, env=env, timeout=60,
                               check=True)
        wrong = subprocess.run([*args, "--token", "nope"], capture_output=True, text=True,
                               timeout=60)
    finally:
        server.stop()
    found = json.loads(as_json.stdout)
    assert found["claims_served"] == 3 and found["shards_alive"] == 2
    assert found["metrics"]["claims"]["ok"] == 3
    assert found["metrics"]["codes_available"][batch] == 7
    assert found["database"]["up"] is True
    out = table.stdout
    assert "shards 2/2 alive" in out and "claims          ok 3" in out
    assert f"{batch}          7" in out
    assert wrong.returncode != 0 and "Traceback" not in wrong.stderr
    assert "unauthorized" in wrong.stderr
    gone = subprocess.run([*args, "--timeout", "0.5"], capture_output=True, text=True, env=env,
                          timeout=60)
    assert gone.returncode == 1 and "Traceback" not in gone.stderr
    assert "unavailable" in gone.stderr


# --- readiness across a PostgreSQL stop and start ---------------------------------------


def test_readiness_follows_postgresql_stop_and_start(caplog):
    from benchmarks.chaos import EmbeddedPostgres

    pg = EmbeddedPostgres()  # our own server: stopping the shared one would hurt others
    try:
        with ango.SyncAllocator(pg.dsn, shards=1) as alloc, \
                caplog.at_level(logging.INFO, logger="ango.health"):
            ok, reasons = alloc.ready()
            assert ok, reasons
            assert reasons["postgres"] == "ok"
            pg.stop("immediate")
            ok, reasons = wait_for(lambda: not (r := alloc.ready())[0] and r,
                                   timeout=10, every=0.2)
            assert reasons["postgres"] != "ok"
            time.sleep(2.5)  # the watcher keeps failing meanwhile: still one warning
            pg.start()
            ok, reasons = wait_for(lambda: (r := alloc.ready())[0] and r, timeout=30,
                                   every=0.2)
            assert reasons == {"postgres": "ok", "shards": "1 of 1 alive"}
            assert alloc.stats()["database"]["up"] is True
        down = [r for r in caplog.records if getattr(r, "event", None) == "database_down"]
        up = [r for r in caplog.records if getattr(r, "event", None) == "database_up"]
        assert len(down) == 1 and down[0].levelno == logging.WARNING
        assert len(up) == 1 and up[0].levelno == logging.INFO
    finally:
        pg.close()


def test_readiness_is_false_while_a_shard_process_does_not_answer(dsn):
    with ango.SyncAllocator(dsn, shards=2) as alloc:
        assert alloc.ready() == (True, {"postgres": "ok", "shards": "2 of 2 alive"})
        pid = alloc._allocator.shard_pids()[1]
        os.kill(pid, signal.SIGSTOP)  # alive to the supervisor, but not serving
        try:
            ok, reasons = alloc.ready(timeout=0.5)
            assert not ok and reasons["shards"] == "not serving: 1"
            assert reasons["postgres"] == "ok"
        finally:
            os.kill(pid, signal.SIGCONT)
        assert wait_for(lambda: alloc.ready()[0])
