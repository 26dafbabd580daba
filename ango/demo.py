"""`ango demo`: Ango's main job end to end, on whatever database is configured.

Imports a fresh batch with a rule, starts `ango serve` as a real process,
claims codes over TCP with the client library (including a refused claim and
a retried one), prints the counts, and stops the server.
"""

from __future__ import annotations

import io
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import IO

from ango import database
from ango.batches import list_batches
from ango.client import Client
from ango.errors import AngoError, Unavailable
from ango.importer import import_codes

DEMO_CLIENT = "c0ffee00-0000-4000-8000-000000000001"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_server(server: subprocess.Popen, port: int, log: IO[bytes],
                     seconds: float = 60.0) -> None:
    """Until the server accepts connections; Unavailable with its output if it exits first."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
            return
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                said = log.read().decode(errors="replace").strip()[-2000:]
                raise Unavailable(f"the demo server did not start: {said}") from None
            time.sleep(0.2)


def run_demo(dsn: str | None = None, data_dir: str | None = None, *, shards: int | None = None,
             codes: int = 1000, echo: Callable[[str], None] = print) -> dict:
    """Run the demo; return what was claimed. Raises AngoError if a step fails."""
    found = database.ready_dsn(dsn, data_dir)
    prefix = secrets.token_hex(3).upper()
    body = "code\n" + "".join(f"DEMO-{prefix}-{i:05d}\n" for i in range(codes))
    batch = import_codes(found, io.BytesIO(body.encode()), DEMO_CLIENT, "Demo sale",
                         {"maxpercustomer": 2})
    batch_id = str(batch.batch_id)
    echo(f"imported {batch.imported} codes as batch {batch_id} (rule: 2 per customer)")
    port = _free_port()
    token = secrets.token_urlsafe(24)
    # The demo speaks the binary protocol only: no HTTP port to collide with.
    command = [sys.executable, "-m", "ango", "serve", "--dsn", found, "--port", str(port),
               "--no-http"]
    if shards:
        command += ["--shards", str(shards)]
    log = tempfile.TemporaryFile()
    server = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                              env=dict(os.environ, ANGO_TOKEN=token))
    claimed: dict[str, list[str]] = {}
    try:
        _wait_for_server(server, port, log)
        with Client(port=port, token=token, timeout=30.0) as client:
            echo(f"serving on 127.0.0.1:{port}")
            for customer in ("alice", "alice", "alice", "bob"):
                try:
                    code = client.claim(batch_id, customer)
                    claimed.setdefault(customer, []).append(code)
                    echo(f"  {customer:6} -> {code}")
                except AngoError as exc:
                    echo(f"  {customer:6} -> refused ({exc.code}: {exc})")
            first = client.claim(batch_id, "carol", request_id="demo-order-1")
            again = client.claim(batch_id, "carol", request_id="demo-order-1")
            claimed["carol"] = [first]
            echo(f"  carol  -> {first}; retried with the same request id -> {again}")
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    with database.connect(found, autocommit=True) as conn:
        info = next(b for b in list_batches(conn) if b.id == batch_id)
    echo(f"batch {batch_id}: total {info.total}, issued {info.issued}, "
         f"available {info.available}")
    return {"batch_id": batch_id, "claimed": claimed, "issued": info.issued,
            "pid": os.getpid()}
