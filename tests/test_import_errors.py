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


# --- headers never become codes ------------------------------------------------


def table_counts(db) -> tuple[int, int]:
    return db.execute(
        "SELECT (SELECT count(*) FROM ango.batches), (SELECT count(*) FROM ango.codes)"
    ).fetchone()


def stored_codes(db) -> list[str]:
    return [r[0] for r in db.execute("SELECT code FROM ango.codes ORDER BY seq")]


@pytest.mark.parametrize("first", ["voucher", "Coupon", "VOUCHER_CODE", "Gift card", "promo-code"])
def test_a_one_column_header_word_is_refused_not_imported_as_a_code(dsn, db, tmp_path, first):
    path = tmp_path / "codes.txt"
    path.write_text(f"{first}\nV1\nV2\n")
    with pytest.raises(ImportFailed, match=r"^line 1: .* looks like a header.*--no-header"):
        import_codes(dsn, path, CLIENT, "b")
    assert table_counts(db) == (0, 0)


def test_a_semicolon_separated_header_is_refused_whatever_header_says(dsn, db, tmp_path):
    path = tmp_path / "codes.csv"
    path.write_text(f"client_id;code\n{CLIENT};S1\n{CLIENT};S2\n")
    for header in (None, True):
        with pytest.raises(ImportFailed, match=r"^line 1: .*separates columns with ';'"):
            import_codes(dsn, path, CLIENT, "b", header=header)
    path.write_text("code\tvalue\nT1\t1\n")
    with pytest.raises(ImportFailed, match="separates columns with tabs"):
        import_codes(dsn, path, CLIENT, "b")
    assert table_counts(db) == (0, 0)


def test_a_first_line_unlike_the_lines_after_it_is_refused(dsn, db, tmp_path):
    path = tmp_path / "codes.txt"
    path.write_text("Gutscheincode\n" + "".join(f"K7Q{i:04d}X\n" for i in range(30)))
    with pytest.raises(ImportFailed, match=r"^line 1: 'Gutscheincode' has no digit while each "
                                           r"of the 30 lines after it has one"):
        import_codes(dsn, path, CLIENT, "b")
    assert table_counts(db) == (0, 0)


def test_header_true_skips_any_one_column_header_and_false_imports_it(dsn, db, tmp_path):
    path = tmp_path / "codes.txt"
    path.write_text("voucher\nV1\nV2\n")
    skipped = import_codes(dsn, path, CLIENT, "skipped", header=True)
    assert skipped.imported == 2 and stored_codes(db) == ["V1", "V2"]
    path.write_text("coupon\nW1\n")
    kept = import_codes(dsn, path, CLIENT, "kept", header=False)
    assert kept.imported == 2
    assert db.execute("SELECT count(*) FROM ango.codes WHERE code = 'coupon'").fetchone() == (1,)


def test_a_duplicate_after_an_explicit_header_still_names_its_line(dsn, db, tmp_path):
    path = tmp_path / "codes.txt"
    path.write_text("voucher\nD1\nD2\nD1\n")
    with pytest.raises(ImportFailed, match=r"^line 4: code 'D1' is repeated in the file "
                                           r"\(first on line 2\)"):
        import_codes(dsn, path, CLIENT, "b", header=True)


def test_plain_codes_and_code_headers_import_as_before(dsn, db, tmp_path):
    path = tmp_path / "codes.txt"
    path.write_text("".join(f"P{i:03d}\n" for i in range(40)))
    assert import_codes(dsn, path, CLIENT, "plain").imported == 40
    path.write_text("Code\nQ1\n")
    assert import_codes(dsn, path, CLIENT, "code header").imported == 1


def test_a_file_that_grows_while_it_is_read_is_refused(dsn, db, tmp_path, monkeypatch):
    monkeypatch.setattr(importer, "_BLOCK_BYTES", 64)
    path = tmp_path / "codes.txt"
    path.write_text("code\n" + "".join(f"G{i:05d}\n" for i in range(100)))
    size = path.stat().st_size

    def append(done: int) -> None:
        if path.stat().st_size == size:
            with path.open("a") as f:
                f.write("LATE1\n")

    with pytest.raises(ImportFailed, match=rf"^the file changed while it was read \(from "
                                           rf"{size:,} bytes to {size + 6:,} bytes\)"):
        import_codes(dsn, path, CLIENT, "b", progress=append)
    assert table_counts(db) == (0, 0)


def test_cli_header_options_are_passed_to_the_import(dsn, db, tmp_path):
    from click.testing import CliRunner

    from ango.cli import main

    path = tmp_path / "codes.txt"
    path.write_text("voucher\nC1\n")
    refused = CliRunner().invoke(main, ["import", str(path), "--client", CLIENT, "--batch", "r",
                                        "--dsn", dsn])
    assert refused.exit_code == 1 and "looks like a header" in refused.output
    done = CliRunner().invoke(main, ["import", str(path), "--client", CLIENT, "--batch", "h",
                                     "--header", "--dsn", dsn])
    assert done.exit_code == 0, done.output
    assert stored_codes(db) == ["C1"]


def test_an_import_waits_for_the_one_running_and_says_so(dsn, db, tmp_path):
    import psycopg

    path = write_codes(tmp_path / "codes.txt", ["W1", "W2"])
    waited = threading.Event()
    outcome: list[object] = []
    with psycopg.connect(dsn) as other:  # an import in progress holds the lock in its transaction
        other.execute("SELECT pg_advisory_xact_lock(%s)", (importer._IMPORT_LOCK,))
        thread = threading.Thread(target=lambda: outcome.append(
            import_codes(dsn, path, CLIENT, "b", on_wait=waited.set)))
        thread.start()
        assert waited.wait(30)
        thread.join(0.5)
        assert thread.is_alive() and outcome == []  # still waiting
        other.rollback()
    thread.join(30)
    assert [r.imported for r in outcome] == [2]
