"""Client-scoped tokens: made, listed and revoked by `ango token`, stored hashed, and
reaching one client's batches only, through every operation of the protocol."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import uuid

import psycopg
import pytest

import ango
from ango import database
from ango.importer import import_codes
from ango.protocol import (
    BatchList,
    Claim,
    Code,
    Error,
    Expire,
    Expired,
    GetStats,
    ListBatches,
    Ping,
    Pong,
    Stats,
    Welcome,
)
from ango.tokens import create_token, revoke_token
from tests.servers import ANGO, TOKEN, InProcessServer, closed_by_peer, connect, hello, recv, send

ALICE = "a11ce000-0000-4000-8000-000000000001"
BOB = "b0b00000-0000-4000-8000-000000000002"
NOWHERE = "00000000-0000-4000-8000-00000000dead"


def batch_of(dsn: str, client_id: str, count: int = 20) -> str:
    prefix = uuid.uuid4().hex[:8]
    body = "code\n" + "".join(f"{prefix}-{i:04d}\n" for i in range(count))
    return str(import_codes(dsn, io.BytesIO(body.encode()), client_id, prefix).batch_id)


def token_for(dsn: str, client_id: str, name: str | None = None) -> str:
    with database.connect(dsn, autocommit=True) as conn:
        return create_token(conn, client_id, name)[0]


def ask(sock, msg):
    send(sock, msg)
    return recv(sock)


def ango_cli(dsn: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*ANGO, *args, "--dsn", dsn], capture_output=True, text=True,
                          timeout=60)


def test_a_client_token_is_stored_only_as_its_sha256(dsn):
    made = ango_cli(dsn, "token", "create", "--client", ALICE, "--name", "shop-a", "--json")
    assert made.returncode == 0, made.stderr
    secret = json.loads(made.stdout)["token"]
    assert len(secret) > 40
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT name, client_id::text, hash FROM ango.tokens").fetchall()
        dump = conn.execute("SELECT row_to_json(t)::text FROM ango.tokens t").fetchone()[0]
    assert rows == [("shop-a", ALICE, hashlib.sha256(secret.encode()).digest())]
    assert secret not in dump


def test_ango_token_create_list_and_revoke(dsn):
    made = ango_cli(dsn, "token", "create", "--client", ALICE, "--name", "shop-a")
    assert made.returncode == 0 and "shown only now" in made.stderr
    assert ango_cli(dsn, "token", "create", "--client", BOB).returncode == 0
    again = ango_cli(dsn, "token", "create", "--client", BOB, "--name", "shop-a")
    assert again.returncode == 1 and "shop-a" in again.stderr and "Traceback" not in again.stderr
    listed = json.loads(ango_cli(dsn, "token", "list", "--json").stdout)
    assert [(t["name"], t["client_id"], t["revoked_at"]) for t in listed][0] == \
        ("shop-a", ALICE, None)
    assert len(listed) == 2 and made.stdout.strip() not in json.dumps(listed)
    assert ango_cli(dsn, "token", "revoke", "shop-a").returncode == 0
    listed = json.loads(ango_cli(dsn, "token", "list", "--json").stdout)
    assert listed[0]["revoked_at"] is not None
    missing = ango_cli(dsn, "token", "revoke", "shop-a")
    assert missing.returncode == 1 and "no live token named 'shop-a'" in missing.stderr
    bad = ango_cli(dsn, "token", "create", "--client", "not-a-uuid")
    assert bad.returncode == 1 and "client id" in bad.stderr and "Traceback" not in bad.stderr


def test_a_client_token_reaches_only_its_clients_batches_through_every_operation(dsn):
    mine, theirs = batch_of(dsn, ALICE), batch_of(dsn, BOB)
    secret = token_for(dsn, ALICE)
    with InProcessServer(lambda: ango.Allocator(dsn, shards=1)) as srv, \
            connect(srv.port, timeout=60) as sock:
        assert type(hello(sock, secret)) is Welcome
        assert type(ask(sock, Claim(1, mine, "ann", None, "r1"))) is Code
        assert type(ask(sock, Claim(2, mine, "ann", ALICE.upper(), "r2"))) is Code

        def not_found(request_id: int, batch: str, answer: Error) -> None:
            assert answer == Error(request_id, "batch_not_found",
                                   f"no batch {batch} for this client", False)

        # Another client's batch answers word for word as a batch that does not exist.
        for i, client in enumerate([None, BOB, ALICE, NOWHERE], start=10):
            not_found(i, theirs, ask(sock, Claim(i, theirs, "eve", client, f"e{i}")))
            not_found(i, NOWHERE, ask(sock, Claim(i, NOWHERE, "eve", client, f"n{i}")))
        gone = ask(sock, Expire(20, NOWHERE))
        assert type(gone) is Error and gone.code == "batch_not_found"
        assert ask(sock, Expire(20, theirs)) == Error(20, gone.code, gone.message.replace(
            NOWHERE, theirs), False)
        listing = ask(sock, ListBatches(21))
        assert type(listing) is BatchList and [b.id for b in listing.batches] == [mine]
        stats = ask(sock, GetStats(22))
        assert type(stats) is Stats and "claims_served" not in json.dumps(stats.stats)
        assert ask(sock, Expire(23, mine)) == Expired(23, True)
        # The admin token still reaches every batch.
        with connect(srv.port, timeout=60) as admin:
            assert type(hello(admin, TOKEN)) is Welcome
            assert {b.id for b in ask(admin, ListBatches(1)).batches} == {mine, theirs}
            assert type(ask(admin, Claim(2, theirs, "bob", None, "b1"))) is Code
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT customer_id FROM ango.issues ORDER BY 1").fetchall() == [
            ("ann",), ("ann",), ("bob",)]
        assert conn.execute("SELECT id::text FROM ango.batches WHERE expired").fetchall() == [
            (mine,)]


def test_a_revoked_token_stops_working_on_an_open_connection(dsn):
    mine = batch_of(dsn, ALICE)
    secret = token_for(dsn, ALICE, "to-revoke")
    with InProcessServer(lambda: ango.Allocator(dsn, shards=1)) as srv, \
            connect(srv.port, timeout=60) as sock:
        assert type(hello(sock, secret)) is Welcome
        assert type(ask(sock, Claim(1, mine, "ann"))) is Code
        with database.connect(dsn, autocommit=True) as conn:
            revoke_token(conn, "to-revoke")
        sock.settimeout(10)  # within seconds, not at the next reconnect
        answer = recv(sock)
        assert answer.id is None and answer.code == "unauthorized" and "revoked" in answer.message
        assert closed_by_peer(sock)
        with connect(srv.port) as again:
            assert hello(again, secret).code == "unauthorized"


def test_a_token_made_while_the_server_runs_works_at_once(dsn):
    with InProcessServer(lambda: ango.Allocator(dsn, shards=1)) as srv:
        secret = token_for(dsn, BOB)
        with connect(srv.port) as sock:
            assert type(hello(sock, secret)) is Welcome
            assert ask(sock, Ping(1)) == Pong(1)


@pytest.mark.parametrize("op", ["claim", "batches", "expire"])
def test_the_python_client_with_a_client_token_sees_only_its_client(dsn, op):
    mine, theirs = batch_of(dsn, ALICE), batch_of(dsn, BOB)
    secret = token_for(dsn, ALICE)
    with InProcessServer(lambda: ango.Allocator(dsn, shards=1)) as srv, \
            ango.Client(port=srv.port, token=secret, timeout=30) as client:
        if op == "claim":
            assert client.claim(mine, "ann")
            with pytest.raises(ango.BatchNotFound):
                client.claim(theirs, "ann")
        elif op == "batches":
            assert [b["id"] for b in client.batches()] == [mine]
        else:
            with pytest.raises(ango.BatchNotFound):
                client.expire(theirs)
            assert client.expire(mine) is True


def test_a_client_token_can_neither_look_up_nor_change_any_batch(dsn):
    from ango.protocol import CustomerCodes, DeleteBatch, Lookup, SetRules, SetSchedule

    mine, theirs = batch_of(dsn, ALICE), batch_of(dsn, BOB)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE ango.batches SET expired = true WHERE id = %s", (theirs,))
        before = conn.execute("SELECT id, rules, expired, starts_at, expires_at, total "
                              "FROM ango.batches ORDER BY id").fetchall()
    secret = token_for(dsn, ALICE)
    with InProcessServer(lambda: ango.Allocator(dsn, shards=1)) as srv, \
            connect(srv.port, timeout=60) as sock:
        assert type(hello(sock, secret)) is Welcome
        code = ask(sock, Claim(1, mine, "ann", None, "r1"))
        assert type(code) is Code
        for i, batch in enumerate([mine, theirs, NOWHERE], start=10):
            for j, request in enumerate([SetRules(0, batch, {"maxpercustomer": 1}),
                                         SetSchedule(0, batch, expires_at=None),
                                         DeleteBatch(0, batch, True)]):
                request.id = 10 * i + j
                assert ask(sock, request) == Error(
                    request.id, "batch_not_found", f"no batch with id {batch}", False)
        for request in (Lookup(30, code.code), CustomerCodes(31, "ann")):
            answer = ask(sock, request)
            assert type(answer) is Error and answer.code == "unauthorized"
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT id, rules, expired, starts_at, expires_at, total "
                            "FROM ango.batches ORDER BY id").fetchall() == before
        assert conn.execute("SELECT count(*) FROM ango.codes").fetchone()[0] == 40
