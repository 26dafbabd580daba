"""Imports under concurrency and database trouble: an ImportFailed that says what happened."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from ango import importer
from ango.errors import ImportFailed, ImportInterrupted
from ango.importer import import_codes
from tests.test_database_errors import closed_port

CLIENT = "c0ffee00-0000-4000-8000-000000000001"


def write_codes(path: Path, codes: list[str]) -> Path:
    path.write_text("code\n" + "".join(f"{c}\n" for c in codes))
    return path


def test_concurrent_overlapping_imports_do_not_deadlock_and_the_loser_is_told_why(
    dsn, db, tmp_path, monkeypatch
):
    # Each file spans several blocks, and the two meet their shared codes in
    # opposite orders: without a lock order, each import waits on a code the
    # other inserted first, and PostgreSQL breaks the deadlock by killing one.
    monkeypatch.setattr(importer, "_BLOCK_BYTES", 32 * 1024)
    import_codes(dsn, write_codes(tmp_path / "seed.txt", ["SEED"]), CLIENT, "seed")  # the client
    codes = [f"K{i:06d}" for i in range(20_000)]
    half = len(codes) // 2
    files = [write_codes(tmp_path / "a.txt", codes),
             write_codes(tmp_path / "b.txt", codes[half:] + codes[:half])]
    start = threading.Barrier(2)
    outcomes: dict[str, object] = {}

    def run(path: Path) -> None:
        start.wait()
        try:
            outcomes[path.name] = import_codes(dsn, path, CLIENT, path.name)
        except Exception as exc:  # the outcome is asserted below
            outcomes[path.name] = exc

    threads = [threading.Thread(target=run, args=(f,)) for f in files]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    results = sorted(outcomes.values(), key=lambda o: isinstance(o, Exception))
    assert len(results) == 2
    won, lost = results
    assert isinstance(won, importer.ImportResult) and won.imported == len(codes)
    assert isinstance(lost, ImportFailed), repr(lost)
    assert "is already in the database" in str(lost) and "nothing was imported" in str(lost)
    assert db.execute("SELECT count(*) FROM ango.codes").fetchone() == (len(codes) + 1,)
    assert db.execute("SELECT count(*) FROM ango.batches").fetchone() == (2,)


def test_an_import_to_an_unreachable_database_says_so_and_that_a_retry_is_safe(tmp_path):
    port = closed_port()
    path = write_codes(tmp_path / "codes.txt", ["A", "B"])
    with pytest.raises(ImportInterrupted) as info:
        import_codes(f"postgresql://ango:s3cret@127.0.0.1:{port}/ango", path, CLIENT, "b")
    message = str(info.value)
    assert f"127.0.0.1:{port}" in message and "s3cret" not in message
    assert "nothing was imported" in message and "retry" in message
    assert info.value.retryable


def test_an_import_cut_off_by_the_server_says_what_happened(dsn, db, server_dsn, tmp_path):
    # The import's backend is terminated while it copies (as a restart or a
    # failover would): the import reports that, not a psycopg traceback.
    import psycopg

    path = write_codes(tmp_path / "codes.txt", [f"X{i:06d}" for i in range(2_000)])
    name = db.info.dbname

    def kill_other_backends(done: int) -> None:
        with psycopg.connect(server_dsn, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid() AND pid <> %s",
                (name, db.info.backend_pid))

    with pytest.raises(ImportInterrupted) as info:
        import_codes(dsn, path, CLIENT, "b", progress=kill_other_backends)
    assert "PostgreSQL at" in str(info.value) and "retrying the import is safe" in str(info.value)
    assert db.execute("SELECT count(*) FROM ango.batches").fetchone() == (0,)
