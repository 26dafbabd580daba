"""`import_codes`: both file formats, every bad input refused whole, and volume."""

from __future__ import annotations

import io
import uuid
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_rules import BAD_RULES  # pytest puts tests/ on sys.path

from ango import importer
from ango.errors import ImportFailed, InvalidInput
from ango.importer import MAX_CODE_LENGTH, import_codes

CLIENT = "c0ffee00-0000-4000-8000-000000000001"
OTHER_CLIENT = "c0ffee00-0000-4000-8000-000000000002"


def write(tmp_path: Path, content: str | bytes, name: str = "codes.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def snapshot(db) -> tuple:
    """Everything an import writes, to compare before and after a refused one."""
    return (
        db.execute("SELECT id, client_id, name, rules, total FROM ango.batches ORDER BY key")
        .fetchall(),
        db.execute("SELECT code, batch_key, seq FROM ango.codes ORDER BY code").fetchall(),
        db.execute("SELECT id FROM ango.clients ORDER BY id").fetchall(),
        db.execute("SELECT batch_key, total FROM ango.lease_cursors ORDER BY 1").fetchall(),
    )


def codes_of(db, batch_id) -> list[tuple[str, int]]:
    return db.execute(
        "SELECT c.code, c.seq FROM ango.codes c JOIN ango.batches b ON b.key = c.batch_key "
        "WHERE b.id = %s ORDER BY c.seq",
        (batch_id,),
    ).fetchall()


# --- accepted formats -------------------------------------------------------


def test_original_csv_imports_every_code_in_file_order(dsn, db, tmp_path):
    path = write(tmp_path, f"client_id,code\n{CLIENT},A1\n{CLIENT},B2\n{CLIENT},C3\n")
    result = import_codes(dsn, path, CLIENT, "sale")
    assert result.imported == 3
    assert codes_of(db, result.batch_id) == [("A1", 1), ("B2", 2), ("C3", 3)]
    row = db.execute(
        "SELECT client_id, name, rules, total, expired FROM ango.batches WHERE id = %s",
        (result.batch_id,),
    ).fetchone()
    assert row == (uuid.UUID(CLIENT), "sale", None, 3, False)


def test_original_csv_columns_in_any_order_with_extra_columns_ignored(dsn, db, tmp_path):
    path = write(
        tmp_path,
        f"note,code,client_id,value\nfirst,X1,{CLIENT},5\nsecond,X2,{CLIENT},10\n",
    )
    result = import_codes(dsn, path, CLIENT, "sale")
    assert result.imported == 2
    assert codes_of(db, result.batch_id) == [("X1", 1), ("X2", 2)]


def test_original_csv_accepts_crlf_bom_and_quoted_fields(dsn, db, tmp_path):
    path = write(
        tmp_path,
        f'\ufeffCLIENT_ID,Code\r\n"{CLIENT}","Q,1"\r\n{CLIENT},Q2\r\n'.encode(),
    )
    result = import_codes(dsn, path, CLIENT, "sale")
    assert codes_of(db, result.batch_id) == [("Q,1", 1), ("Q2", 2)]


def test_client_id_matching_in_another_spelling_is_accepted(dsn, db, tmp_path):
    path = write(tmp_path, f"client_id,code\n{CLIENT.upper()},U1\n")
    assert import_codes(dsn, path, CLIENT, "sale").imported == 1


def test_one_column_file_with_code_header(dsn, db, tmp_path):
    path = write(tmp_path, "code\nH1\nH2\n")
    result = import_codes(dsn, path, CLIENT, "sale")
    assert codes_of(db, result.batch_id) == [("H1", 1), ("H2", 2)]


def test_one_column_file_without_header_imports_the_first_line_too(dsn, db, tmp_path):
    path = write(tmp_path, "N1\nN2\nN3")  # no trailing newline either
    result = import_codes(dsn, path, CLIENT, "sale")
    assert codes_of(db, result.batch_id) == [("N1", 1), ("N2", 2), ("N3", 3)]


def test_codes_keep_backslashes_and_unicode_verbatim(dsn, db, tmp_path):
    codes = ["a\\b", "\\N", "ünï-çødé", "日本語", "x" * MAX_CODE_LENGTH]
    path = write(tmp_path, "code\n" + "\n".join(codes) + "\n")
    result = import_codes(dsn, path, CLIENT, "sale")
    assert [code for code, _ in codes_of(db, result.batch_id)] == codes


def test_import_from_a_binary_stream(dsn, db):
    result = import_codes(dsn, io.BytesIO(b"S1\nS2\n"), CLIENT, "sale")
    assert codes_of(db, result.batch_id) == [("S1", 1), ("S2", 2)]


def test_rules_are_stored_canonically(dsn, db, tmp_path):
    path = write(tmp_path, "R1\n")
    result = import_codes(dsn, path, CLIENT, "sale", '{"timelimit": 30, "maxpercustomer": 2}')
    rules = db.execute(
        "SELECT rules FROM ango.batches WHERE id = %s", (result.batch_id,)
    ).fetchone()[0]
    assert rules == {"maxpercustomer": 2, "timelimit": 30}


def test_import_creates_the_lease_cursor_at_zero(dsn, db, tmp_path):
    result = import_codes(dsn, write(tmp_path, "L1\nL2\n"), CLIENT, "sale")
    row = db.execute(
        "SELECT lc.leased_upto, lc.total FROM ango.lease_cursors lc "
        "JOIN ango.batches b ON b.key = lc.batch_key WHERE b.id = %s",
        (result.batch_id,),
    ).fetchone()
    assert row == (0, 2)


def test_two_batches_number_their_codes_independently(dsn, db, tmp_path):
    first = import_codes(dsn, write(tmp_path, "F1\nF2\n", "a.csv"), CLIENT, "one")
    second = import_codes(dsn, write(tmp_path, "G1\n", "b.csv"), OTHER_CLIENT, "two")
    assert codes_of(db, first.batch_id) == [("F1", 1), ("F2", 2)]
    assert codes_of(db, second.batch_id) == [("G1", 1)]


# --- refused input: named line and reason, nothing changed -------------------

HEADER = f"client_id,code\n{CLIENT},OK1\n"


@pytest.mark.parametrize(
    ("content", "line", "reason"),
    [
        pytest.param("code\nE1\n\nE3\n", 3, "empty code", id="empty-line"),
        pytest.param(HEADER + f"{CLIENT},\n", 3, "empty code", id="empty-code-field"),
        pytest.param("code\nE1\n   \n", 3, "empty code", id="blank-code"),
        pytest.param(
            "code\nE1\n" + "x" * (MAX_CODE_LENGTH + 1) + "\n",
            3,
            f"longer than {MAX_CODE_LENGTH}",
            id="code-too-long",
        ),
        pytest.param(HEADER + f"{CLIENT},A,extra\n", 3, "expected 2 column(s), found 3",
                     id="too-many-columns"),
        pytest.param(HEADER + "ONLY\n", 3, "expected 2 column(s), found 1",
                     id="too-few-columns"),
        pytest.param("A1\nA2,B2\n", 2, "expected 1 column(s), found 2",
                     id="second-column-in-one-column-file"),
        pytest.param(b"code\nE1\nbad\xff\xfe\n", 3, "not UTF-8", id="not-utf8"),
        pytest.param(b"\xc3(\nE2\n", 1, "not UTF-8", id="not-utf8-first-line"),
        pytest.param("code\nE1\nE\x01X\n", 3, "control character", id="control-character"),
        pytest.param(HEADER + f'{CLIENT},"unterminated\n', 3, "malformed CSV",
                     id="unterminated-quote"),
        pytest.param(HEADER + f"{OTHER_CLIENT},X9\n", 3, "differs from --client",
                     id="client-mismatch"),
        pytest.param(HEADER + "not-a-uuid,X9\n", 3, "differs from --client",
                     id="client-not-a-uuid"),
        pytest.param("note,code,value\na,B,1\n", 1, "must name 'client_id' and 'code'",
                     id="wide-header-without-client-id"),
    ],
)
def test_bad_row_is_refused_with_its_line_and_nothing_changes(
    dsn, db, tmp_path, content, line, reason
):
    import_codes(dsn, write(tmp_path, "PRE1\nPRE2\n", "pre.csv"), CLIENT, "existing")
    before = snapshot(db)
    with pytest.raises(ImportFailed) as failure:
        import_codes(dsn, write(tmp_path, content), CLIENT, "refused")
    message = str(failure.value)
    assert message.startswith(f"line {line}: ")
    assert reason in message
    assert "nothing was imported" in message
    assert snapshot(db) == before


def test_code_repeated_in_the_file_names_both_lines(dsn, db, tmp_path):
    before = snapshot(db)
    path = write(tmp_path, "code\nD1\nD2\nD3\nD2\nD4\n")
    with pytest.raises(ImportFailed) as failure:
        import_codes(dsn, path, CLIENT, "dupes")
    message = str(failure.value)
    assert message.startswith("line 5: ")
    assert "'D2' is repeated in the file (first on line 3)" in message
    assert snapshot(db) == before


def test_code_repeated_in_original_csv_names_the_line(dsn, db, tmp_path):
    before = snapshot(db)
    path = write(tmp_path, f"code,client_id\nD1,{CLIENT}\nD1,{CLIENT}\n")
    with pytest.raises(ImportFailed, match=r"^line 3: code 'D1' is repeated in the file"):
        import_codes(dsn, path, CLIENT, "dupes")
    assert snapshot(db) == before


def test_code_already_in_the_database_names_the_line_and_owning_batch(dsn, db, tmp_path):
    first = import_codes(dsn, write(tmp_path, "K1\nK2\nK3\n", "a.csv"), CLIENT, "one")
    before = snapshot(db)
    with pytest.raises(ImportFailed) as failure:
        import_codes(dsn, write(tmp_path, "code\nZ1\nZ2\nK2\n", "b.csv"), OTHER_CLIENT, "two")
    message = str(failure.value)
    assert message.startswith("line 4: ")
    assert f"'K2' is already in the database (batch {first.batch_id})" in message
    assert snapshot(db) == before


def test_code_already_in_the_database_from_a_stream_is_still_refused(dsn, db, tmp_path):
    import_codes(dsn, write(tmp_path, "K1\n"), CLIENT, "one")
    before = snapshot(db)
    with pytest.raises(ImportFailed, match="K1"):
        import_codes(dsn, io.BytesIO(b"Z1\nK1\n"), CLIENT, "two")
    assert snapshot(db) == before


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"code\n", id="header-only"),
        pytest.param(b"client_id,code\r\n", id="original-header-only"),
    ],
)
def test_file_without_codes_is_refused(dsn, db, tmp_path, content):
    before = snapshot(db)
    with pytest.raises(ImportFailed, match="holds no codes"):
        import_codes(dsn, write(tmp_path, content), CLIENT, "empty")
    assert snapshot(db) == before


