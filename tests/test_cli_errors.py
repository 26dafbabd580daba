"""The installed `ango` command against databases and servers it cannot use.

Every command answers one line saying what failed and where, never a
traceback, and exits with the status of its kind (README "Exit status").
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from ango.cli import (
    EXIT_CONFIGURATION,
    EXIT_NOT_FOUND,
    EXIT_REFUSED,
    EXIT_UNAVAILABLE,
)
from tests.conftest import with_dbname
from tests.servers import TOKEN, InProcessServer, ServeProcess
from tests.test_database_errors import closed_port, refusing_connections, role

ANGO = str(Path(sys.executable).with_name("ango"))
CLIENT = "c0ffee00-0000-4000-8000-000000000001"
UNKNOWN = "00000000-0000-4000-8000-000000000000"


def ango(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("ANGO_DSN", "DATABASE_URL")}
    return subprocess.run([ANGO, *args], capture_output=True, text=True, timeout=timeout, env=env)


def assert_one_line_error(proc: subprocess.CompletedProcess, status: int, *expected: str) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == status, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, proc.stderr
    for text in expected:
        assert text in errors[0], errors[0]
    return errors[0]


def commands(tmp_path: Path) -> dict[str, list[str]]:
    codes = tmp_path / "codes.txt"
    codes.write_text("code\nA\n")
    return {
        "migrate": ["migrate"],
        "batches": ["batches"],
        "expire": ["expire", UNKNOWN],
        "import": ["import", str(codes), "--client", CLIENT, "--batch", "b"],
        "audit": ["audit"],
        "serve": ["serve", "--port", "0", "--db-wait", "0"],
        "demo": ["demo"],
    }


@pytest.mark.parametrize("command", ["migrate", "batches", "expire", "import", "audit", "serve",
                                     "demo"])
def test_every_command_says_in_one_line_that_a_closed_port_is_unavailable(command, tmp_path):
    port = closed_port()
    args = commands(tmp_path)[command]
    proc = ango(*args, "--dsn", f"postgresql://ango:s3cret@127.0.0.1:{port}/ango")
    line = assert_one_line_error(proc, EXIT_UNAVAILABLE, f"127.0.0.1:{port}", "Connection refused")
    assert "s3cret" not in proc.stderr + proc.stdout
    assert line.startswith("Error: PostgreSQL at")


def test_a_missing_database_exits_not_found(server_dsn):
    proc = ango("batches", "--dsn", with_dbname(server_dsn, "ango_no_such_db"))
    assert_one_line_error(proc, EXIT_NOT_FOUND, 'database "ango_no_such_db" does not exist')


def test_an_unknown_user_exits_refused(server_dsn):
    params = conninfo_to_dict(server_dsn)
    params["user"] = "ango_no_such_role"
    proc = ango("expire", UNKNOWN, "--dsn", make_conninfo(**params))
    assert_one_line_error(proc, EXIT_REFUSED, "ango_no_such_role")


def test_a_malformed_dsn_exits_configuration_without_the_password():
    proc = ango("migrate", "--dsn", "postgresql://ango:s3cret@db:notaport/ango")
    assert_one_line_error(proc, EXIT_CONFIGURATION, "malformed", "notaport")
    assert "s3cret" not in proc.stderr


def test_too_many_clients_exits_unavailable(server_dsn):
    with role(server_dsn, 0) as limited:
        proc = ango("audit", "--dsn", limited)
    assert_one_line_error(proc, EXIT_UNAVAILABLE, "too many connections")


def test_an_unknown_batch_exits_not_found(dsn):
    proc = ango("expire", UNKNOWN, "--dsn", dsn)
    assert_one_line_error(proc, EXIT_NOT_FOUND, UNKNOWN)


def test_claim_from_no_server_exits_unavailable():
    proc = ango("claim", UNKNOWN, "ann", "--port", str(closed_port()), "--token", TOKEN,
                "--timeout", "0.5")
    assert_one_line_error(proc, EXIT_UNAVAILABLE, "unavailable")


def test_claim_with_a_wrong_token_exits_refused():
    with InProcessServer() as served:
        proc = ango("claim", UNKNOWN, "ann", "--port", str(served.port), "--token",
                    "wrong-token-" + "y" * 20, "--timeout", "5")
    assert_one_line_error(proc, EXIT_REFUSED, "unauthorized")


def test_serve_gives_up_on_an_unreachable_database_after_db_wait_logging_each_attempt():
    port = closed_port()
    started = time.monotonic()
    proc = ango("serve", "--port", "0", "--token", TOKEN, "--db-wait", "1",
                "--dsn", f"postgresql://ango@127.0.0.1:{port}/ango")
    assert time.monotonic() - started < 30  # bounded: the wait, not a hang
    line = assert_one_line_error(proc, EXIT_UNAVAILABLE, f"127.0.0.1:{port}", "gave up after")
    assert "attempts in 1 s" in line
    attempts = [x for x in proc.stderr.splitlines() if "retrying in" in x]
    assert attempts and "attempt 1," in attempts[0]


def test_serve_waits_for_a_database_that_comes_back_within_db_wait(server_dsn, dsn):
    serve = ServeProcess("--dsn", dsn, "--shards", "1", "--db-wait", "5",
                         env={"ANGO_TOKEN": TOKEN})
    outcome: list[object] = []
    with refusing_connections(server_dsn, dsn):
        thread = threading.Thread(target=lambda: outcome.append(serve.start(timeout=60)))
        thread.start()
        deadline = time.monotonic() + 30
        while "attempt 1," not in serve.stderr and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "not currently accepting connections" in serve.stderr
    thread.join(60)
    try:
        assert outcome == [serve], serve.stderr
        assert "Traceback" not in serve.stderr
    finally:
        assert serve.stop() == 0


def test_an_unusable_data_directory_exits_configuration(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    proc = ango("batches", "--data-dir", str(blocker / "ango"))
    assert_one_line_error(proc, EXIT_CONFIGURATION, "cannot use", "as the data directory")
