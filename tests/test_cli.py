"""The `ango` command: import, batches, expire and migrate, as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from ango.cli import main

CLIENT = "c0ffee00-0000-4000-8000-000000000001"
OTHER_CLIENT = "c0ffee00-0000-4000-8000-000000000002"


def run(dsn: str, *args: str):
    """Invoke the CLI in-process against this test's database."""
    return CliRunner().invoke(main, [*args, "--dsn", dsn], catch_exceptions=False)


def codes_file(tmp_path: Path, codes: list[str], name: str = "codes.csv") -> Path:
    path = tmp_path / name
    path.write_text("client_id,code\n" + "".join(f"{CLIENT},{c}\n" for c in codes))
    return path


def import_batch(dsn, tmp_path, codes, name="sale", *extra) -> str:
    result = run(dsn, "import", str(codes_file(tmp_path, codes, f"{name}.csv")),
                 "--client", CLIENT, "--batch", name, "--json", *extra)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["batch_id"]


def issue(db, batch_id: str, codes: list[str]) -> None:
    """Mark codes issued the way the claim path records them (a row in ango.issues)."""
    (key,) = db.execute("SELECT key FROM ango.batches WHERE id = %s", (batch_id,)).fetchone()
    for n, code in enumerate(codes):
        db.execute(
            "INSERT INTO ango.issues (code, batch_key, customer_id, request_id) "
            "VALUES (%s, %s, %s, %s)",
            (code, key, f"customer-{n}", f"request-{n}"),
        )


def batches_json(dsn) -> list[dict]:
    result = run(dsn, "batches", "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def table_counts(db) -> tuple[int, int]:
    return db.execute(
        "SELECT (SELECT count(*) FROM ango.batches), (SELECT count(*) FROM ango.codes)"
    ).fetchone()


# --- import ----------------------------------------------------------------


def test_import_prints_the_new_batch_id_and_nothing_else(dsn, db, tmp_path):
    result = run(dsn, "import", str(codes_file(tmp_path, ["A", "B"])),
                 "--client", CLIENT, "--batch", "sale")
    assert result.exit_code == 0
    batch_id = result.stdout.strip()
    assert str(uuid.UUID(batch_id)) == batch_id
    assert result.stderr == ""  # no progress bar when stderr is not a terminal
    total = db.execute("SELECT total FROM ango.batches WHERE id = %s", (batch_id,)).fetchone()
    assert total == (2,)


def test_import_json_prints_batch_id_and_count(dsn, db, tmp_path):
    result = run(dsn, "import", str(codes_file(tmp_path, ["A", "B", "C"])),
                 "--client", CLIENT, "--batch", "sale", "--json")
    assert result.exit_code == 0
    out = json.loads(result.stdout)
    assert set(out) == {"batch_id", "imported"}
    assert out["imported"] == 3
    stored = db.execute("SELECT name FROM ango.batches WHERE id = %s", (out["batch_id"],))
    assert stored.fetchone() == ("sale",)


def test_import_one_column_file_without_header(dsn, db, tmp_path):
    path = tmp_path / "plain.txt"
    path.write_text("P1\nP2\nP3\nP4\n")
    result = run(dsn, "import", str(path), "--client", CLIENT, "--batch", "plain", "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["imported"] == 4


def test_import_stores_rules(dsn, tmp_path):
    import_batch(dsn, tmp_path, ["A"], "ruled", "--rules", '{"maxpercustomer": 2, "timelimit": 30}')
    assert batches_json(dsn)[0]["rules"] == {"maxpercustomer": 2, "timelimit": 30}


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        pytest.param(f"client_id,code\n{CLIENT},A\n{CLIENT},\n", "line 3: empty code", id="empty"),
        pytest.param(f"client_id,code\n{CLIENT},A\n{CLIENT},A\n",
                     "line 3: code 'A' is repeated in the file", id="repeated"),
        pytest.param(f"client_id,code\n{OTHER_CLIENT},A\n", "line 2: client_id", id="client"),
        pytest.param("code\nA\nB,C\n", "line 3: expected 1 column(s), found 2", id="columns"),
        pytest.param(b"code\nA\n\xff\n", "line 3: bytes that are not UTF-8", id="utf8"),
        pytest.param("", "the file holds no codes", id="empty-file"),
    ],
)
def test_import_of_a_bad_file_exits_nonzero_names_the_line_and_changes_nothing(
    dsn, db, tmp_path, content, expected
):
    path = tmp_path / "bad.csv"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    before = table_counts(db)
    result = run(dsn, "import", str(path), "--client", CLIENT, "--batch", "bad")
    assert result.exit_code != 0
    assert result.stdout == ""
    assert expected in result.stderr
    assert "nothing was imported" in result.stderr
    assert table_counts(db) == before