def test_malformed_client_ids_are_refused_and_nothing_changes(dsn, db, tmp_path):
    path = write(tmp_path, "A1\n")
    before = snapshot(db)
    for client in ["not-a-uuid", "", "c0ffee00-0000-4000-8000", "x" * 100, 12345]:
        with pytest.raises(InvalidInput, match="client id must be a UUID"):
            import_codes(dsn, path, client, "sale")
    assert snapshot(db) == before


def test_bad_batch_names_are_refused_and_nothing_changes(dsn, db, tmp_path):
    path = write(tmp_path, "A1\n")
    before = snapshot(db)
    for name in ["", "   ", "x" * 201, "tab\there"]:
        with pytest.raises(InvalidInput, match="batch name"):
            import_codes(dsn, path, CLIENT, name)
    assert snapshot(db) == before


def test_bad_rules_of_every_shape_are_refused_and_nothing_changes(dsn, db, tmp_path):
    path = write(tmp_path, "A1\n")
    before = snapshot(db)
    for rules in BAD_RULES:
        with pytest.raises(InvalidInput, match="^rules: "):
            import_codes(dsn, path, CLIENT, "sale", rules)
    assert snapshot(db) == before


# --- volume ----------------------------------------------------------------


def test_300k_codes_import_in_one_go(dsn, db, tmp_path):
    """The original fails beyond 21,845 rows (65,535 bind parameters)."""
    count = 300_000
    path = tmp_path / "big.csv"
    with open(path, "w") as out:
        out.write("client_id,code\n")
        out.writelines(f"{CLIENT},BIG-{i:07d}\n" for i in range(count))
    result = import_codes(dsn, path, CLIENT, "big")
    assert result.imported == count
    stats = db.execute(
        "SELECT count(*), min(seq), max(seq), count(DISTINCT seq) FROM ango.codes"
    ).fetchone()
    assert stats == (count, 1, count, count)
    last = db.execute("SELECT seq FROM ango.codes WHERE code = 'BIG-0299999'").fetchone()
    assert last == (count,)
    total = db.execute("SELECT total FROM ango.batches WHERE id = %s", (result.batch_id,))
    assert total.fetchone() == (count,)


