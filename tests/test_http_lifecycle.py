"""Issue 14's operations over the HTTP API: look-ups, customer codes, rules,
schedules, deletion, export and top-up, against an `ango serve` subprocess with
httpx (the server and helpers of tests/test_http_api.py)."""
# ruff: noqa: F811 - the fixtures imported from test_http_api are test parameters here

from __future__ import annotations

import io
import json
import socket
import time
import uuid
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import httpx
import psutil
from ango.server.http_api import HttpApi, HttpLimits

from ango.importer import import_codes
from tests.hostile import module_dsn  # noqa: F401 (a fixture)
from tests.servers import CLIENT_ID, TOKEN, new_batch
from tests.test_http_api import (  # noqa: F401 (fixtures)
    AUTH,
    JSON_TYPE,
    OTHER_CLIENT,
    client_token,
    error_of,
    http,
    http_in_thread,
    redeem,
    serve,
    served_dsn,
)


def batch_of(http: httpx.Client, batch: str) -> dict:
    """The batch as the admin sees it (rules, schedule, expiry, counts)."""
    response = http.get(f"/api/v1/batches/{batch}", headers=AUTH)
    assert response.status_code == 200, response.text
    return response.json()


def put(http: httpx.Client, path: str, body, headers: dict | None = None) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body)
    return http.put(path, content=content, headers={**JSON_TYPE, **(headers or AUTH)})


def expire(http: httpx.Client, batch: str) -> None:
    assert http.post(f"/api/v1/batches/{batch}/expire", headers=AUTH).status_code == 200


def in_an_hour() -> str:
    return (datetime.now(UTC) + timedelta(hours=1)).isoformat()


def scheduled_batch(dsn: str, count: int, starts_at: str | None = None) -> str:
    prefix = uuid.uuid4().hex[:8]
    body = "code\n" + "".join(f"{prefix}-{i:06d}\n" for i in range(count))
    return str(import_codes(dsn, io.BytesIO(body.encode()), CLIENT_ID, f"s {prefix}",
                            starts_at=starts_at).batch_id)


# --- rules ----------------------------------------------------------------------------


def test_put_rules_replaces_them_and_the_next_claim_is_judged_by_them(http, served_dsn):
    batch = new_batch(served_dsn, 5)
    assert redeem(http, batch, "ann").status_code == 200
    response = put(http, f"/api/v1/batches/{batch}/rules", {"rules": {"maxpercustomer": 1}})
    assert response.status_code == 200, response.text
    assert response.json() == {"batch_id": batch, "rules": {"maxpercustomer": 1}}
    refused = redeem(http, batch, "ann")
    assert (refused.status_code, error_of(refused)) == (403, "rule_violation")
    assert redeem(http, batch, "bea").status_code == 200
    cleared = put(http, f"/api/v1/batches/{batch}/rules", {"rules": None})
    assert cleared.json() == {"batch_id": batch, "rules": None}
    assert batch_of(http, batch)["rules"] is None


def test_put_rules_bad_input_is_a_typed_error_and_changes_nothing(http, served_dsn):
    batch = new_batch(served_dsn, 3, {"maxpercustomer": 2})
    before = batch_of(http, batch)
    path = f"/api/v1/batches/{batch}/rules"
    cases = [
        (put(http, path, b"{nope"), 400, "malformed_json"),
        (put(http, path, {}), 400, "invalid_input"),
        (put(http, path, {"rules": '{"maxpercustomer": 1}'}), 400, "invalid_input"),
        (put(http, path, {"rules": {"maxpercustomer": 0}}), 400, "invalid_input"),
        (put(http, path, {"rules": {"maxpercustomer": 1}, "extra": 1}), 400, "invalid_input"),
        (put(http, path, b"rules=1", {**AUTH, "Content-Type": "text/plain"}), 415,
         "unsupported_media_type"),
        (put(http, "/api/v1/batches/nope/rules", {"rules": None}), 400, "invalid_input"),
        (put(http, f"/api/v1/batches/{uuid.uuid4()}/rules", {"rules": None}), 404,
         "batch_not_found"),
    ]
    for response, status, code in cases:
        assert (response.status_code, error_of(response)) == (status, code), response.text
    assert batch_of(http, batch) == before
    expire(http, batch)
    ended = put(http, path, {"rules": None})
    assert (ended.status_code, error_of(ended)) == (410, "batch_expired")
    assert batch_of(http, batch)["rules"] == {"maxpercustomer": 2}