def test_import_of_a_code_already_stored_exits_nonzero_and_changes_nothing(dsn, db, tmp_path):
    first = import_batch(dsn, tmp_path, ["K1", "K2"], "one")
    before = table_counts(db)
    result = run(dsn, "import", str(codes_file(tmp_path, ["N1", "K2"], "two.csv")),
                 "--client", CLIENT, "--batch", "two")
    assert result.exit_code != 0
    assert f"line 3: code 'K2' is already in the database (batch {first})" in result.stderr
    assert table_counts(db) == before


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        pytest.param(["--client", "not-a-uuid", "--batch", "x"], "client id must be a UUID",
                     id="client"),
        pytest.param(["--client", CLIENT, "--batch", "x", "--rules", "{oops"],
                     "rules: not valid JSON", id="rules-json"),
        pytest.param(["--client", CLIENT, "--batch", "x", "--rules", '{"maxpercustomer": 0}'],
                     "rules: 'maxpercustomer' must be between 1", id="rules-value"),
        pytest.param(["--client", CLIENT, "--batch", "x", "--rules", "[]"],
                     "rules: must be a JSON object", id="rules-shape"),
    ],
)
def test_import_with_bad_options_exits_nonzero_and_changes_nothing(
    dsn, db, tmp_path, args, expected
):
    before = table_counts(db)
    result = run(dsn, "import", str(codes_file(tmp_path, ["A"])), *args)
    assert result.exit_code != 0
    assert expected in result.stderr
    assert table_counts(db) == before


def test_import_of_a_missing_file_exits_nonzero(dsn, tmp_path):
    result = run(dsn, "import", str(tmp_path / "nope.csv"), "--client", CLIENT, "--batch", "x")
    assert result.exit_code != 0
    assert "does not exist" in result.stderr


# --- batches ---------------------------------------------------------------


def test_batches_counts_total_issued_and_available(dsn, db, tmp_path):
    first = import_batch(dsn, tmp_path, ["A1", "A2", "A3", "A4", "A5"], "first")
    second = import_batch(dsn, tmp_path, ["B1", "B2"], "second")
    issue(db, first, ["A1", "A4"])
    issue(db, second, ["B1", "B2"])
    listed = {b["id"]: b for b in batches_json(dsn)}

    def counts(batch):
        return listed[batch]["total"], listed[batch]["issued"], listed[batch]["available"]

    assert counts(first) == (5, 2, 3)
    assert counts(second) == (2, 2, 0)


def test_batches_json_has_every_field_oldest_first(dsn, tmp_path):
    first = import_batch(dsn, tmp_path, ["A"], "first", "--rules", '{"maxpercustomer": 1}')
    second = import_batch(dsn, tmp_path, ["B"], "second")
    listed = batches_json(dsn)
    assert [b["id"] for b in listed] == [first, second]
    assert listed[0] == {
        "id": first,
        "name": "first",
        "client_id": CLIENT,
        "rules": {"maxpercustomer": 1},
        "expired": False,
        "total": 1,
        "issued": 0,
        "available": 1,
        "created_at": listed[0]["created_at"],
        "starts_at": None,
        "expires_at": None,
    }
    assert listed[1]["rules"] is None


def test_batches_on_an_empty_database(dsn):
    assert batches_json(dsn) == []
    result = run(dsn, "batches")
    assert result.exit_code == 0
    assert result.stdout.splitlines()[0].split()[:3] == ["id", "name", "client"]
    assert len(result.stdout.splitlines()) == 1


def test_batches_table_shows_one_line_per_batch_with_counts(dsn, db, tmp_path):
    batch = import_batch(dsn, tmp_path, ["A1", "A2", "A3"], "shown")
    issue(db, batch, ["A2"])
    lines = run(dsn, "batches").stdout.splitlines()
    assert len(lines) == 2
    fields = lines[1].split()
    assert fields[0] == batch and fields[1] == "shown" and fields[2] == CLIENT
    assert fields[3:7] == ["false", "3", "1", "2"]


