"""Bad input for every protocol field, through the real server and through ``ango.Allocator``
directly, and what tests/test_import.py does not already cover of import: each is refused
with a typed ``ango.errors`` error and the database is left unchanged.

On the wire a field of the wrong type or value is ``invalid_input`` for that request id and
the connection stays open; a frame over the limit (a 1 MiB string) or a request whose id
cannot be read is ``protocol`` and the connection closes; either way other connections and
later requests are unaffected.
"""

from __future__ import annotations

import io
import socket
from typing import Any

import msgspec
import pytest

import ango
from ango.batches import expire_batch
from ango.database import connect as db_connect
from ango.errors import BatchExpired, BatchNotFound, ImportFailed, InvalidInput
from ango.importer import import_codes
from ango.protocol import PROTOCOL_VERSION, Error, Expired, Pong, Welcome
from tests.hostile import module_dsn, raw, row_counts  # noqa: F401 (module_dsn: a fixture)
from tests.servers import CLIENT_ID, TOKEN, InProcessServer, connect, new_batch, recv

MIB = "x" * (1 << 20)
UNKNOWN = "00000000-0000-4000-8000-000000000000"
OTHER_CLIENT = "c0ffee00-0000-4000-8000-000000000002"
BAD_UUIDS = ["", "not-a-uuid", "c0ffee00-0000-4000-8000", "c0ffee00-0000-4000-8000-0000000000012",
             "g0ffee00-0000-4000-8000-000000000001", " " * 36, "\x00" * 36, "x" * 300]
BAD_TEXT = ["", "x" * 257, "a\x00b", "new\nline", "del\x7f"]  # customer ids
BAD_REQUEST_IDS = ["", "r" * 129, "tab\there", "\x1f"]
#: Values of the wrong MessagePack type for a str field (nil only where the field is required).
WRONG_TYPES = [0, -1, 2**64 - 1, 1.5, True, [], {}, b"bytes", ["a"], {"a": 1}]


@pytest.fixture(scope="module")
def env(module_dsn):  # noqa: F811
    """A server over a real allocator, a live batch with a rule, and an expired batch."""
    live = new_batch(module_dsn, 100, {"maxpercustomer": 2})
    gone = new_batch(module_dsn, 100)
    with db_connect(module_dsn, autocommit=True) as conn:
        expire_batch(conn, gone)
    with InProcessServer(lambda: ango.Allocator(module_dsn, shards=2)) as srv:
        yield srv, live, gone


def claim_msg(batch: str, **fields: Any) -> dict:
    msg = {"type": "claim", "id": 7, "batch_id": batch, "customer_id": "cust",
           "client_id": CLIENT_ID, "request_id": "req-1"}
    msg.update(fields)
    return msg


def on_the_wire(port: int, message: dict) -> tuple[Error | Any, bool]:
    """Send ``message`` after a good hello, then a ping: (the answer, connection still open)."""
    sock = connect(port)
    try:
        sock.sendall(raw({"type": "hello", "id": 0, "version": PROTOCOL_VERSION, "token": TOKEN}))
        assert type(recv(sock)) is Welcome
        try:
            sock.sendall(raw(message) + raw({"type": "ping", "id": 99}))
        except OSError:
            pass  # closed before we finished sending: the answer is still waiting
        first = recv(sock)
        try:
            second = recv(sock)  # answers come in any order: the ping's may be first
        except (ConnectionError, OSError):
            return first, False
        if first == Pong(99):
            first, second = second, first
        assert second == Pong(99)
        return first, True
    finally:
        sock.close()


def direct(srv: InProcessServer, call) -> BaseException | Any:
    """Run ``call(allocator)`` in the server's loop; the exception, or the result."""
    async def go():
        try:
            return await call(srv.allocator)
        except Exception as exc:  # noqa: BLE001 (what the test checks)
            return exc

    return srv.call(go)


def refused_on_the_wire(srv, message: dict, code: str, module_dsn: str) -> None:  # noqa: F811
    before = row_counts(module_dsn)
    answer, still_open = on_the_wire(srv.port, message)
    assert type(answer) is Error, answer
    assert answer.code == code, answer
    if code == "protocol":
        assert answer.id is None and not still_open
    else:
        assert answer.id == message["id"] and still_open and not answer.retryable
    assert answer.message
    assert row_counts(module_dsn) == before


def refused_directly(srv, call, cls: type, module_dsn: str) -> None:  # noqa: F811
    before = row_counts(module_dsn)
    outcome = direct(srv, call)
    assert type(outcome) is cls, outcome
    assert str(outcome)
    assert row_counts(module_dsn) == before