# --- schedules --------------------------------------------------------------------------


def test_a_claim_before_the_start_is_409_batch_not_started_until_the_start_is_cleared(
        http, served_dsn):
    batch = scheduled_batch(served_dsn, 3, starts_at=in_an_hour())
    early = redeem(http, batch, "cid")
    assert (early.status_code, error_of(early)) == (409, "batch_not_started")
    response = put(http, f"/api/v1/batches/{batch}/schedule", {"starts_at": None})
    assert response.status_code == 200, response.text
    assert response.json() == {"batch_id": batch, "starts_at": None, "expires_at": None}
    assert redeem(http, batch, "cid").status_code == 200


def test_put_schedule_keeps_a_field_left_out_and_clears_a_null_one(http, served_dsn):
    batch = new_batch(served_dsn, 3)
    end = in_an_hour()
    path = f"/api/v1/batches/{batch}/schedule"
    set_end = put(http, path, {"expires_at": end}).json()
    assert set_end["starts_at"] is None
    assert datetime.fromisoformat(set_end["expires_at"]) == datetime.fromisoformat(end)
    assert put(http, path, {}).json() == set_end
    assert batch_of(http, batch)["expires_at"] is not None
    assert put(http, path, {"expires_at": None}).json()["expires_at"] is None


def test_put_schedule_bad_input_is_a_typed_error_and_changes_nothing(http, served_dsn):
    batch = scheduled_batch(served_dsn, 3, starts_at=in_an_hour())
    before = batch_of(http, batch)
    path = f"/api/v1/batches/{batch}/schedule"
    soon = datetime.now(UTC) + timedelta(minutes=5)
    cases = [
        (put(http, path, {"starts_at": (soon + timedelta(hours=2)).isoformat(),
                          "expires_at": soon.isoformat()}),
         400, "invalid_input", "must come after"),
        (put(http, path, {"expires_at": "2030-01-01T00:00:00"}), 400, "invalid_input", "time zone"),
        (put(http, path, {"expires_at": "tomorrow"}), 400, "invalid_input", "ISO 8601"),
        (put(http, path, {"expires_at": "2001-01-01T00:00:00Z"}), 400, "invalid_input",
         "in the future"),
        (put(http, path, {"ends_at": None}), 400, "invalid_input", "ends_at"),
        (put(http, path, {"expires_at": 5}), 400, "invalid_input", "expires_at"),
        (put(http, path, b"{"), 400, "malformed_json", "json"),
        (put(http, f"/api/v1/batches/{uuid.uuid4()}/schedule", {}), 404, "batch_not_found",
         "no batch"),
    ]
    for response, status, code, words in cases:
        assert (response.status_code, error_of(response)) == (status, code), response.text
        assert words in response.json()["message"], response.text
    assert batch_of(http, batch) == before
    expire(http, batch)
    ended = put(http, path, {"expires_at": None})
    assert (ended.status_code, error_of(ended)) == (410, "batch_expired")


# --- deletion ---------------------------------------------------------------------------


def test_delete_removes_an_expired_batchs_unissued_codes_and_keeps_its_issues(http, served_dsn):
    batch = new_batch(served_dsn, 4)
    code = redeem(http, batch, "dan").json()["code"]
    live = http.delete(f"/api/v1/batches/{batch}", headers=AUTH)
    assert (live.status_code, error_of(live)) == (400, "invalid_input")
    assert "expire it first" in live.json()["message"]
    assert batch_of(http, batch)["total"] == 4
    expire(http, batch)
    deleted = http.delete(f"/api/v1/batches/{batch}", headers=AUTH)
    assert deleted.status_code == 200, deleted.text
    assert deleted.json() == {"batch_id": batch, "purged": False, "codes_deleted": 3,
                              "issues_deleted": 0}
    assert http.get(f"/api/v1/codes/{code}", headers=AUTH).json()["status"] == "issued"
    typo = http.delete(f"/api/v1/batches/{batch}?purge=ture", headers=AUTH)
    assert (typo.status_code, error_of(typo)) == (400, "invalid_input")
    purged = http.delete(f"/api/v1/batches/{batch}?purge=true", headers=AUTH)
    assert purged.json() == {"batch_id": batch, "purged": True, "codes_deleted": 1,
                             "issues_deleted": 1}
    assert http.get(f"/api/v1/codes/{code}", headers=AUTH).json()["status"] == "never_imported"
    gone = http.delete(f"/api/v1/batches/{batch}", headers=AUTH)
    assert (gone.status_code, error_of(gone)) == (404, "batch_not_found")
    bad = http.delete("/api/v1/batches/nope", headers=AUTH)
    assert (bad.status_code, error_of(bad)) == (400, "invalid_input")