def test_bad_row_late_in_a_large_file_leaves_nothing(dsn, db, tmp_path):
    path = tmp_path / "late.csv"
    with open(path, "w") as out:
        out.writelines(f"LATE-{i}\n" for i in range(50_000))
        out.write("LATE-17\n")
    before = snapshot(db)
    with pytest.raises(ImportFailed, match=r"^line 50001: code 'LATE-17' is repeated"):
        import_codes(dsn, path, CLIENT, "late")
    assert snapshot(db) == before


# --- the block fast path agrees with the exact line-by-line checks -------------


@pytest.fixture
def small_blocks(monkeypatch):
    """Read the file a few lines at a time, so that small files span many blocks."""
    monkeypatch.setattr(importer, "_BLOCK_BYTES", 64)


def test_error_line_numbers_stay_exact_across_blocks(dsn, db, tmp_path, small_blocks):
    lines = [f"{CLIENT},CODE-{i}" for i in range(2, 60)] + [f"{CLIENT},", f"{CLIENT},LAST"]
    path = write(tmp_path, "client_id,code\n" + "\n".join(lines) + "\n")
    before = snapshot(db)
    with pytest.raises(ImportFailed, match=r"^line 60: empty code"):
        import_codes(dsn, path, CLIENT, "blocks")
    assert snapshot(db) == before


