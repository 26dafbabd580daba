"""The embedded allocator's claim rate at 1, 2 and 4 shards, beside the original's
per-claim transaction, on the same PostgreSQL in the same run.

    python -m benchmarks.allocator [--seconds 5] [--inflight 100] [--shards 1,2,4] [--json]

In-process: ``ango.Allocator`` is driven from this process's event loop with
``--inflight`` claims in flight, a fresh customer per claim, on a batch whose
rule is ``{"maxpercustomer": 2}``. The original's transaction runs under
pgbench with as many clients (benchmarks/seed/claim.sql). Figures only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
import uuid
from pathlib import Path

import psycopg
import uvloop

import ango
from ango.audit import violations
from ango.importer import import_codes
from benchmarks._db import CLIENT, fresh_database, server_dsn, write_codes_csv
from benchmarks.load import SeedSide, find_pgbench, percentile

RATE_GUESS = 40_000


async def _drive(alloc: ango.Allocator, batch_id: str, seconds: float, warmup: float,
                 inflight: int) -> dict:
    clock = time.perf_counter  # uvloop's loop.time() ticks in whole milliseconds
    start = clock()
    lo, hi = start + warmup, start + warmup + seconds
    latencies: list[float] = []
    errors = 0
    counter = 0
    prefix = uuid.uuid4().hex[:8]

    async def worker() -> None:
        nonlocal counter, errors
        while True:
            now = clock()
            if now >= hi:
                return
            counter += 1
            try:
                await alloc.claim(batch_id, f"{prefix}-{counter}")
            except ango.AngoError:
                errors += 1
            end = clock()
            if lo <= end < hi:
                latencies.append(end - now)

    await asyncio.gather(*(worker() for _ in range(inflight)))
    latencies.sort()
    return {"claims_per_s": round(len(latencies) / seconds),
            "p50_ms": round(percentile(latencies, 0.5) * 1000, 2),
            "p99_ms": round(percentile(latencies, 0.99) * 1000, 2), "errors": errors}


def measure_allocator(dsn: str, batch_id: str, shards: int, seconds: float, inflight: int,
                      warmup: float = 1.0) -> dict:
    """Claims/s of an Allocator with ``shards`` shard processes, started and stopped here."""
    async def go() -> dict:
        async with ango.Allocator(dsn, shards=shards) as alloc:
            figures = await _drive(alloc, batch_id, seconds, warmup, inflight)
            stats = await alloc.stats()
        served = sum(s.get("claims_served", 0) for s in stats["per_shard"])
        groups = sum(s.get("groups", 0) for s in stats["per_shard"])
        figures["mean_group"] = round(served / max(1, groups), 1)
        return figures

    return uvloop.run(go())


def run(shard_counts: tuple[int, ...] = (1, 2, 4), seconds: float = 5.0, inflight: int = 100,
        dsn: str | None = None, log=print) -> dict:
    """Every shard count, then the original's transaction; JSON-ready figures."""
    server = server_dsn(dsn)
    codes = int((seconds + 2) * RATE_GUESS * len(shard_counts))
    result: dict = {"cores": os.cpu_count(), "inflight": inflight, "seconds": seconds,
                    "rule": {"maxpercustomer": 2}, "load_average_before": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="ango-alloc-") as tmp, fresh_database(server) as db:
        log(f"importing {codes:,} codes...")
        path = write_codes_csv(Path(tmp) / "codes.csv", codes)
        batch = import_codes(db, path, CLIENT, "allocator bench", {"maxpercustomer": 2})
        for shards in shard_counts:
            log(f"ango, {shards} shard(s), {inflight} in flight...")
            figures = measure_allocator(db, str(batch.batch_id), shards, seconds, inflight)
            result[f"ango_{shards}_shards"] = figures
            log(f"  {figures}")
        log("the original's per-claim transaction (pgbench)...")
        seed = SeedSide(db, int((seconds + 2) * 20_000), find_pgbench(), Path(tmp))
        figures = seed.run(seconds, 1.0, inflight, None, 0)
        result["seed_sql"] = {k: figures[k] for k in
                              ("claims_per_s", "p50_ms", "p99_ms", "errors", "clients")}
        log(f"  {result['seed_sql']}")
        with psycopg.connect(db) as conn:
            result["violations"] = violations(conn, stale_seconds=60)
    seed_rate = max(1, result["seed_sql"]["claims_per_s"])
    for shards in shard_counts:
        entry = result[f"ango_{shards}_shards"]
        entry["ratio_vs_seed"] = round(entry["claims_per_s"] / seed_rate, 2)
    result["load_average_after"] = os.getloadavg()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--inflight", type=int, default=100)
    parser.add_argument("--shards", default="1,2,4")
    parser.add_argument("--dsn", default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    counts = tuple(int(x) for x in args.shards.split(","))
    quiet = args.json
    result = run(counts, args.seconds, args.inflight, args.dsn,
                 log=(lambda *_: None) if quiet else print)
    if args.json:
        print(json.dumps(result))
        return
    print(f"\n{'side':16} {'claims/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'vs seed':>8}")
    for key, value in result.items():
        if key.startswith("ango_") or key == "seed_sql":
            print(f"{key:16} {value['claims_per_s']:>9,} {value['p50_ms']:>7} "
                  f"{value['p99_ms']:>7} {value.get('ratio_vs_seed', 1.0):>8}")
    print(f"cores {result['cores']}; load {result['load_average_before']}; "
          f"violations {result['violations']}; started {time.strftime('%H:%M:%S')}")


if __name__ == "__main__":
    main()