# --- look-ups ---------------------------------------------------------------------------


def test_lookup_says_who_has_a_code_or_that_it_is_available_or_never_imported(
        http, served_dsn):
    batch = new_batch(served_dsn, 2)
    code = redeem(http, batch, "eve", requestid="order-9").json()["code"]
    found = http.get(f"/api/v1/codes/{code}", headers=AUTH)
    assert found.status_code == 200, found.text
    info = found.json()
    assert (info["status"], info["batch_id"], info["customer_id"], info["request_id"],
            info["client_id"]) == ("issued", batch, "eve", "order-9", CLIENT_ID)
    assert info["issued_at"]
    other = f"{code[:-1]}{1 - int(code[-1])}"  # the batch's other code (…-000000, …-000001)
    assert http.get(f"/api/v1/codes/{other}", headers=AUTH).json()["status"] == "available"
    never = http.get("/api/v1/codes/NO%2FSUCH%20CODE", headers=AUTH).json()
    assert never == {"code": "NO/SUCH CODE", "status": "never_imported", "batch_id": None,
                     "batch_name": None, "client_id": None, "customer_id": None,
                     "issued_at": None, "request_id": None}
    control = http.get("/api/v1/codes/A%01B", headers=AUTH)
    assert (control.status_code, error_of(control)) == (400, "invalid_input")
    assert "control character" in control.json()["message"]


def test_customer_codes_lists_a_customers_codes_newest_first(http, served_dsn):
    first, second = new_batch(served_dsn, 3), new_batch(served_dsn, 3)
    customer = f"fay/{uuid.uuid4().hex[:6]}"  # a "/" travels percent-encoded
    codes = [redeem(http, batch, customer).json()["code"] for batch in (first, second, first)]
    path = f"/api/v1/customers/{customer.replace('/', '%2F')}/codes"
    listed = http.get(path, headers=AUTH)
    assert listed.status_code == 200, listed.text
    assert [row["code"] for row in listed.json()] == codes[::-1]
    assert set(listed.json()[0]) == {"code", "batch_id", "batch_name", "issued_at",
                                     "request_id"}
    only = http.get(path, params={"batch_id": first}, headers=AUTH).json()
    assert [row["code"] for row in only] == [codes[2], codes[0]]
    assert len(http.get(path, params={"limit": 1}, headers=AUTH).json()) == 1
    assert http.get("/api/v1/customers/nobody-at-all/codes", headers=AUTH).json() == []
    not_utf8 = http.get("/api/v1/customers/a%FFb/codes", headers=AUTH)
    assert (not_utf8.status_code, error_of(not_utf8)) == (400, "invalid_input")
    assert "customer id" in not_utf8.json()["message"]
    for params, words in (({"limit": 0}, "limit"), ({"limit": "ten"}, "limit"),
                          ({"limit": 10_001}, "limit"), ({"batch_id": "x"}, "batch id")):
        bad = http.get(path, params=params, headers=AUTH)
        assert (bad.status_code, error_of(bad)) == (400, "invalid_input"), params
        assert words in bad.json()["message"]


# --- client tokens ------------------------------------------------------------------------


def test_a_client_token_can_neither_look_up_nor_change_any_batch_and_nothing_changes(
        http, served_dsn):
    from tests.helpers import make_batch

    mine = new_batch(served_dsn, 3)
    theirs = make_batch(served_dsn, 3, client=OTHER_CLIENT)
    code = redeem(http, mine, "gil").json()["code"]
    _, scoped = client_token(http, served_dsn)
    for path in (f"/api/v1/codes/{code}", "/api/v1/customers/gil/codes"):
        refused = http.get(path, headers=scoped)
        assert (refused.status_code, error_of(refused)) == (403, "unauthorized"), path
    expire(http, theirs)  # deletable by the admin, not by a client token
    before = {batch: batch_of(http, batch) for batch in (mine, theirs)}
    for batch in (mine, theirs, str(uuid.uuid4())):
        for response in (
                put(http, f"/api/v1/batches/{batch}/rules", {"rules": {"maxpercustomer": 1}},
                    scoped),
                put(http, f"/api/v1/batches/{batch}/schedule", {"expires_at": in_an_hour()},
                    scoped),
                http.delete(f"/api/v1/batches/{batch}?purge=true", headers=scoped)):
            assert (response.status_code, error_of(response)) == (404, "batch_not_found")
            assert response.json()["message"] == f"no batch with id {batch}"
    assert {batch: batch_of(http, batch) for batch in (mine, theirs)} == before


