"""Import 1,000,000 codes and compare with a plain COPY of the same file.

    python -m benchmarks.import_1m [--codes N] [--runs 3] [--dsn DSN]

Each run creates a fresh migrated database on the server (``--dsn``, else
``ANGO_BENCH_DSN``, ``ANGO_DSN``, ``DATABASE_URL``, else the embedded one),
times ``ango.importer.import_codes`` of the file (validation, the batch, every
code into the partitioned ``ango.codes`` with its indexes, one transaction),
then times a plain ``COPY ... (FORMAT csv, HEADER)`` of the same file's raw
bytes into an unindexed two-column table in that database. Runs are
interleaved so that drift on a shared machine hits both sides alike; the
medians and their ratio are printed (target: import ≤ 1.5 × plain COPY).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psycopg

from ango.importer import import_codes
from benchmarks._db import (
    CLIENT,
    create_plain_table,
    fresh_database,
    plain_copy,
    server_dsn,
    write_codes_csv,
)


def _checkpoint(dsn: str) -> None:
    """Start each timing with no dirty buffers left by the previous one."""
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CHECKPOINT")
    except psycopg.Error:
        pass  # not a superuser: run without


def run(codes: int, runs: int, dsn: str | None) -> dict:
    """Time ``runs`` interleaved imports and plain COPYs; return the figures."""
    server = server_dsn(dsn)
    with tempfile.TemporaryDirectory(prefix="ango-bench-") as tmp:
        path = write_codes_csv(Path(tmp) / "codes.csv", codes)
        size = path.stat().st_size
        imports: list[float] = []
        copies: list[float] = []
        for n in range(runs):
            with fresh_database(server) as db:
                create_plain_table(db)
                # Alternate which side goes first, so neither always meets a warmer cache.
                order = ("import", "copy") if n % 2 == 0 else ("copy", "import")
                for side in order:
                    _checkpoint(db)
                    start = time.perf_counter()
                    if side == "import":
                        result = import_codes(db, path, CLIENT, f"bench-{n}")
                        assert result.imported == codes, result
                        imports.append(time.perf_counter() - start)
                    else:
                        copied = plain_copy(db, path)
                        assert copied == codes, copied
                        copies.append(time.perf_counter() - start)
                print(f"run {n + 1}: import {imports[-1]:.2f} s, plain COPY {copies[-1]:.2f} s",
                      file=sys.stderr)
    import_s = statistics.median(imports)
    copy_s = statistics.median(copies)
    return {
        "codes": codes,
        "file_bytes": size,
        "runs": runs,
        "import_s": round(import_s, 3),
        "plain_copy_s": round(copy_s, 3),
        "ratio": round(import_s / copy_s, 2),
        "import_codes_per_s": round(codes / import_s),
        "all_import_s": [round(x, 3) for x in imports],
        "all_plain_copy_s": [round(x, 3) for x in copies],
    }


def main(argv: list[str] | None = None) -> None:
    """Command-line entry: print the medians and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--codes", type=int, default=1_000_000, help="codes in the file")
    parser.add_argument("--runs", type=int, default=3, help="runs of each side (median)")
    parser.add_argument("--dsn", default=None, help="PostgreSQL server to use")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    if args.codes < 1 or args.runs < 1:
        parser.error("--codes and --runs must be at least 1")
    figures = run(args.codes, args.runs, args.dsn)
    if args.json:
        print(json.dumps(figures))
        return
    print(f"{figures['codes']:,} codes ({figures['file_bytes'] / 1e6:.1f} MB), "
          f"median of {figures['runs']}:")
    print(f"  ango import : {figures['import_s']:.2f} s "
          f"({figures['import_codes_per_s']:,} codes/s)")
    print(f"  plain COPY  : {figures['plain_copy_s']:.2f} s")
    print(f"  ratio       : {figures['ratio']:.2f}x (target <= 1.5x)")


if __name__ == "__main__":
    main()
