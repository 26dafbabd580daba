"""Claims per second and p99 through a cluster: cluster-aware client vs plain client.

    python -m benchmarks.cluster_load [--instances 3] [--shards 1] [--seconds 5] [--rounds 2]
        [--modes cluster,plain,direct]

Starts ``--instances`` `ango serve` processes on one fresh database (the server
of ``ANGO_BENCH_DSN``, else Ango's own lookup), waits until they share the
routing slots evenly, imports a batch, then at 100 and 1,000 claims in flight
alternates two clients, ``--rounds`` times each:

- ``cluster``: ``AsyncClient(cluster=True)``: each claim goes straight to the
  instance owning its routing slot (no server hop);
- ``plain``: an ordinary ``AsyncClient`` on the first instance, which serves
  the claims of its own slots and forwards the others' to their owners;
- ``direct`` (issue 13): ``AsyncClient(cluster=True, direct=True)``: each claim
  goes straight to the owning *shard process* of the owning instance, over a
  direct connection (no server hop at all).

Prints one JSON object: per client and concurrency the median claims/s and p99
(ms) of the rounds and the CPU microseconds per claim of the instances, their
shards, the client and PostgreSQL together, and each round's figures. Measure
on a quiet machine if possible: the instances, PostgreSQL and the client share
the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import psycopg
import uvloop
from psycopg.conninfo import conninfo_to_dict

from ango.cluster.slots import fair_shares
from ango.importer import import_codes
from benchmarks._cpu import CpuSplit, children_of, postmaster_pid, us_per_claim
from benchmarks._db import CLIENT, fresh_database, server_dsn, write_codes_csv
from benchmarks.protocol_load import drive, start_server


def _balanced(dsn: str, instances: int) -> bool:
    with psycopg.connect(dsn, autocommit=True) as conn:
        live = conn.execute("SELECT count(*) FROM ango.live_instances").fetchone()[0]
        owned = sorted(n for (n,) in conn.execute(
            "SELECT count(*) FROM ango.routing_slots WHERE owner IS NOT NULL GROUP BY owner"))
    names = [str(i) for i in range(instances)]
    return live == instances and owned == sorted(fair_shares(names, 1024).values())


def _p99_ms(latencies: list[float]) -> float | None:
    if len(latencies) < 100:
        return None
    return round(statistics.quantiles(latencies, n=100)[98] * 1000, 2)


def _cpu_split(dsn: str, servers: list) -> CpuSplit:
    """CPU of the instances (servers), their shards, this client and PostgreSQL."""
    pids = [s.pid for s in servers]
    shards = [children_of(pid) for pid in pids]
    return CpuSplit({"instances": lambda: pids,
                     "shards": lambda: [c for f in shards for c in f()],
                     "client": lambda: [os.getpid()]},
                    dbname=conninfo_to_dict(dsn).get("dbname"),
                    postmaster=postmaster_pid(dsn))


def _per_claim(cpu: CpuSplit, claims: int) -> dict[str, float] | None:
    return us_per_claim(cpu.result, claims) if cpu.result and claims else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default=None, help="PostgreSQL server (else ANGO_BENCH_DSN)")
    parser.add_argument("--instances", type=int, default=3)
    parser.add_argument("--shards", type=int, default=1, help="shards per instance")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--codes", type=int, default=1_500_000)
    parser.add_argument("--modes", default="cluster,plain",
                        help="clients to alternate, comma-separated: cluster, plain, direct")
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    if not modes or set(modes) - {"cluster", "plain", "direct"}:
        raise SystemExit(f"--modes: pick from cluster, plain, direct; got {args.modes!r}")
    token = os.environ.get("ANGO_TOKEN") or os.urandom(16).hex()
    result: dict = {"instances": args.instances, "shards_per_instance": args.shards,
                    "seconds": args.seconds, "runs": []}
    with fresh_database(server_dsn(args.dsn)) as db, tempfile.TemporaryDirectory() as tmp:
        batch = str(import_codes(db, write_codes_csv(Path(tmp) / "codes.csv", args.codes),
                                 CLIENT, "benchmarks.cluster_load", None).batch_id)
        servers = [start_server(token, dsn=db, shards=args.shards)
                   for _ in range(args.instances)]
        try:
            deadline = time.monotonic() + 60
            while not _balanced(db, args.instances):
                if time.monotonic() > deadline:
                    raise SystemExit("the instances did not share the slots within 60 s")
                time.sleep(0.2)
            for concurrency in (100, 1000):
                for round_ in range(args.rounds):
                    for mode in modes:
                        cpu = _cpu_split(db, servers)
                        found = uvloop.run(drive(
                            servers[0].port, token, batch, concurrency, 1, args.seconds,
                            prefix=f"{mode}{concurrency}r{round_}-", cluster=mode == "cluster",
                            direct=mode == "direct",
                            on_window=(cpu.start, cpu.stop)))
                        result["runs"].append({
                            "client": mode, "concurrency": concurrency, "round": round_,
                            "claims_per_s": round(found.claims_per_s),
                            "p99_ms": _p99_ms(found.latencies), "errors": found.errors_total,
                            "cpu_us_per_claim": _per_claim(cpu, found.claims)})
        finally:
            for server in servers:
                server.stop()
    summary = {}
    for mode in modes:
        for concurrency in (100, 1000):
            runs = [r for r in result["runs"]
                    if r["client"] == mode and r["concurrency"] == concurrency]
            summary[f"{mode}@{concurrency}"] = {
                "claims_per_s": statistics.median(r["claims_per_s"] for r in runs),
                "p99_ms": statistics.median(r["p99_ms"] or 0 for r in runs),
                "cpu_us_per_claim": {
                    kind: statistics.median((r["cpu_us_per_claim"] or {}).get(kind, 0)
                                            for r in runs)
                    for kind in ("instances", "shards", "client", "pg_backends", "all")}}
    result["median"] = summary
    print(json.dumps(result))


if __name__ == "__main__":
    main()