def test_duplicate_line_numbers_stay_exact_across_blocks(dsn, db, tmp_path, small_blocks):
    path = write(tmp_path, "".join(f"C{i}\n" for i in range(1, 80)) + "C7\n")
    with pytest.raises(ImportFailed, match=r"^line 80: code 'C7' is repeated .* line 7\)"):
        import_codes(dsn, path, CLIENT, "blocks")


def test_unusual_lines_between_plain_ones_are_read_exactly(dsn, db, tmp_path, small_blocks):
    rows = []
    expected = []
    for i in range(40):
        code = f"CODE-{i:03d}"
        if i % 7 == 1:
            rows.append(f'"{CLIENT}"," {code} "\r\n')  # quoted, padded, CRLF
        elif i % 7 == 3:
            rows.append(f"{CLIENT.upper()},{code}\n")  # the client id spelled otherwise
        elif i % 7 == 5:
            code = f"with space {i}"
            rows.append(f"{CLIENT},{code}\n")
        else:
            rows.append(f"{CLIENT},{code}\n")
        expected.append(code)
    path = write(tmp_path, "client_id,code\n" + "".join(rows))
    result = import_codes(dsn, path, CLIENT, "mixed")
    got = codes_of(db, result.batch_id)
    assert [code for code, _ in got] == expected
    assert [seq for _, seq in got] == list(range(1, 41))


def test_code_first_column_order_is_read_fast_and_exactly(dsn, db, tmp_path, small_blocks):
    body = "".join(f"R{i},{CLIENT}\n" for i in range(30))
    result = import_codes(dsn, write(tmp_path, "code,client_id\n" + body), CLIENT, "rev")
    assert [code for code, _ in codes_of(db, result.batch_id)] == [f"R{i}" for i in range(30)]


def test_line_without_end_longer_than_the_limit_is_refused(dsn, db, tmp_path):
    path = write(tmp_path, "code\nA\n" + "x" * (importer.MAX_LINE_BYTES + 10))
    before = snapshot(db)
    with pytest.raises(ImportFailed, match=r"^line 3: line longer than"):
        import_codes(dsn, path, CLIENT, "long")
    assert snapshot(db) == before