# --- claim ------------------------------------------------------------------------------

CLAIM_FIELD_CASES = (
    [("batch_id", v, "invalid_input") for v in BAD_UUIDS]
    + [("batch_id", v, "invalid_input") for v in [*WRONG_TYPES, None]]
    + [("batch_id", MIB, "protocol")]
    + [("customer_id", v, "invalid_input") for v in BAD_TEXT + [*WRONG_TYPES, None]]
    + [("customer_id", MIB, "protocol")]
    + [("client_id", v, "invalid_input") for v in BAD_UUIDS + WRONG_TYPES]
    + [("client_id", MIB, "protocol")]
    + [("request_id", v, "invalid_input") for v in BAD_REQUEST_IDS + WRONG_TYPES]
    + [("request_id", MIB, "protocol")]
    + [("id", v, "protocol") for v in ["7", 1.5, None, [], True]]
)


def case_id(case: tuple) -> str:
    field, value, _ = case
    text = repr(value)
    return f"{field}={text[:20]}{'...' if len(text) > 20 else ''}"


@pytest.mark.parametrize("case", CLAIM_FIELD_CASES, ids=case_id)
def test_a_bad_claim_field_on_the_wire_is_refused_and_changes_nothing(env, module_dsn, case):  # noqa: F811
    srv, live, _ = env
    field, value, code = case
    message = claim_msg(live)
    message[field] = value
    refused_on_the_wire(srv, message, code, module_dsn)


DIRECT_CASES = (
    [("batch_id", v) for v in [*BAD_UUIDS, MIB, 17, 1.5, None, [], b"bytes"]]
    + [("customer_id", v) for v in [*BAD_TEXT, MIB, 17, None, [], b"bytes"]]
    + [("client_id", v) for v in [*BAD_UUIDS, MIB, 17, 1.5, [], b"bytes"]]
    + [("request_id", v) for v in [*BAD_REQUEST_IDS, MIB, 17, [], b"bytes"]]
)


@pytest.mark.parametrize("case", DIRECT_CASES, ids=lambda c: case_id((*c, None)))
def test_a_bad_claim_argument_to_the_allocator_is_invalid_input_and_changes_nothing(
        env, module_dsn, case):  # noqa: F811
    srv, live, _ = env
    field, value = case
    args = {"batch_id": live, "customer_id": "cust", "client_id": CLIENT_ID, "request_id": "r"}
    args[field] = value
    refused_directly(srv, lambda a: a.claim(args["batch_id"], args["customer_id"],
                                            client_id=args["client_id"],
                                            request_id=args["request_id"]),
                     InvalidInput, module_dsn)


@pytest.mark.parametrize(("which", "code", "cls"), [
    ("unknown", "batch_not_found", BatchNotFound),
    ("wrong client", "batch_not_found", BatchNotFound),
    ("expired", "batch_expired", BatchExpired),
])
def test_unknown_batch_wrong_client_and_expired_batch_are_typed_and_change_nothing(
        env, module_dsn, which, code, cls):  # noqa: F811
    srv, live, gone = env
    batch, client = {"unknown": (UNKNOWN, CLIENT_ID), "wrong client": (live, OTHER_CLIENT),
                     "expired": (gone, CLIENT_ID)}[which]
    refused_on_the_wire(srv, claim_msg(batch, client_id=client), code, module_dsn)
    refused_directly(srv, lambda a: a.claim(batch, "cust", client_id=client, request_id="q"),
                     cls, module_dsn)


# --- hello, expire, batches, stats, ping -------------------------------------------------

HELLO_CASES = (
    [("version", v, "protocol") for v in [0, -1, 2, 2**64 - 1, "1", 1.0, None, []]]
    + [("token", v, "protocol") for v in [17, [], b"tok", MIB]]
    # A missing token is a matter of credentials, answered like a wrong one.
    + [("token", v, "unauthorized") for v in [None, "", "x" * 60_000, TOKEN + "\x00"]]
    + [("client", v, "protocol") for v in [17, [], {}, MIB]]
    + [("id", v, "protocol") for v in ["0", 1.5, [], MIB]]
)


