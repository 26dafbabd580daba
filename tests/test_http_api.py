"""The HTTP API (server/http_api.py) against `ango serve` subprocesses, with httpx.

One `ango serve --shards 1` on a database of this module serves most tests
(each uses batches of its own); the limits with short timeouts run an
in-process HTTP server on its own loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path

import httpx
import psutil
import psycopg
import pytest
from ango.server import Limits, ProtocolServer
from ango.server.http_api import ROUTES, HttpApi, HttpLimits
from ango.server.http_server import HttpServer

from tests.hostile import module_dsn  # noqa: F401 (a fixture)
from tests.servers import ANGO, CLIENT_ID, TOKEN, ServeProcess, issued, new_batch

AUTH = {"Authorization": f"Bearer {TOKEN}"}
JSON_TYPE = {"Content-Type": "application/json"}
OTHER_CLIENT = "0ddba110-0000-4000-8000-000000000002"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def served_dsn(module_dsn: str) -> str:  # noqa: F811
    """The database of this module's server."""
    return module_dsn


@pytest.fixture(scope="module")
def serve(served_dsn: str) -> Iterator[ServeProcess]:
    """`ango serve` with the HTTP API on a free port."""
    proc = ServeProcess("--dsn", served_dsn, "--shards", "1", "--token", TOKEN).start()
    try:
        assert proc.http_port
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def http(serve: ServeProcess) -> Iterator[httpx.Client]:
    """An httpx client (keep-alive) for the module's server, without a token."""
    with httpx.Client(base_url=f"http://127.0.0.1:{serve.http_port}", timeout=30) as client:
        yield client


def redeem(http: httpx.Client, batch: str, customer: str, **extra) -> httpx.Response:
    headers = {**AUTH, **JSON_TYPE, **extra.pop("headers", {})}
    body = {"batchid": batch, "clientid": CLIENT_ID, "customerid": customer, **extra}
    return http.post("/api/v1/code/redeem", content=json.dumps(body), headers=headers)


def error_of(response: httpx.Response) -> str:
    body = response.json()
    assert set(body) >= {"error", "message"} and body["message"], body
    return body["error"]


# --- claims ---------------------------------------------------------------------------


def test_redeem_answers_the_code_committed_for_the_customer(http, served_dsn):
    batch = new_batch(served_dsn, 3)
    response = redeem(http, batch, "alice")
    assert response.status_code == 200
    code = response.json()["code"]
    assert [(c, who) for c, who, _ in issued(served_dsn) if c == code] == [(code, "alice")]


def test_redeem_retried_with_idempotency_key_returns_the_same_code_once(http, served_dsn):
    batch = new_batch(served_dsn, 5)
    first = redeem(http, batch, "bob", headers={"Idempotency-Key": "order-17"})
    again = redeem(http, batch, "bob", headers={"Idempotency-Key": "order-17"})
    by_field = redeem(http, batch, "bob", requestid="order-17")
    assert first.status_code == again.status_code == by_field.status_code == 200
    assert first.json() == again.json() == by_field.json()
    mine = [row for row in issued(served_dsn) if row[1] == "bob"]
    assert len(mine) == 1 and mine[0][2] == "order-17"
    differ = redeem(http, batch, "bob", requestid="a", headers={"Idempotency-Key": "b"})
    assert differ.status_code == 400 and error_of(differ) == "invalid_input"