# --- export ---------------------------------------------------------------------------


def test_export_streams_a_batchs_issued_and_available_codes_as_csv_or_json_lines(
        http, served_dsn):
    batch = new_batch(served_dsn, 4)
    codes = {redeem(http, batch, f"hal-{i}", requestid=f"r-{i}").json()["code"]: f"hal-{i}"
             for i in range(2)}
    path = f"/api/v1/batches/{batch}/export"
    issued_csv = http.get(path, params={"what": "issued"}, headers=AUTH)
    assert issued_csv.status_code == 200, issued_csv.text
    assert issued_csv.headers["content-type"].startswith("text/csv")
    assert "content-length" not in issued_csv.headers  # streamed (chunked)
    assert f'filename="{batch}-issued.csv"' in issued_csv.headers["content-disposition"]
    lines = issued_csv.text.splitlines()
    assert lines[0] == "code,customer_id,issued_at,request_id"
    assert {line.split(",")[0]: line.split(",")[1] for line in lines[1:]} == codes
    available = http.get(path, params={"what": "available", "format": "jsonl"}, headers=AUTH)
    assert available.headers["content-type"] == "application/x-ndjson"
    rows = [json.loads(line) for line in available.text.splitlines()]
    assert len(rows) == 2 and not {row["code"] for row in rows} & set(codes)


def test_export_errors_are_typed_before_the_first_byte(http, served_dsn):
    batch = new_batch(served_dsn, 2)
    path = f"/api/v1/batches/{batch}/export"
    for params, status, code, words in (
            ({}, 400, "invalid_input", "issued"),
            ({"what": "sold"}, 400, "invalid_input", "issued"),
            ({"what": "issued", "format": "xml"}, 400, "invalid_input", "format"),
    ):
        response = http.get(path, params=params, headers=AUTH)
        assert (response.status_code, error_of(response)) == (status, code), params
        assert words in response.json()["message"]
    unknown = http.get(f"/api/v1/batches/{uuid.uuid4()}/export?what=issued", headers=AUTH)
    assert (unknown.status_code, error_of(unknown)) == (404, "batch_not_found")
    bad = http.get("/api/v1/batches/nope/export?what=issued", headers=AUTH)
    assert (bad.status_code, error_of(bad)) == (400, "invalid_input")


def test_a_client_token_exports_its_own_batches_only(http, served_dsn):
    from tests.helpers import make_batch

    mine = new_batch(served_dsn, 2)
    theirs = make_batch(served_dsn, 2, client=OTHER_CLIENT)
    _, scoped = client_token(http, served_dsn)
    own = http.get(f"/api/v1/batches/{mine}/export?what=available", headers=scoped)
    assert own.status_code == 200 and len(own.text.splitlines()) == 3
    refused = http.get(f"/api/v1/batches/{theirs}/export?what=available", headers=scoped)
    assert (refused.status_code, error_of(refused)) == (404, "batch_not_found")
    assert refused.json()["message"] == f"no batch with id {theirs}"


def big_batch(dsn: str, rows: int, width: int) -> str:
    """A batch of ``rows`` codes ``width`` characters long, imported from a file stream."""
    prefix = uuid.uuid4().hex[:8]
    pad = "x" * (width - 18)
    body = "code\n" + "".join(f"{prefix}-{i:09d}{pad}\n" for i in range(rows))
    return str(import_codes(dsn, io.BytesIO(body.encode()), CLIENT_ID, f"big {prefix}").batch_id)