@pytest.mark.parametrize("case", HELLO_CASES, ids=case_id)
def test_a_bad_hello_field_is_refused_and_the_connection_closed(env, module_dsn, case):  # noqa: F811
    srv, live, _ = env
    field, value, code = case
    hello = {"type": "hello", "id": 0, "version": PROTOCOL_VERSION, "token": TOKEN, "client": "t"}
    hello[field] = value
    before = row_counts(module_dsn)
    with connect(srv.port) as sock:
        try:
            sock.sendall(raw(hello) + raw(claim_msg(live)))
        except OSError:
            pass
        answer = recv(sock)
        assert type(answer) is Error and answer.id is None and answer.code == code, answer
        with pytest.raises((ConnectionError, OSError)):
            recv(sock)
    assert row_counts(module_dsn) == before


EXPIRE_CASES = ([("batch_id", v, "invalid_input") for v in [*BAD_UUIDS, *WRONG_TYPES, None]]
                + [("batch_id", MIB, "protocol"), ("batch_id", UNKNOWN, "batch_not_found")]
                + [("id", v, "protocol") for v in ["7", 1.5, None]])


@pytest.mark.parametrize("case", EXPIRE_CASES, ids=case_id)
def test_a_bad_expire_is_refused_and_changes_nothing(env, module_dsn, case):  # noqa: F811
    srv, live, _ = env
    field, value, code = case
    message = {"type": "expire", "id": 8, "batch_id": live}
    message[field] = value
    refused_on_the_wire(srv, message, code, module_dsn)
    assert not [b for b in srv.call(srv.allocator.batches) if b["id"] == live][0]["expired"]


@pytest.mark.parametrize("value", [*BAD_UUIDS, MIB, 17, None, b"x"], ids=repr)
def test_a_bad_batch_id_to_allocator_expire_is_invalid_input(env, module_dsn, value):  # noqa: F811
    srv, _, _ = env
    refused_directly(srv, lambda a: a.expire(value), InvalidInput, module_dsn)


def test_expire_of_an_unknown_batch_and_again_of_an_expired_one(env, module_dsn):  # noqa: F811
    srv, _, gone = env
    refused_directly(srv, lambda a: a.expire(UNKNOWN), BatchNotFound, module_dsn)
    before = row_counts(module_dsn)
    answer, still_open = on_the_wire(srv.port, {"type": "expire", "id": 3, "batch_id": gone})
    assert answer == Expired(3, False) and still_open
    assert row_counts(module_dsn) == before


@pytest.mark.parametrize("kind", ["batches", "stats", "ping"])
@pytest.mark.parametrize("bad_id", ["1", 1.5, None, [], MIB])
def test_requests_without_fields_refuse_a_bad_id_and_close(env, module_dsn, kind, bad_id):  # noqa: F811
    srv, _, _ = env
    refused_on_the_wire(srv, {"type": kind, "id": bad_id}, "protocol", module_dsn)


# (A second hello is a protocol error that closes: tests/test_server.py.)
@pytest.mark.parametrize("kind", ["batches", "stats", "ping", "claim", "expire"])
@pytest.mark.parametrize("request_id", [-1, -2**63, 0, 2**64 - 1])
def test_negative_and_huge_request_ids_are_echoed(env, module_dsn, kind, request_id):  # noqa: F811
    srv, live, _ = env
    message = {"type": kind, "id": request_id}
    if kind == "claim":
        message = claim_msg(UNKNOWN, id=request_id)
    elif kind == "expire":
        message = {"type": "expire", "id": request_id, "batch_id": UNKNOWN}
    before = row_counts(module_dsn)
    answer, still_open = on_the_wire(srv.port, message)
    assert answer.id == request_id and still_open
    assert row_counts(module_dsn) == before


def test_a_pipeline_of_bad_claims_between_good_ones_answers_each_by_id(env, module_dsn):  # noqa: F811
    srv, live, _ = env
    before = row_counts(module_dsn)
    bad = [claim_msg(live, id=i, customer_id=v) for i, v in enumerate(BAD_TEXT, start=1)]
    good = [claim_msg(live, id=100 + i, customer_id=f"pipe-{i}", request_id=f"pipe-{i}")
            for i in range(3)]
    mixed = [bad[0], good[0], bad[1], bad[2], good[1], bad[3], good[2], bad[4]]
    with connect(srv.port) as sock:
        sock.sendall(raw({"type": "hello", "id": 0, "version": 1, "token": TOKEN})
                     + b"".join(raw(m) for m in mixed))
        answers = {a.id: a for a in (recv(sock) for _ in range(1 + len(bad) + len(good)))}
        sock.shutdown(socket.SHUT_WR)
    assert all(answers[i].code == "invalid_input" for i in range(1, len(bad) + 1))
    assert all(type(answers[100 + i]).__name__ == "Code" for i in range(3))
    after = row_counts(module_dsn)
    assert after["ango.issues"] == before["ango.issues"] + 3


