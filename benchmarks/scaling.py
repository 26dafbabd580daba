"""How Ango's claim rate scales: with shards, with claims in flight, with table size.

    python -m benchmarks.scaling [--json] [--seconds 5] [--shards 1,2,4] [--concurrency 10,100,1000]
                                 [--small 100000] [--big 1000000] [--dsn DSN]

Every point is the ``ango`` side of ``benchmarks.load`` (``ango serve`` as a
subprocess, ``ango.AsyncClient``, rule ``maxpercustomer: 1``, a fresh customer
per claim), each on a new server:

- **shards**: ``--shards`` 1, 2 and 4 at C = 100;
- **concurrency**: C = 10, 100 and 1000 at the default shard count;
- **table size**: one batch of ``--small`` codes (100k) in a database of its
  own vs one batch of ``--big`` codes in another, at C = 100. Also timed
  directly: ``lease_block`` of 4,096 codes, five times, in each (the leasing a
  shard does). Leasing must not slow as the table grows. The two batches' runs
  alternate ``--repeats`` times (medians), so drift hits both alike. ``--big 10000000``
  is the issue's comparison (importing 10M codes takes a minute or more);
  ``--big 0`` skips the comparison.

The small batch's runs stop claiming at 70 % of its codes, so their windows
may be shorter than ``--seconds``. All codes received are checked against
PostgreSQL afterwards, as in ``benchmarks.load``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg

from ango.sql import queries
from benchmarks._cpu import postmaster_pid
from benchmarks._db import fresh_database, server_dsn
from benchmarks.load import (
    ANGO_RATE_GUESS,
    CLAIMS_PER_CONNECTION,
    MAX_DEFAULT_CODES,
    AngoSide,
    _load_average,
)

LEASE_SIZE = 4096
LEASES = 5


def _connections(concurrency: int) -> int:
    return max(1, -(-concurrency // CLAIMS_PER_CONNECTION))


def _point(side: AngoSide, seconds: float, warmup: float, concurrency: int, postmaster,
           run_no: int, label: str, log, budget: int | None = None) -> dict:
    log(f"{label}...")
    figures = side.run(seconds, warmup, concurrency, _connections(concurrency), postmaster,
                       run_no, budget)
    point = {"label": label, "shards": side.shards or os.cpu_count(),
             "concurrency": concurrency, "codes_in_batch": side.codes,
             **{k: figures[k] for k in ("claims_per_s", "p50_ms", "p99_ms", "errors",
                                        "window_s")},
             "cpu_cores": figures["cpu"]["cores"] if figures.get("cpu") else None,
             "load_average": _load_average()}
    if "note" in figures:
        point["note"] = figures["note"]
    log(f"  {point['claims_per_s']:,} claims/s, p50 {point['p50_ms']} ms, "
        f"p99 {point['p99_ms']} ms, errors {point['errors']}")
    return point


def time_leases(db: str, batch_id: str) -> dict:
    """Median seconds of ``lease_block`` for 4,096 codes, by an owner then retired."""
    owner = str(uuid.uuid4())
    took = []
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(queries["register_owner"], (owner, str(uuid.uuid4()), 999, os.getpid(),
                                                socket.gethostname(), []))
        (key,) = conn.execute("SELECT key FROM ango.batches WHERE id = %s",
                              (batch_id,)).fetchone()
        for _ in range(LEASES):
            started = time.perf_counter()
            rows = conn.execute(queries["lease_block"], {"key": key, "n": LEASE_SIZE,
                                                         "min": LEASE_SIZE, "split": 2,
                                                         "me": owner}).fetchall()
            took.append(time.perf_counter() - started)
            assert len(rows) == LEASE_SIZE, len(rows)
        # Retired: its leases are adopted at once by the next server's shards (I3).
        conn.execute(queries["retire_owner"], (owner,))
    return {"lease_codes": LEASE_SIZE, "lease_ms_median": round(statistics.median(took) * 1e3, 2),
            "lease_ms_all": [round(t * 1e3, 2) for t in took]}


def _table_size(server: str, small: int, big: int, seconds: float, warmup: float,
                repeats: int, tmp: Path, log) -> list[dict]:
    """The small and the big batch, each in a database of its own, runs interleaved."""
    with fresh_database(server) as small_db, fresh_database(server) as big_db:
        sides = []
        for db, count in ((small_db, small), (big_db, big)):
            log(f"importing a batch of {count:,} codes...")
            side = AngoSide(db, count, None, tmp)
            leases = time_leases(db, side.batch_id)
            log(f"  lease_block of {LEASE_SIZE} codes: {leases['lease_ms_median']} ms")
            sides.append((side, leases))
        # The small batch must not run dry: all its runs together take 70 % of it.
        budget = int(small * 0.7 / repeats)
        found: list[list[dict]] = [[], []]
        for n in range(repeats):
            for i, (side, _) in enumerate(sides):
                # A short warm-up: the small batch's budget must last past it.
                found[i].append(_point(side, seconds, min(warmup, 0.3), 100,
                                       postmaster_pid(side.db), n,
                                       f"batch of {side.codes:,} codes, run {n + 1}", log,
                                       budget=budget))
        points = []
        for (side, leases), runs in zip(sides, found, strict=True):
            point = {"label": f"batch of {side.codes:,} codes", "codes_in_batch": side.codes,
                     "import_s": round(side.import_s, 1),
                     **{k: statistics.median(r[k] for r in runs)
                        for k in ("claims_per_s", "p50_ms", "p99_ms")},
                     "errors": sum(r["errors"] for r in runs), "runs": runs,
                     "check": side.check(), **leases}
            points.append(point)
        return points


def run(seconds: float, warmup: float, shard_counts: list[int], concurrencies: list[int],
        small: int, big: int, dsn: str | None, log=print, repeats: int = 2) -> dict:
    """All the points; returns JSON-ready figures."""
    server = server_dsn(dsn)
    result: dict = {"setup": {"seconds": seconds, "warmup_s": warmup,
                              "machine_cores": os.cpu_count(),
                              "load_average_before": _load_average()}}
    runs = len(shard_counts) + len(concurrencies)
    codes = min(MAX_DEFAULT_CODES, int(runs * (seconds + warmup + 1) * ANGO_RATE_GUESS))
    with tempfile.TemporaryDirectory(prefix="ango-scaling-") as tmp:
        with fresh_database(server) as db:
            postmaster = postmaster_pid(db)
            log(f"importing {codes:,} codes for the shard and concurrency points...")
            side = AngoSide(db, codes, None, Path(tmp))
            points = []
            n = 0
            for shards in shard_counts:
                side.shards = shards
                points.append(_point(side, seconds, warmup, 100, postmaster, n,
                                     f"shards={shards} C=100", log))
                n += 1
            side.shards = None
            for c in concurrencies:
                points.append(_point(side, seconds, warmup, c, postmaster, n,
                                     f"shards={os.cpu_count()} (default) C={c}", log))
                n += 1
            result["points"] = points
            result["check"] = side.check()
        if big:
            result["table_size"] = _table_size(server, small, big, seconds, warmup, repeats,
                                               Path(tmp), log)
    result["setup"]["load_average_after"] = _load_average()
    return result


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> None:
    """Command-line entry."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--shards", default="1,2,4", help="shard counts, at C = 100")
    parser.add_argument("--concurrency", default="10,100,1000", help="C values, default shards")
    parser.add_argument("--small", type=int, default=100_000, help="codes in the small batch")
    parser.add_argument("--big", type=int, default=1_000_000,
                        help="codes in the big batch (10000000 for the issue's figure; 0: skip)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="interleaved runs of the small and the big batch (medians)")
    parser.add_argument("--dsn", default=None)
    args = parser.parse_args(argv)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    result = run(args.seconds, args.warmup, _ints(args.shards), _ints(args.concurrency),
                 args.small, args.big, args.dsn, log, args.repeats)
    if args.json:
        print(json.dumps(result))
        return
    rows = [("point", "claims/s", "p50 ms", "p99 ms", "errors", "extra")]
    for p in result["points"]:
        rows.append((p["label"], f"{p['claims_per_s']:,}", f"{p['p50_ms']:.2f}",
                     f"{p['p99_ms']:.2f}", str(p["errors"]), p.get("note", "")))
    for p in result.get("table_size", []):
        rows.append((p["label"], f"{p['claims_per_s']:,.0f}", f"{p['p50_ms']:.2f}",
                     f"{p['p99_ms']:.2f}", str(p["errors"]),
                     f"lease_block {LEASE_SIZE}: {p['lease_ms_median']} ms"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        print("  ".join(c.ljust(w) if j in (0, 5) else c.rjust(w)
                        for j, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    checks = [result["check"]] + [p["check"] for p in result.get("table_size", [])]
    audit = [v for c in checks for v in c["audit_violations"]]
    print(f"duplicates: {sum(c['duplicates'] for c in checks)}, audit: "
          f"{audit or 'clean'}; load average "
          f"{result['setup']['load_average_before']} -> {result['setup']['load_average_after']}")


if __name__ == "__main__":
    main()