def test_export_of_a_big_batch_streams_with_the_server_memory_bounded_and_a_client_that_leaves_frees_its_slot(  # noqa: E501
        http, serve, served_dsn):
    rows, width = 250_000, 240  # about 60 MB of CSV
    batch = big_batch(served_dsn, rows, width)
    url = f"http://127.0.0.1:{serve.http_port}/api/v1/batches/{batch}/export?what=available"
    server = psutil.Process(serve.proc.pid)
    baseline = server.memory_info().rss
    peak = baseline
    size = lines = 0
    with httpx.stream("GET", url, headers=AUTH, timeout=60) as response:
        assert response.status_code == 200
        for i, chunk in enumerate(response.iter_bytes()):
            if i == 1:
                time.sleep(0.5)  # a slow reader: the export must wait, not buffer
            size += len(chunk)
            lines += chunk.count(b"\n")
            if i % 50 == 0:
                peak = max(peak, server.memory_info().rss)
    assert lines == rows + 1 and size > 60_000_000
    grown = peak - baseline
    assert grown < 24 * 1024 * 1024, grown

    # Clients that leave after the first bytes give their export's slot back
    # (at most 2 exports run at once; a third would be 503).
    for _ in range(3):
        with httpx.stream("GET", url, headers=AUTH, timeout=60) as response:
            assert response.status_code == 200, response.read()
            next(response.iter_bytes())
    deadline = time.monotonic() + 10
    while True:
        with httpx.stream("GET", url, headers=AUTH, timeout=60) as response:
            if response.status_code == 200:
                break
            assert response.status_code == 503 and time.monotonic() < deadline
        time.sleep(0.2)


# --- top-up and scheduled uploads ----------------------------------------------------------


def top_up(http: httpx.Client, batch: str, data: bytes, headers: dict | None = None,
           name: str = "more.csv") -> httpx.Response:
    return http.post(f"/api/v1/batches/{batch}/codes", headers=headers or AUTH,
                     files={"file": (name, data, "text/csv")})


def codes_csv(*codes: str) -> bytes:
    return ("code\n" + "".join(f"{code}\n" for code in codes)).encode()


def test_top_up_adds_codes_and_an_exhausted_batch_is_claimable_again(http, served_dsn):
    batch = new_batch(served_dsn, 1)
    assert redeem(http, batch, "ivy").status_code == 200
    empty = redeem(http, batch, "jon")
    assert (empty.status_code, error_of(empty)) == (404, "batch_exhausted")
    prefix = uuid.uuid4().hex[:8]
    added = top_up(http, batch, codes_csv(f"{prefix}-a", f"{prefix}-b"))
    assert added.status_code == 200, added.text
    assert added.json() == {"batch_id": batch, "imported": 2}
    assert redeem(http, batch, "jon").json()["code"] in {f"{prefix}-a", f"{prefix}-b"}
    assert batch_of(http, batch)["total"] == 3
    with_client = f"code,client_id\n{prefix}-c,{CLIENT_ID}\n".encode()
    assert top_up(http, batch, with_client).json()["imported"] == 1


def test_top_up_bad_input_is_a_typed_error_and_adds_nothing(http, served_dsn):
    batch = new_batch(served_dsn, 2)
    before = batch_of(http, batch)
    prefix = uuid.uuid4().hex[:8]
    taken = redeem(http, new_batch(served_dsn, 1), "kai").json()["code"]
    cases = [
        (top_up(http, batch, codes_csv(f"{prefix}-a", taken)), 400, "import_failed", taken),
        (top_up(http, batch, f"code,client_id\n{prefix}-b,{OTHER_CLIENT}\n".encode()), 400,
         "import_failed", "line 2"),
        (top_up(http, batch, codes_csv(f"{prefix}-c"), name="more.txt"), 400, "invalid_input",
         "CSV"),
        (http.post(f"/api/v1/batches/{batch}/codes", headers=AUTH,
                   files={"other": ("x.csv", b"code\nx\n", "text/csv")}), 400, "invalid_input",
         "No CSV file"),
        (http.post(f"/api/v1/batches/{batch}/codes", headers={**AUTH, "Content-Type": "text/csv"},
                   content=b"code\nx\n"), 415, "unsupported_media_type", "multipart"),
        (top_up(http, str(uuid.uuid4()), codes_csv(f"{prefix}-d")), 404, "batch_not_found",
         "no batch"),
        (top_up(http, "nope", codes_csv(f"{prefix}-e")), 400, "invalid_input", "batch id"),
    ]
    for response, status, code, words in cases:
        assert (response.status_code, error_of(response)) == (status, code), response.text
        assert words in response.json()["message"], response.text
    assert batch_of(http, batch) == before
    expire(http, batch)
    ended = top_up(http, batch, codes_csv(f"{prefix}-f"))
    assert (ended.status_code, error_of(ended)) == (410, "batch_expired")
    lookup = http.get(f"/api/v1/codes/{prefix}-a", headers=AUTH).json()
    assert lookup["status"] == "never_imported"