def test_progress_reports_bytes_read_up_to_the_file_size(dsn, tmp_path, small_blocks):
    path = write(tmp_path, "".join(f"P{i}\n" for i in range(100)))
    seen: list[int] = []
    import_codes(dsn, path, CLIENT, "progress", progress=seen.append)
    assert seen == sorted(seen)
    assert seen[-1] == path.stat().st_size


class _FailingStream(io.BytesIO):
    def read(self, size=-1):
        raise OSError("disk went away")


def test_read_error_aborts_the_import_and_changes_nothing(dsn, db):
    before = snapshot(db)
    with pytest.raises(OSError, match="disk went away"):
        import_codes(dsn, _FailingStream(b"code\nA\nB\n"), CLIENT, "broken")
    assert snapshot(db) == before


_ALPHABET = st.sampled_from(
    ["A", "b", "7", ",", '"', " ", "\t", "\r", "\\", "\x00", "\x7f", "\xa0", "é", "\u2028", "x"]
)
_LINE = st.lists(_ALPHABET, max_size=12).map("".join)


def _exact(rows: importer._Rows, block: bytes):
    try:
        return rows._slow(2, block)
    except ImportFailed:
        return None


@settings(max_examples=300, deadline=None)
@given(lines=st.lists(_LINE, min_size=1, max_size=8), layout=st.sampled_from([1, 20, 21]),
       final_newline=st.booleans())
def test_fast_path_accepts_only_what_the_exact_checks_accept_identically(
    lines, layout, final_newline
):
    rows = importer._Rows(io.BytesIO(), uuid.UUID(CLIENT))
    if layout == 20:  # client_id,code
        rows.width, rows.code_at, rows.client_at = 2, 1, 0
        lines = [f"{CLIENT},{line}" for line in lines]
    elif layout == 21:  # code,client_id
        rows.width, rows.code_at, rows.client_at = 2, 0, 1
        lines = [f"{line},{CLIENT}" for line in lines]
    block = ("\n".join(lines) + ("\n" if final_newline else "")).encode()
    fast = rows._fast(block)
    if fast is not None:
        assert fast == _exact(rows, block)


def test_repeat_within_one_block_names_the_later_line(dsn, db, tmp_path):
    # Blocks go to PostgreSQL in code order; the report must still be in file order.
    path = write(tmp_path, "code\nZ9\nA1\nM5\nZ9\nB2\n")
    with pytest.raises(ImportFailed, match=r"^line 5: code 'Z9' is repeated .*first on line 2\)"):
        import_codes(dsn, path, CLIENT, "sorted")


def test_code_in_database_is_named_even_when_sorted_first(dsn, db, tmp_path):
    import_codes(dsn, write(tmp_path, "AAA\n", "a.csv"), CLIENT, "one")
    path = write(tmp_path, "ZZZ\nYYY\nAAA\nBBB\n", "b.csv")
    with pytest.raises(ImportFailed, match=r"^line 3: code 'AAA' is already in the database"):
        import_codes(dsn, path, CLIENT, "two")


def test_stream_read_from_its_current_position(dsn, db):
    stream = io.BytesIO(b"ignored preamble\ncode\nS1\nS2\nS1\n")
    stream.seek(len(b"ignored preamble\n"))
    with pytest.raises(ImportFailed, match=r"^line 4: code 'S1' is repeated .*first on line 2\)"):
        import_codes(dsn, stream, CLIENT, "offset")


class _Unseekable(io.BytesIO):
    def seekable(self):
        return False


def test_repeat_in_an_unseekable_stream_still_names_the_code(dsn, db):
    before = snapshot(db)
    with pytest.raises(ImportFailed, match=r"a code is repeated \(.*U1.*\); nothing was imported"):
        import_codes(dsn, _Unseekable(b"U1\nU2\nU1\n"), CLIENT, "pipe")
    assert snapshot(db) == before


def test_codes_are_numbered_in_file_order_whatever_the_send_order(dsn, db, tmp_path):
    codes = ["delta", "alpha", "charlie", "bravo", "echo"]
    result = import_codes(dsn, write(tmp_path, "\n".join(codes) + "\n"), CLIENT, "order")
    assert codes_of(db, result.batch_id) == [(code, n) for n, code in enumerate(codes, 1)]