def test_redeem_errors_have_the_statuses_and_stable_codes(http, served_dsn):
    ruled = new_batch(served_dsn, 5, {"maxpercustomer": 1})
    assert redeem(http, ruled, "carol").status_code == 200
    rule = redeem(http, ruled, "carol")
    assert (rule.status_code, error_of(rule)) == (403, "rule_violation")

    tiny = new_batch(served_dsn, 1)
    assert redeem(http, tiny, "dave").status_code == 200
    empty = redeem(http, tiny, "erin")
    assert (empty.status_code, error_of(empty)) == (404, "batch_exhausted")

    unknown = redeem(http, str(uuid.uuid4()), "frank")
    assert (unknown.status_code, error_of(unknown)) == (404, "batch_not_found")
    other = redeem(http, ruled, "grace", clientid=OTHER_CLIENT)
    assert (other.status_code, error_of(other)) == (404, "batch_not_found")

    expiring = new_batch(served_dsn, 5)
    assert http.post(f"/api/v1/batches/{expiring}/expire", headers=AUTH).status_code == 200
    gone = redeem(http, expiring, "heidi")
    assert (gone.status_code, error_of(gone)) == (410, "batch_expired")

    before = len(issued(served_dsn))
    bad_uuid = redeem(http, "not-a-uuid", "ivan")
    assert (bad_uuid.status_code, error_of(bad_uuid)) == (400, "invalid_input")
    assert "batch id" in bad_uuid.json()["message"]
    post = lambda body, **h: http.post("/api/v1/code/redeem", content=body,  # noqa: E731
                                       headers={**AUTH, **JSON_TYPE, **h})
    malformed = post(b"{not json")
    assert (malformed.status_code, error_of(malformed)) == (400, "malformed_json")
    wrong_type = post(json.dumps({"batchid": 7, "customerid": "x"}))
    assert (wrong_type.status_code, error_of(wrong_type)) == (400, "invalid_input")
    assert "$.batchid" in wrong_type.json()["message"]
    missing = post(json.dumps({"batchid": ruled}))
    assert (missing.status_code, error_of(missing)) == (400, "invalid_input")
    form = post(b"batchid=x", **{"Content-Type": "application/x-www-form-urlencoded"})
    assert (form.status_code, error_of(form)) == (415, "unsupported_media_type")
    huge = post(json.dumps({"batchid": ruled, "customerid": "x" * 100_000}))
    assert (huge.status_code, error_of(huge)) == (413, "payload_too_large")
    assert len(issued(served_dsn)) == before


def test_redeem_without_content_type_is_read_as_json_like_the_original(http, served_dsn):
    batch = new_batch(served_dsn, 2)
    body = json.dumps({"batchid": batch, "clientid": CLIENT_ID, "customerid": "judy"})
    response = http.post("/api/v1/code/redeem", content=body, headers=AUTH)
    assert "content-type" not in response.request.headers
    assert response.status_code == 200


# --- auth -----------------------------------------------------------------------------


def test_protected_routes_need_the_bearer_token_and_open_ones_do_not(http, served_dsn):
    batch = new_batch(served_dsn, 2)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        refused = http.post("/api/v1/code/redeem", headers={**JSON_TYPE, **headers},
                            content=json.dumps({"batchid": batch, "customerid": "mallory"}))
        assert (refused.status_code, error_of(refused)) == (401, "unauthorized")
        assert refused.headers["www-authenticate"].startswith("Bearer")
        assert http.get("/api/v1/batches", headers=headers).status_code == 401
    assert not [row for row in issued(served_dsn) if row[1] == "mallory"]
    for path in ("/healthcheck", "/readyz", "/livez", "/openapi.json"):
        assert http.get(path).status_code == 200, path
    assert http.get("/api/v1/batches", headers=AUTH).status_code == 200


def test_http_no_auth_serves_without_a_token_and_warns_in_the_log():
    proc = ServeProcess("--noop", "--token", TOKEN, "--http-no-auth").start()
    try:
        body = json.dumps({"batchid": str(uuid.uuid4()), "customerid": "x"})
        response = httpx.post(f"http://127.0.0.1:{proc.http_port}/api/v1/code/redeem",
                              content=body, headers=JSON_TYPE, timeout=30)
        assert response.status_code == 200 and response.json() == {"code": "NOOP"}
        assert "WARNING" in proc.stderr and "--http-no-auth" in proc.stderr
    finally:
        proc.stop()