def test_a_client_token_cannot_top_up_even_its_own_batch(http, served_dsn):
    from tests.helpers import make_batch

    mine, theirs = new_batch(served_dsn, 1), make_batch(served_dsn, 1, client=OTHER_CLIENT)
    _, scoped = client_token(http, served_dsn)
    code = f"{uuid.uuid4().hex[:8]}-z"
    for batch in (mine, theirs):
        refused = top_up(http, batch, codes_csv(code), headers=scoped)
        assert (refused.status_code, error_of(refused)) == (404, "batch_not_found")
        assert refused.json()["message"] == f"no batch with id {batch}"
        assert batch_of(http, batch)["total"] == 1
    assert http.get(f"/api/v1/codes/{code}", headers=AUTH).json()["status"] == "never_imported"


def test_upload_takes_starts_at_and_expires_at(http, served_dsn):
    data = codes_csv(*(f"{uuid.uuid4().hex[:8]}-{i}" for i in range(2)))
    start, end = in_an_hour(), (datetime.now(UTC) + timedelta(days=2)).isoformat()
    response = http.post("/api/v1/codes/upload", headers=AUTH,
                         data={"batch_name": "later", "client_id": CLIENT_ID,
                               "starts_at": start, "expires_at": end},
                         files={"file": ("c.csv", data, "text/csv")})
    assert response.status_code == 200, response.text
    batch = response.json()["batch_id"]
    row = batch_of(http, batch)
    assert datetime.fromisoformat(row["starts_at"]) == datetime.fromisoformat(start)
    assert datetime.fromisoformat(row["expires_at"]) == datetime.fromisoformat(end)
    early = redeem(http, batch, "lea")
    assert (early.status_code, error_of(early)) == (409, "batch_not_started")
    backwards = http.post("/api/v1/codes/upload", headers=AUTH,
                          data={"batch_name": "backwards", "client_id": CLIENT_ID,
                                "starts_at": end, "expires_at": start},
                          files={"file": ("c.csv", codes_csv("never-1"), "text/csv")})
    assert (backwards.status_code, error_of(backwards)) == (400, "invalid_input")
    assert "must come after" in backwards.json()["message"]


def test_an_upload_field_after_a_streaming_file_refuses_the_upload_whole(http):
    boundary = "b0undary"
    code = f"{uuid.uuid4().hex[:8]}-late"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"batch_name\"\r\n\r\n"
            f"late schedule\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"client_id\""
            f"\r\n\r\n{CLIENT_ID}\r\n--{boundary}\r\nContent-Disposition: form-data; "
            f"name=\"file\"; filename=\"c.csv\"\r\nContent-Type: text/csv\r\n\r\ncode\n{code}\n\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"starts_at\"\r\n\r\n"
            f"{in_an_hour()}\r\n--{boundary}--\r\n").encode()
    response = http.post("/api/v1/codes/upload", content=body, headers={
        **AUTH, "Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert (response.status_code, error_of(response)) == (400, "invalid_input"), response.text
    assert "'starts_at' comes after the file" in response.json()["message"]
    assert http.get(f"/api/v1/codes/{code}", headers=AUTH).json()["status"] == "never_imported"


def test_an_export_to_a_client_that_reads_nothing_is_stopped_and_frees_its_slot(served_dsn):
    batch = big_batch(served_dsn, 150_000, 240)  # 36 MB: far beyond the sockets' buffers
    limits = HttpLimits(send_timeout=1.0, max_exports=1)
    alloc = SimpleNamespace(dsn=served_dsn)  # an admin's export needs only the database
    with http_in_thread(lambda: HttpApi(alloc, token=TOKEN, limits=limits)) as port:
        path = f"/api/v1/batches/{batch}/export?what=available"
        url = f"http://127.0.0.1:{port}{path}"
        stalled = socket.socket()
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.connect(("127.0.0.1", port))
        stalled.sendall(f"GET {path} HTTP/1.1\r\nHost: ango\r\n"
                        f"Authorization: Bearer {TOKEN}\r\n\r\n".encode())
        try:
            statuses = []
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                with httpx.stream("GET", url, headers=AUTH, timeout=30) as response:
                    statuses.append(response.status_code)
                    if response.status_code == 200:
                        break
                    response.read()
                    assert (response.status_code, error_of(response)) == (503, "unavailable")
                time.sleep(0.2)
            # Refused while the stalled client held the only slot, served once it was stopped.
            assert statuses[0] == 503 and statuses[-1] == 200, statuses
        finally:
            stalled.close()