# --- import: what tests/test_import.py does not cover ---------------------------------------


def import_snapshot(dsn: str) -> tuple:
    with db_connect(dsn) as conn:
        return tuple(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in
                     ("ango.batches", "ango.codes", "ango.clients", "ango.lease_cursors"))


@pytest.mark.parametrize(("client", "name", "rules"), [
    pytest.param(None, "n", None, id="client-None"),
    pytest.param(b"c0ffee00-0000-4000-8000-000000000001", "n", None, id="client-bytes"),
    pytest.param(MIB, "n", None, id="client-1MiB"),
    pytest.param("\x00" * 36, "n", None, id="client-NULs"),
    pytest.param(CLIENT_ID, MIB, None, id="name-1MiB"),
    pytest.param(CLIENT_ID, None, None, id="name-None"),
    pytest.param(CLIENT_ID, 17, None, id="name-int"),
    pytest.param(CLIENT_ID, b"name", None, id="name-bytes"),
    pytest.param(CLIENT_ID, "n", MIB, id="rules-1MiB-text"),
    pytest.param(CLIENT_ID, "n", '{"maxpercustomer": ' + "9" * 60 + "}", id="rules-huge-int"),
    pytest.param(CLIENT_ID, "n", '{"maxpercustomer": NaN}', id="rules-NaN"),
    pytest.param(CLIENT_ID, "n", '{"maxpercustomer": 1e400}', id="rules-Infinity"),
    pytest.param(CLIENT_ID, "n", {"maxpercustomer": 2**70}, id="rules-dict-huge"),
    pytest.param(CLIENT_ID, "n", {1: 2}, id="rules-dict-int-key"),
    pytest.param(CLIENT_ID, "n", [("maxpercustomer", 2)], id="rules-list"),
    pytest.param(CLIENT_ID, "n", 2, id="rules-int"),
    pytest.param(CLIENT_ID, "n", b"{}", id="rules-bytes"),
])
def test_import_refuses_bad_arguments_with_a_typed_error_and_changes_nothing(
        module_dsn, client, name, rules):  # noqa: F811
    before = import_snapshot(module_dsn)
    with pytest.raises(InvalidInput):
        import_codes(module_dsn, io.BytesIO(b"code\nQ1\n"), client, name, rules)
    assert import_snapshot(module_dsn) == before


@pytest.mark.parametrize("rules", [
    pytest.param("[" * 100_000, id="nested-100k-deep"),
    pytest.param('{"maxpercustomer": 1' + "0" * 5000 + "}", id="5000-digit-number"),
])
def test_import_refuses_pathological_rules_json_with_invalid_input(module_dsn, rules):  # noqa: F811
    before = import_snapshot(module_dsn)
    with pytest.raises(InvalidInput):
        import_codes(module_dsn, io.BytesIO(b"code\nQ1\n"), CLIENT_ID, "n", rules)
    assert import_snapshot(module_dsn) == before


@pytest.mark.parametrize("content", [
    pytest.param(b"code\n" + b"x" * (1 << 20) + b"\n", id="1MiB-code"),
    pytest.param(b"\x00\x00\x00\x00\n", id="NUL-bytes"),
    pytest.param(b"code\n\xff\xfe\n", id="not-utf8"),
    pytest.param("client_id,code\n" + "\n".join(f"{UNKNOWN},X{i}" for i in range(3)),
                 id="another-client's-rows"),
])
def test_import_refuses_bad_files_with_import_failed_and_changes_nothing(module_dsn, content):  # noqa: F811
    before = import_snapshot(module_dsn)
    data = content if isinstance(content, bytes) else content.encode()
    with pytest.raises(ImportFailed):
        import_codes(module_dsn, io.BytesIO(data), CLIENT_ID, "n")
    assert import_snapshot(module_dsn) == before


def test_a_rules_map_of_the_wrong_shape_never_reaches_the_wire(env):
    """Batches come back with the rules they were imported with, as a map (or nil)."""
    srv, live, _ = env
    with ango.Client(port=srv.port, token=TOKEN) as client:
        rows = {b["id"]: b for b in client.batches()}
    assert rows[live]["rules"] == {"maxpercustomer": 2}
    assert msgspec.json.decode(msgspec.json.encode(rows[live]["rules"])) == {"maxpercustomer": 2}