def test_sigterm_stops_the_server_cleanly_with_keep_alive_connections_open():
    proc = ServeProcess("--noop", "--token", TOKEN).start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{proc.http_port}", timeout=30) as client:
            assert client.get("/livez").status_code == 200  # the connection stays open
            started = time.monotonic()
            assert proc.stop(timeout=30) == 0
            assert time.monotonic() - started < 20
    finally:
        proc.kill()


def test_a_busy_http_port_is_a_clear_error_not_a_traceback():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run([*ANGO, "serve", "--noop", "--port", "0", "--token", TOKEN,
                                 "--http-port", str(port)],
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"cannot serve on 127.0.0.1:0 and 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_no_http_serves_the_binary_protocol_only():
    proc = ServeProcess("--noop", "--token", TOKEN, "--no-http").start()
    try:
        assert proc.http_port is None and "HTTP API" not in proc.stderr
    finally:
        proc.stop()


# --- routing and batches ----------------------------------------------------------------


def test_unknown_route_is_404_and_wrong_method_405_with_allow(http):
    missing = http.get("/api/v1/nothing", headers=AUTH)
    assert (missing.status_code, error_of(missing)) == (404, "not_found")
    wrong = http.get("/api/v1/code/redeem", headers=AUTH)
    assert (wrong.status_code, error_of(wrong)) == (405, "method_not_allowed")
    assert wrong.headers["allow"] == "POST"


def test_batches_list_get_and_expire(http, served_dsn):
    batch = new_batch(served_dsn, 4, {"maxpercustomer": 2})
    assert redeem(http, batch, "kim").status_code == 200
    listed = {b["id"]: b for b in http.get("/api/v1/batches", headers=AUTH).json()}
    row = listed[batch]
    assert row["rules"] == {"maxpercustomer": 2} and row["expired"] is False
    assert (row["client_id"], row["total"], row["issued"], row["available"]) == (CLIENT_ID, 4, 1, 3)
    assert http.get(f"/api/v1/batches/{batch}", headers=AUTH).json() == row
    expired = http.post(f"/api/v1/batches/{batch}/expire", headers=AUTH)
    assert expired.json() == {"id": batch, "expired": True, "changed": True}
    again = http.post(f"/api/v1/batches/{batch}/expire", headers=AUTH).json()
    assert again["changed"] is False
    assert batch not in {b["id"] for b in http.get("/api/v1/batches", headers=AUTH).json()}
    everything = http.get("/api/v1/batches?all=true", headers=AUTH).json()
    assert {b["id"]: b["expired"] for b in everything}[batch] is True
    unknown = http.get(f"/api/v1/batches/{uuid.uuid4()}", headers=AUTH)
    assert (unknown.status_code, error_of(unknown)) == (404, "batch_not_found")
    bad = http.post("/api/v1/batches/nope/expire", headers=AUTH)
    assert (bad.status_code, error_of(bad)) == (400, "invalid_input")


def test_stats_report_the_allocator_the_protocol_server_and_http(http):
    stats = http.get("/api/v1/stats", headers=AUTH).json()
    assert stats["allocator"]["shards"] == 1 and stats["allocator"]["shards_alive"] == 1
    assert stats["protocol"]["protocol_version"] >= 1
    assert stats["http"]["requests"] >= 1


# --- upload ---------------------------------------------------------------------------


def _csv(rows: int, prefix: str, width: int = 8) -> bytes:
    lines = [f"{prefix}-{i:0{width}d},{CLIENT_ID}\n" for i in range(rows)]
    return ("code,client_id\n" + "".join(lines)).encode()


def test_upload_creates_a_batch_from_the_originals_csv(http):
    data = _csv(3, uuid.uuid4().hex[:8])
    response = http.post("/api/v1/codes/upload", headers=AUTH,
                         data={"batch_name": "spring", "rules": '{"maxpercustomer": 1}'},
                         files={"file": ("codes.csv", data, "text/csv")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["message"] == "Codes uploaded successfully" and body["imported"] == 3
    batch = http.get(f"/api/v1/batches/{body['batch_id']}", headers=AUTH).json()
    assert (batch["name"], batch["total"], batch["client_id"]) == ("spring", 3, CLIENT_ID)
    assert batch["rules"] == {"maxpercustomer": 1}


def test_upload_with_the_file_before_the_fields_is_spooled_and_imported(http):
    boundary = "b0undary"
    data = _csv(2, uuid.uuid4().hex[:8]).decode()
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"c.csv\"\r\nContent-Type: text/csv\r\n\r\n{data}\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"batch_name\"\r\n\r\n"
            f"late fields\r\n--{boundary}--\r\n").encode()
    response = http.post("/api/v1/codes/upload", content=body, headers={
        **AUTH, "Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert response.status_code == 200, response.text
    assert response.json()["imported"] == 2


def test_upload_bad_input_is_400_naming_the_problem_and_imports_nothing(http, served_dsn):
    def batches() -> int:
        return len(http.get("/api/v1/batches?all=1", headers=AUTH).json())

    def upload(data=None, files=None, **headers):
        return http.post("/api/v1/codes/upload", headers={**AUTH, **headers}, data=data,
                         files=files)

    before = batches()
    good = _csv(2, uuid.uuid4().hex[:8])
    bad_line = good + b"lonely\n"
    response = upload({"batch_name": "x"}, {"file": ("c.csv", bad_line, "text/csv")})
    assert (response.status_code, error_of(response)) == (400, "import_failed")
    assert "line 4" in response.json()["message"]
    other = good.replace(CLIENT_ID.encode(), OTHER_CLIENT.encode(), 1)
    other = other.replace(OTHER_CLIENT.encode(), CLIENT_ID.encode(), 1) + \
        f"late,{OTHER_CLIENT}\n".encode()
    response = upload({"batch_name": "x"}, {"file": ("c.csv", other, "text/csv")})
    assert response.status_code == 400 and "line 4" in response.json()["message"]
    cases = [
        (upload(None, {"batch_name": (None, b"x")}), "No CSV file provided"),
        (upload({}, {"file": ("c.csv", good, "text/csv")}), "Batch name is required"),
        (upload({"batch_name": "x"}, {"file": ("c.txt", good, "text/plain")}), "must be a CSV"),
        (upload({"batch_name": "x"}, {"file": ("c.csv", b"code\nA\n", "text/csv")}),
         "client_id"),
        (upload({"batch_name": "x", "rules": "{nope"}, {"file": ("c.csv", good, "text/csv")}),
         "rules"),
    ]
    for response, words in cases:
        assert (response.status_code, error_of(response)) == (400, "invalid_input"), \
            response.text
        assert words in response.json()["message"]
    plain = upload(None, None, **{"Content-Type": "text/csv"})
    assert (plain.status_code, error_of(plain)) == (415, "unsupported_media_type")
    assert batches() == before


def test_upload_with_a_bad_line_early_in_a_big_file_is_400_naming_it(http):
    good = _csv(100_000, uuid.uuid4().hex[:8])
    head, rest = good.split(b"\n", 2)[:2], good.split(b"\n", 2)[2]
    data = b"\n".join(head) + b"\n,,,\n" + rest  # line 3 is bad, megabytes follow it
    response = http.post("/api/v1/codes/upload", headers=AUTH, data={"batch_name": "early"},
                         files={"file": ("c.csv", data, "text/csv")})
    assert (response.status_code, error_of(response)) == (400, "import_failed")
    assert response.json()["message"].startswith("line 3:")
    assert "early" not in {b["name"] for b in
                           http.get("/api/v1/batches?all=1", headers=AUTH).json()}


def test_upload_of_300k_rows_streams_with_the_server_memory_bounded(http, serve, tmp_path):
    rows = 300_000
    path = tmp_path / "codes.csv"
    prefix = uuid.uuid4().hex
    with open(path, "w") as f:  # about 75 MB: long codes, so buffering it would show
        f.write("code,client_id\n")
        for i in range(rows):
            f.write(f"{prefix}-{i:09d}-{'x' * 160},{CLIENT_ID}\n")
    size = path.stat().st_size
    server = psutil.Process(serve.proc.pid)
    baseline = server.memory_info().rss
    peak = [baseline]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], server.memory_info().rss)
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        with open(path, "rb") as f:
            response = http.post("/api/v1/codes/upload", headers=AUTH, timeout=300,
                                 data={"batch_name": "big"},
                                 files={"file": ("codes.csv", f, "text/csv")})
    finally:
        done.set()
        sampler.join()
    assert response.status_code == 200, response.text
    assert response.json()["imported"] == rows
    batch = http.get(f"/api/v1/batches/{response.json()['batch_id']}", headers=AUTH).json()
    assert batch["total"] == rows
    grown = peak[0] - baseline
    assert size > 64 * 1024 * 1024 and grown < 32 * 1024 * 1024, (grown, size)


# --- health, readiness, documents -------------------------------------------------------


def test_healthcheck_readyz_livez_answer_ok_while_all_is_well(http):
    health = http.get("/healthcheck")
    assert health.json() == {"status": "healthy", "message": "System is operational"}
    ready = http.get("/readyz").json()
    assert ready == {"ready": True, "database": True, "shards": 1, "shards_alive": 1}
    assert http.get("/livez").json() == {"status": "alive"}


def test_healthcheck_and_readyz_answer_503_when_the_database_is_gone(dsn, server_dsn):
    proc = ServeProcess("--dsn", dsn, "--shards", "1", "--token", TOKEN).start()
    try:
        base = f"http://127.0.0.1:{proc.http_port}"
        assert httpx.get(f"{base}/readyz", timeout=30).status_code == 200
        name = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
        with psycopg.connect(server_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            health = httpx.get(f"{base}/healthcheck", timeout=30)
            if health.status_code == 503:
                break
            time.sleep(0.2)
        assert health.status_code == 503 and health.json()["status"] == "unhealthy"
        assert health.headers["retry-after"]
        ready = httpx.get(f"{base}/readyz", timeout=30)
        assert (ready.status_code, error_of(ready)) == (503, "not_ready")
        assert ready.json()["database"] is False
        assert httpx.get(f"{base}/livez", timeout=30).status_code == 200
        listing = httpx.get(f"{base}/api/v1/batches", headers=AUTH, timeout=30)
        assert (listing.status_code, error_of(listing)) == (503, "unavailable")
        assert listing.headers["retry-after"]
    finally:
        proc.stop()


def test_openapi_document_lists_every_route_and_is_served(http):
    document = json.loads((REPO / "docs" / "openapi.json").read_text())
    documented = {(method.upper(), path) for path, item in document["paths"].items()
                  for method in item}
    assert {(r.method, r.path) for r in ROUTES} == documented
    for route in ROUTES:
        operation = document["paths"][route.path][route.method.lower()]
        assert (operation.get("security") == []) == route.open, route
    assert http.get("/openapi.json").json() == document


# --- limits (in-process, short timeouts) -------------------------------------------------


class RecordingMetrics:
    """The metrics interface, recording what the HTTP API reports."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def exposition(self) -> tuple[bytes, str]:
        return b"# test\nango_up 1\n", "text/plain; version=0.0.4; charset=utf-8"

    def __getattr__(self, name: str):
        return lambda *args: self.calls.append((name, *args))


@contextlib.contextmanager
def http_in_thread(make_api: Callable[[], HttpApi]) -> Iterator[int]:
    """``make_api()`` (called in the server's loop) served in a thread; yields its port."""
    ready: Future = Future()
    stop: list = []

    async def main() -> None:
        server = HttpServer(make_api())
        _, port = await server.start("127.0.0.1", 0)
        finished = asyncio.Event()
        stop.append((asyncio.get_running_loop(), finished))
        ready.set_result(port)
        await finished.wait()
        await server.shutdown()

    import uvloop

    thread = threading.Thread(target=lambda: uvloop.run(main()), daemon=True)
    thread.start()
    yield ready.result(timeout=30)
    loop, finished = stop[0]
    loop.call_soon_threadsafe(finished.set)
    thread.join(30)


@pytest.fixture
def limited() -> Iterator[tuple[int, RecordingMetrics]]:
    """A noop HTTP API in a thread with short timeouts and small limits; (port, metrics)."""
    metrics = RecordingMetrics()
    limits = HttpLimits(header_timeout=0.5, body_timeout=0.5, max_header_bytes=2048,
                        max_connections=3, auth_failure_delay=0.0)

    def make_api() -> HttpApi:
        guard = ProtocolServer(None, token=TOKEN,
                               limits=Limits(auth_failure_delay=0.2, auth_failure_max_delay=0.6))
        return HttpApi(None, token=TOKEN, limits=limits, metrics=metrics, auth_guard=guard)

    with http_in_thread(make_api) as port:
        yield port, metrics


def _raw(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return sock


def _answer(sock: socket.socket) -> tuple[int, dict]:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_slow_headers_are_answered_408_and_a_silent_connection_closed(limited):
    port, _ = limited
    slow = _raw(port)
    slow.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n")  # never finishes its headers
    assert _answer(slow) == (408, {"error": "request_timeout",
                                   "message": "headers not complete within 0.5 s"})
    silent = _raw(port)
    assert silent.recv(10) == b""  # closed by the server, within the 10 s socket timeout


def test_a_stalled_body_is_answered_408(limited):
    port, _ = limited
    sock = _raw(port)
    sock.sendall(b"POST /api/v1/code/redeem HTTP/1.1\r\nHost: x\r\n"
                 b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
                 b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"ba")
    status, body = _answer(sock)
    assert (status, body["error"]) == (408, "request_timeout")


def test_oversized_headers_are_431_and_malformed_http_400_in_json(limited):
    port, _ = limited
    big = _raw(port)
    big.sendall(b"GET /livez HTTP/1.1\r\nX-Big: " + b"a" * 4096 + b"\r\n\r\n")
    assert _answer(big)[0] == 431
    garbage = _raw(port)
    garbage.sendall(b"\x00\x01 nonsense\r\n\r\n")
    status, body = _answer(garbage)
    assert (status, body["error"]) == (400, "bad_request")


def test_a_request_after_a_big_body_in_the_same_read_is_not_taken_for_big_headers(limited):
    port, _ = limited
    body = json.dumps({"batchid": str(uuid.uuid4()), "customerid": "x", "pad": "a" * 4000})
    sock = _raw(port)
    sock.sendall(b"POST /api/v1/code/redeem HTTP/1.1\r\nHost: x\r\n"
                 b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body.encode())
                 + b"GET /livez HTTP/1.1\r\nHost: x\r\n")  # the next request's headers begin
    time.sleep(0.1)
    sock.sendall(b"Connection: close\r\n\r\n")
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    assert data.count(b"HTTP/1.1 200 OK") == 2, data


def test_connections_beyond_the_limit_are_answered_503(limited):
    port, _ = limited
    held = [_raw(port) for _ in range(3)]
    extra = _raw(port)
    status, body = _answer(extra)
    assert (status, body["error"]) == (503, "unavailable")
    for sock in held:
        sock.close()


def test_metrics_hooks_see_http_claims_connections_auth_failures_and_serve_metrics(limited):
    port, metrics = limited
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        body = json.dumps({"batchid": str(uuid.uuid4()), "customerid": "x"})
        assert client.post("/api/v1/code/redeem", content=body, headers=AUTH).status_code == 200
        assert client.get("/api/v1/stats").status_code == 401
        scraped = client.get("/metrics")
        assert scraped.text == "# test\nango_up 1\n"
        assert scraped.headers["content-type"].startswith("text/plain; version=0.0.4")
    deadline = time.monotonic() + 10
    while ("connection_closed", "http") not in metrics.calls and time.monotonic() < deadline:
        time.sleep(0.05)
    names = [call[:2] for call in metrics.calls]
    assert ("connection_opened", "http") in names and ("connection_closed", "http") in names
    assert ("auth_failed", "http") in names


def test_wrong_tokens_are_slowed_per_address_but_the_right_one_is_never_refused(limited):
    port, _ = limited
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        wrong = {"Authorization": "Bearer guess"}
        waits = []
        for _ in range(4):
            started = time.monotonic()
            assert client.get("/api/v1/stats", headers=wrong).status_code == 401
            waits.append(time.monotonic() - started)
        # The binary protocol's counter: 0.2 s, 0.4 s, then its 0.6 s cap.
        assert waits[0] >= 0.2 and waits[2] >= 0.6 and waits[3] >= 0.6
        assert client.get("/api/v1/stats", headers=AUTH).status_code == 200
        assert client.get("/livez").status_code == 200  # open routes stay open


def test_metrics_are_served_in_prometheus_format_and_move_after_claims(http, served_dsn):
    from prometheus_client.parser import text_string_to_metric_families

    def claims_ok() -> float:
        scraped = http.get("/metrics")
        assert scraped.status_code == 200
        for family in text_string_to_metric_families(scraped.text):
            if family.name == "ango_claims":
                return sum(s.value for s in family.samples
                           if s.name == "ango_claims_total" and s.labels["outcome"] == "ok")
        return 0.0

    before = claims_ok()
    batch = new_batch(served_dsn, 3)
    for customer in ("m1", "m2"):
        assert redeem(http, batch, customer).status_code == 200
    assert claims_ok() == before + 2


def test_pipe_keeps_at_most_its_limit_waiting():
    from ango.server.http_upload import Pipe

    async def bounded() -> tuple[int, int]:
        pipe = Pipe(asyncio.get_running_loop(), limit=1024)
        reader = io.BufferedReader(pipe, 256)
        got: list[bytes] = []
        thread = threading.Thread(target=lambda: got.append(reader.read()))
        thread.start()
        most = 0
        for _ in range(200):
            await pipe.write(b"y" * 512)
            most = max(most, pipe._size)
        pipe.end()
        await asyncio.get_running_loop().run_in_executor(None, thread.join)
        return most, len(got[0])

    most, total = asyncio.run(bounded())
    assert total == 200 * 512 and most <= 1024 + 512


def test_parse_wrk_reads_requests_errors_and_percentiles():
    from benchmarks.load import parse_wrk

    out = """Running 10s test @ http://127.0.0.1:7879
  1 threads and 100 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     6.10ms    2.01ms  1.02s    90.00%
    Req/Sec    16.1k     1.2k   18.0k    70.00%
  Latency Distribution
     50%    5.80ms
     75%    6.90ms
     90%    8.10ms
     99%  950.00us
  161234 requests in 10.01s, 20.00MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 7
Requests/sec:  16107.29
"""
    assert parse_wrk(out) == {"requests": 161234, "window_s": 10.01, "p50_ms": 5.8,
                              "p99_ms": 0.95, "max_ms": 1020.0, "non_2xx": 7,
                              "socket_errors": 3}


def test_a_response_written_in_pieces_leaves_in_one_write_per_loop_pass():
    from ango.server.http_server import CoalescingTransport

    class Recording:
        def __init__(self) -> None:
            self.writes: list[bytes] = []
            self.closed = False

        def write(self, data: bytes) -> None:
            self.writes.append(data)

        def is_closing(self) -> bool:
            return self.closed

        def close(self) -> None:
            self.closed = True

    async def main() -> Recording:
        real = Recording()
        transport = CoalescingTransport(real, asyncio.get_running_loop())
        transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
        transport.write(b"{}")
        assert real.writes == []  # nothing yet: the loop pass has not ended
        await asyncio.sleep(0)
        transport.write(b"last")
        transport.close()  # flushes before closing
        return real

    real = asyncio.run(main())
    assert real.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}", b"last"]
    assert real.closed


# --- client-scoped tokens (ango token create) -------------------------------------------

OTHER_CLIENT = "0ddba110-0000-4000-8000-000000000002"


def client_token(http: httpx.Client, dsn: str, client: str = CLIENT_ID) -> tuple[str, dict]:
    """A new client token (``ango token create``) the server accepts: its name and headers."""
    from ango.database import connect
    from ango.tokens import create_token

    name = f"shop-{uuid.uuid4().hex[:6]}"
    with connect(dsn, autocommit=True) as conn:
        secret, _ = create_token(conn, client, name)
    scoped = {"Authorization": f"Bearer {secret}"}
    deadline = time.monotonic() + 10  # the server reloads client tokens every second
    while http.get("/api/v1/batches", headers=scoped).status_code == 401:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    return name, scoped


def test_a_client_token_reaches_only_its_own_clients_batches_over_http(http, served_dsn):
    from ango.database import connect
    from ango.tokens import revoke_token
    from tests.helpers import make_batch

    mine = new_batch(served_dsn, 5)  # CLIENT_ID's
    theirs = make_batch(served_dsn, 5, client=OTHER_CLIENT)
    name, scoped = client_token(http, served_dsn)

    def claim(batch: str, client: str | None) -> httpx.Response:
        body = {"batchid": batch, "customerid": "c-1", **({"clientid": client} if client else {})}
        return http.post("/api/v1/code/redeem", content=json.dumps(body),
                         headers={**scoped, **JSON_TYPE})

    assert claim(mine, None).status_code == 200 and claim(mine, CLIENT_ID).status_code == 200
    for batch, client in ((theirs, None), (theirs, OTHER_CLIENT), (mine, OTHER_CLIENT)):
        refused = claim(batch, client)
        assert (refused.status_code, error_of(refused)) == (404, "batch_not_found")
    listed = {row["id"] for row in http.get("/api/v1/batches", headers=scoped).json()}
    assert mine in listed and theirs not in listed
    assert http.get(f"/api/v1/batches/{theirs}", headers=scoped).status_code == 404
    assert http.get(f"/api/v1/batches/{mine}", headers=scoped).status_code == 200
    refused = http.post(f"/api/v1/batches/{theirs}/expire", headers=scoped)
    assert (refused.status_code, error_of(refused)) == (404, "batch_not_found")
    stats = http.get("/api/v1/stats", headers=scoped).json()
    assert "allocator" not in stats and "http" not in stats  # no counters for a client token
    upload = http.post("/api/v1/codes/upload", headers=scoped,
                       data={"batch_name": "foreign", "client_id": OTHER_CLIENT},
                       files={"file": ("c.csv", b"code\nFOREIGN-1\n", "text/csv")})
    assert upload.status_code == 400 and OTHER_CLIENT in upload.json()["message"]
    with psycopg.connect(served_dsn) as conn:
        expired, issued_theirs = conn.execute(
            "SELECT b.expired, (SELECT count(*) FROM ango.issues i WHERE i.batch_key = b.key) "
            "FROM ango.batches b WHERE b.id = %s", (theirs,)).fetchone()
        foreign = conn.execute("SELECT count(*) FROM ango.codes WHERE code = 'FOREIGN-1'"
                               ).fetchone()[0]
    assert (expired, issued_theirs, foreign) == (False, 0, 0)

    with connect(served_dsn, autocommit=True) as conn:
        revoke_token(conn, name)
    deadline = time.monotonic() + 10
    while http.get("/api/v1/batches", headers=scoped).status_code != 401:
        assert time.monotonic() < deadline
        time.sleep(0.2)
