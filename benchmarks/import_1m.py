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

``--floor`` adds a third side, in a database of its own: the same codes already
in ``ango.codes``' COPY format, in file order (made before timing), COPYed
straight into ``ango.codes``: what the server alone spends on rows sent in file
order (partition routing, the primary key on code, the (batch_key, seq) index).
The importer sends each block in code order, which the server indexes faster,
so it can beat this.
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
    create_floor_batch,
    create_plain_table,
    floor_copy,
    fresh_database,
    plain_copy,
    server_dsn,
    write_codes_copy,
    write_codes_csv,
)


def _checkpoint(dsn: str) -> None:
    """Start each timing with no dirty buffers left by the previous one."""
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CHECKPOINT")
    except psycopg.Error:
        pass  # not a superuser: run without


def _floor(server: str, copy_path: Path, codes: int) -> float:
    with fresh_database(server) as db:
        if create_floor_batch(db) != 1:
            raise RuntimeError("a fresh database's first batch should have key 1")
        _checkpoint(db)
        start = time.perf_counter()
        copied = floor_copy(db, copy_path)
        elapsed = time.perf_counter() - start
    assert copied == codes, copied
    return elapsed


def run(codes: int, runs: int, dsn: str | None, floor: bool = False) -> dict:
    """Time ``runs`` interleaved imports and plain COPYs; return the figures."""
    server = server_dsn(dsn)
    with tempfile.TemporaryDirectory(prefix="ango-bench-") as tmp:
        path = write_codes_csv(Path(tmp) / "codes.csv", codes)
        copy_path = write_codes_copy(path, Path(tmp) / "codes.copy") if floor else None
        size = path.stat().st_size
        imports: list[float] = []
        copies: list[float] = []
        floors: list[float] = []
        for n in range(runs):
            if copy_path is not None:
                floors.append(_floor(server, copy_path, codes))
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
                extra = f", floor {floors[-1]:.2f} s" if floors else ""
                print(f"run {n + 1}: import {imports[-1]:.2f} s, plain COPY {copies[-1]:.2f} s"
                      f"{extra}", file=sys.stderr)
    import_s = statistics.median(imports)
    copy_s = statistics.median(copies)
    figures = {
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
    if floors:
        figures["floor_s"] = round(statistics.median(floors), 3)
        figures["floor_ratio"] = round(figures["floor_s"] / copy_s, 2)
        figures["all_floor_s"] = [round(x, 3) for x in floors]
    return figures


def main(argv: list[str] | None = None) -> None:
    """Command-line entry: print the medians and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--codes", type=int, default=1_000_000, help="codes in the file")
    parser.add_argument("--runs", type=int, default=3, help="runs of each side (median)")
    parser.add_argument("--dsn", default=None, help="PostgreSQL server to use")
    parser.add_argument("--floor", action="store_true",
                        help="also time pre-made rows COPYed straight into ango.codes")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    if args.codes < 1 or args.runs < 1:
        parser.error("--codes and --runs must be at least 1")
    figures = run(args.codes, args.runs, args.dsn, args.floor)
    if args.json:
        print(json.dumps(figures))
        return
    print(f"{figures['codes']:,} codes ({figures['file_bytes'] / 1e6:.1f} MB), "
          f"median of {figures['runs']}:")
    print(f"  ango import : {figures['import_s']:.2f} s "
          f"({figures['import_codes_per_s']:,} codes/s)")
    print(f"  plain COPY  : {figures['plain_copy_s']:.2f} s")
    if "floor_s" in figures:
        print(f"  floor       : {figures['floor_s']:.2f} s "
              f"({figures['floor_ratio']:.2f}x plain COPY: pre-made rows in file order)")
    print(f"  ratio       : {figures['ratio']:.2f}x (target <= 1.5x)")


if __name__ == "__main__":
    main()
