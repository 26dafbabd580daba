"""`ango export`: a batch's issued or available codes, streamed with COPY TO STDOUT."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import pty
import subprocess
import sys
import tracemalloc

import psycopg
import pytest
from click.testing import CliRunner

import ango
from ango.audit import violations
from ango.cli import EXIT_NOT_FOUND, main
from ango.export import export_codes
from tests.helpers import CLIENT, make_batch


def cli(dsn: str, *args: str):
    return CliRunner().invoke(main, [*args, "--dsn", dsn], catch_exceptions=False)


def issues_of(db, batch: str) -> list[tuple[str, str, str]]:
    return db.execute(
        "SELECT i.code, i.customer_id, i.request_id FROM ango.issues i "
        "JOIN ango.batches b ON b.key = i.batch_key WHERE b.id = %s "
        "ORDER BY i.issued_at, i.code", (batch,)).fetchall()


def test_export_issued_and_available_as_csv_and_jsonl(dsn, db, tmp_path):
    batch = make_batch(dsn, 6, prefix="ex")
    make_batch(dsn, 3)  # another batch: not exported
    with ango.SyncAllocator(dsn, shards=1) as alloc:
        for n in range(4):
            alloc.claim(batch, f"cust,{n}\\", request_id=f"r-{n}")  # CSV and JSON escaping
        rows = alloc.export(batch, "issued", tmp_path / "issued.csv")
        assert rows == 4
    issued = list(csv.DictReader(open(tmp_path / "issued.csv", newline="")))
    assert [(r["code"], r["customer_id"], r["request_id"]) for r in issued] == issues_of(db, batch)
    assert all(r["issued_at"].endswith("Z") and "T" in r["issued_at"] for r in issued)
    out = io.BytesIO()
    assert export_codes(db, batch, "issued", out, "jsonl") == 4
    lines = [json.loads(line) for line in out.getvalue().decode().splitlines()]
    assert lines == issued  # the same rows and keys in both formats
    out = io.BytesIO()
    assert export_codes(db, batch, "available", out) == 2
    given = {r["code"] for r in issued}
    rest = [c for c in (f"ex-{i:07d}" for i in range(6)) if c not in given]
    assert out.getvalue().decode() == "code\n" + "".join(f"{c}\n" for c in rest)
    out = io.BytesIO()
    export_codes(db, batch, "available", out, "jsonl")
    assert out.getvalue().decode() == "".join(f'{{"code":"{c}"}}\n' for c in rest)
    assert violations(db) == []


def test_export_bad_input_is_a_typed_error_and_writes_no_file(dsn, db, tmp_path):
    batch = make_batch(dsn, 2)
    target = tmp_path / "out.csv"
    unknown = "5f0c6e2a-3b7d-4c1e-9a8f-2d4b6c8e0a1f"
    with pytest.raises(ango.BatchNotFound):
        export_codes(db, unknown, "issued", target)
    with pytest.raises(ango.InvalidInput, match="issued"):
        export_codes(db, batch, "everything", target)
    with pytest.raises(ango.InvalidInput, match="format"):
        export_codes(db, batch, "issued", target, "xml")
    with pytest.raises(ango.InvalidInput, match="batch id"):
        export_codes(db, "nope", "issued", target)
    assert not target.exists()
    result = cli(dsn, "export", unknown, "--issued", "-o", str(target))
    assert result.exit_code == EXIT_NOT_FOUND and f"no batch with id {unknown}" in result.output
    assert not target.exists()
    result = cli(dsn, "export", batch)
    assert result.exit_code == 2 and "--issued or --available" in result.output
    result = cli(dsn, "export", batch, "--issued", "--json")
    assert result.exit_code == 2 and "-o FILE" in result.output


def test_cli_export_to_stdout_and_to_a_file_with_a_json_summary(dsn, db, tmp_path):
    batch = make_batch(dsn, 3, prefix="cx")
    result = cli(dsn, "export", batch, "--available")
    assert result.exit_code == 0
    assert result.stdout == "code\ncx-0000000\ncx-0000001\ncx-0000002\n"
    assert result.stderr == ""  # no progress bar when standard error is not a terminal
    target = tmp_path / "a.jsonl"
    result = cli(dsn, "export", batch, "--available", "--format", "jsonl", "-o", str(target),
                 "--json")
    assert json.loads(result.stdout) == {"batch_id": batch, "what": "available",
                                         "format": "jsonl", "rows": 3, "file": str(target)}
    assert len(target.read_text().splitlines()) == 3


def on_a_terminal(*args: str) -> tuple[int, str]:
    """Run ``ango ARGS`` with standard error on a pseudo-terminal: (exit status, what it drew)."""
    primary, secondary = pty.openpty()
    proc = subprocess.run([sys.executable, "-m", "ango", *args], stderr=secondary,
                          stdout=subprocess.PIPE, env=dict(os.environ, COLUMNS="120"),
                          timeout=120)
    os.close(secondary)
    drawn = b""
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # the terminal's other end is closed: all read
            break
        if not chunk:
            break
        drawn += chunk
    os.close(primary)
    return proc.returncode, drawn.decode(errors="replace")


def test_export_shows_progress_on_a_terminal_only(dsn, tmp_path):
    batch = make_batch(dsn, 30_000)
    status, text = on_a_terminal("export", batch, "--available", "-o", str(tmp_path / "x.csv"),
                                 "--dsn", dsn)
    assert status == 0
    assert "exporting" in text and "30,000 rows" in text and "rows/s" in text, text
    assert "exported 30000 available codes" in text
    status, text = on_a_terminal("export", batch, "--available", "-o", str(tmp_path / "y.csv"),
                                 "--json", "--dsn", dsn)
    assert status == 0 and text == ""  # --json: quiet even on a terminal


def test_import_shows_progress_on_a_terminal_only(dsn, tmp_path):
    path = tmp_path / "codes.txt"
    path.write_text("".join(f"p-{n:07d}\n" for n in range(200_000)))
    status, text = on_a_terminal("import", str(path), "--client", CLIENT, "--batch", "b",
                                 "--dsn", dsn)
    assert status == 0
    assert "importing" in text and "MB/s" in text and "100%" in text, text
    status, text = on_a_terminal("import", str(path), "--client", CLIENT, "--batch", "b",
                                 "--json", "--dsn", dsn)
    assert status == 1 and "importing" not in text  # refused (codes exist), and quiet


def test_export_during_claims_holds_every_claim_answered_before_it(dsn, db):
    """One COPY, one snapshot: every claim answered before the export started is in it,
    and everything in it is an issue of the batch."""
    batch = make_batch(dsn, 3000)

    async def go():
        async with ango.Allocator(dsn, shards=2) as alloc:
            first = await asyncio.gather(*(alloc.claim(batch, f"a-{n}") for n in range(500)))
            more = [alloc.claim(batch, f"b-{n}") for n in range(1500)]
            out = io.BytesIO()
            exported = await alloc.export(batch, "issued", out)
            await asyncio.gather(*more)
            return first, out, exported

    first, out, exported = asyncio.run(go())
    rows = list(csv.DictReader(io.StringIO(out.getvalue().decode())))
    assert len(rows) == exported
    assert set(first) <= {r["code"] for r in rows}
    assert {(r["code"], r["customer_id"]) for r in rows} <= {
        (code, who) for code, who, _ in issues_of(db, batch)}
    assert violations(db) == []


def test_export_of_a_large_batch_keeps_memory_bounded(dsn, db):
    """200k codes, half issued: the whole export goes through a few MiB of memory."""
    batch = make_batch(dsn, 200_000, prefix="big")
    db.execute(
        "INSERT INTO ango.issues (code, batch_key, customer_id, request_id) "
        "SELECT code, batch_key, 'cust-' || seq, 'r-' || seq FROM ango.codes WHERE seq % 2 = 0")
    with open(os.devnull, "wb") as sink, psycopg.connect(dsn, autocommit=True) as conn:
        for what in ("issued", "available"):
            tracemalloc.start()
            try:
                assert export_codes(conn, batch, what, sink) == 100_000
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            assert peak < 4 * 1024 * 1024, (what, peak)  # 100k rows held would be 6+ MB
    assert violations(db) == []
