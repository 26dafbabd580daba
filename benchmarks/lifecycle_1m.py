"""Look-ups and export on a batch of a million codes, half of them issued.

    python -m benchmarks.lifecycle_1m [--codes 1000000] [--dsn DSN] [--json]

Imports ``--codes`` codes, marks every other one issued (to 50,000 customers,
10 codes each for a million) with one INSERT, then measures:
``lookup_code`` and ``customer_codes`` latencies (1,000 random keys each, one
connection), and ``ango export`` as a separate process (wall time, and its peak
resident memory from ``wait4``) for the issued and the available codes as CSV
and JSON lines, beside the peak memory of an export of a one-code batch (what
the interpreter and the imports alone take). Figures only.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

from ango.importer import import_codes
from ango.lookup import customer_codes, lookup_code
from benchmarks._db import CLIENT, fresh_database, server_dsn, write_codes_csv
from benchmarks.load import percentile

CUSTOMERS = 100_000


def _export(dsn: str, batch: str, what: str, fmt: str) -> dict:
    """``ango export`` in a child process: seconds and peak RSS (MiB)."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ango", "export", batch, f"--{what}", "--format", fmt,
         "-o", os.devnull, "--dsn", dsn], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    if status != 0:
        raise RuntimeError(proc.stderr.read().decode())
    return {"seconds": round(seconds, 2), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}


def _latencies(fn, keys: list) -> dict:
    times = []
    for key in keys:
        started = time.perf_counter()
        fn(key)
        times.append(time.perf_counter() - started)
    times.sort()
    return {"p50_ms": round(percentile(times, 0.5) * 1000, 3),
            "p99_ms": round(percentile(times, 0.99) * 1000, 3)}


def run(codes: int, dsn: str | None = None, log=print) -> dict:
    """Every figure, JSON-ready."""
    result: dict = {"codes": codes, "issued": codes // 2}
    with tempfile.TemporaryDirectory(prefix="ango-lc-") as tmp, \
            fresh_database(server_dsn(dsn)) as db:
        log(f"importing {codes:,} codes...")
        path = write_codes_csv(Path(tmp) / "codes.csv", codes)
        batch = str(import_codes(db, path, CLIENT, "lifecycle 1m").batch_id)
        tiny = str(import_codes(db, _one_code_file(Path(tmp)), CLIENT, "one").batch_id)
        log("issuing half of them...")
        with psycopg.connect(db, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO ango.issues (code, batch_key, customer_id, request_id, issued_at) "
                "SELECT code, batch_key, 'cust-' || (seq %% %s), 'r-' || seq, "
                "now() - seq * interval '1 second' FROM ango.codes c "
                "JOIN ango.batches b ON b.key = c.batch_key AND b.id = %s WHERE seq %% 2 = 0",
                (CUSTOMERS, batch))
            conn.execute("ANALYZE")
            rng = random.Random(7)
            sample = [r[0] for r in conn.execute(
                "SELECT code FROM ango.codes TABLESAMPLE SYSTEM (1) LIMIT 1000")]
            rng.shuffle(sample)
            log("look-ups...")
            result["lookup_code"] = _latencies(lambda c: lookup_code(conn, c), sample)
            people = [f"cust-{rng.randrange(0, CUSTOMERS, 2)}" for _ in range(1000)]
            result["customer_codes"] = _latencies(lambda p: customer_codes(conn, p), people)
        for what in ("issued", "available"):
            for fmt in ("csv", "jsonl"):
                log(f"export --{what} --format {fmt}...")
                result[f"export_{what}_{fmt}"] = _export(db, batch, what, fmt)
        result["export_one_code_baseline"] = _export(db, tiny, "available", "csv")
    return result


def _one_code_file(folder: Path) -> Path:
    path = folder / "one.txt"
    path.write_text("the-only-code\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--codes", type=int, default=1_000_000)
    parser.add_argument("--dsn", default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = run(args.codes, args.dsn, log=(lambda *_: None) if args.json else print)
    print(json.dumps(result, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