# --- expire ----------------------------------------------------------------


def test_expire_marks_the_batch_expired(dsn, db, tmp_path):
    batch = import_batch(dsn, tmp_path, ["A"], "doomed")
    other = import_batch(dsn, tmp_path, ["B"], "kept")
    result = run(dsn, "expire", batch)
    assert result.exit_code == 0
    assert result.stdout.strip() == f"expired {batch}"
    listed = {b["id"]: b["expired"] for b in batches_json(dsn)}
    assert listed == {batch: True, other: False}
    row = db.execute("SELECT expired_at IS NOT NULL FROM ango.batches WHERE id = %s", (batch,))
    assert row.fetchone() == (True,)


def test_expire_is_idempotent_and_keeps_the_first_expiry_time(dsn, db, tmp_path):
    batch = import_batch(dsn, tmp_path, ["A"], "doomed")
    assert run(dsn, "expire", batch).exit_code == 0
    first_at = db.execute("SELECT expired_at FROM ango.batches WHERE id = %s", (batch,)).fetchone()
    again = run(dsn, "expire", batch)
    assert again.exit_code == 0
    assert again.stdout.strip() == f"{batch} was already expired"
    assert db.execute(
        "SELECT expired_at FROM ango.batches WHERE id = %s", (batch,)
    ).fetchone() == first_at


def test_expire_drops_the_batch_leases(dsn, db, tmp_path):
    batch = import_batch(dsn, tmp_path, ["A", "B"], "leased")
    (key,) = db.execute("SELECT key FROM ango.batches WHERE id = %s", (batch,)).fetchone()
    db.execute("INSERT INTO ango.leases (owner, batch_key, lo, hi) VALUES (%s, %s, 0, 2)",
               (uuid.uuid4(), key))
    assert run(dsn, "expire", batch).exit_code == 0
    assert db.execute("SELECT count(*) FROM ango.leases").fetchone() == (0,)


def test_expire_of_an_unknown_batch_is_an_error(dsn, tmp_path):
    import_batch(dsn, tmp_path, ["A"], "existing")
    missing = str(uuid.uuid4())
    result = run(dsn, "expire", missing)
    assert result.exit_code != 0
    assert f"no batch with id {missing}" in result.stderr
    assert not any(b["expired"] for b in batches_json(dsn))


def test_expire_of_a_malformed_id_is_an_error(dsn):
    result = run(dsn, "expire", "not-a-uuid")
    assert result.exit_code != 0
    assert "batch id must be a UUID" in result.stderr


# --- migrate and the installed command ---------------------------------------


def test_migrate_on_a_migrated_database_is_a_no_op(dsn):
    result = run(dsn, "migrate")
    assert result.exit_code == 0
    assert result.stdout.strip() == "schema is up to date"


def test_installed_command_exits_nonzero_with_a_one_line_error(dsn, tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("code\nA\nA\n")
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("ango")), "import", str(path), "--client", CLIENT,
         "--batch", "x", "--dsn", dsn],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode != 0
    assert proc.stdout == ""
    assert proc.stderr.startswith("Error: line 3: code 'A' is repeated in the file")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_audit_passes_on_a_sound_database_and_fails_on_a_rule_breach(dsn):
    import psycopg as _pg

    from tests.helpers import make_batch

    runner = CliRunner()
    batch = make_batch(dsn, 5, {"maxpercustomer": 1})
    ok = runner.invoke(main, ["audit", "--dsn", dsn])
    assert ok.exit_code == 0, ok.output
    assert "FAIL" not in ok.output
    with _pg.connect(dsn) as conn:
        key = conn.execute("SELECT key FROM ango.batches WHERE id = %s", (batch,)).fetchone()[0]
        codes = [r[0] for r in conn.execute(
            "SELECT code FROM ango.codes WHERE batch_key = %s LIMIT 2", (key,))]
        for i, code in enumerate(codes):
            conn.execute("INSERT INTO ango.issues (code, batch_key, customer_id, request_id)"
                         " VALUES (%s, %s, 'greedy', %s)", (code, key, f"r{i}"))
    bad = runner.invoke(main, ["audit", "--dsn", dsn, "--json"])
    assert bad.exit_code == 1
    assert json.loads(bad.output)["I4 rules hold"]
