"""Helpers of the cluster test: a cuttable PostgreSQL proxy, a claim load, the invariants.

The load runs in its own thread and event loop: cluster-aware clients (claims
straight to the slot's owner) and plain clients (claims to any instance, which
forwards them) at once, every claim with a request id and retried with it until
it is answered, as a careful client would.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import ango
from ango.cluster.slots import fair_shares
from ango.errors import AngoError, BatchExhausted, RuleViolation
from tests.servers import ANGO

#: The rule of the load's second batch: at most this many codes per customer.
LIMIT = 2


class PgProxy:
    """A TCP proxy in front of PostgreSQL whose :meth:`cut` really cuts every connection."""

    def __init__(self, dsn: str) -> None:
        params = conninfo_to_dict(dsn)
        host = params.get("host") or "/tmp"
        port = int(params.get("port") or 5432)
        if host.startswith("/"):
            self._upstream: tuple = (socket.AF_UNIX, f"{host}/.s.PGSQL.{port}")
        else:
            self._upstream = (socket.AF_INET, (host, port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        params.update(host="127.0.0.1", port=str(self.port))
        self.dsn = make_conninfo(**params)
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._cut = False
        threading.Thread(target=self._accept, daemon=True).start()

    def restore(self) -> None:
        """Accept connections again, on the same port."""
        with self._lock:
            self._listener = socket.create_server(("127.0.0.1", self.port))
            self._cut = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._cut:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            family, address = self._upstream
            upstream = socket.socket(family, socket.SOCK_STREAM)
            try:
                upstream.connect(address)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._cut:
                    client.close()
                    upstream.close()
                    return
                self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for s in (source, sink):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        """Refuse new connections and break every open one, both ways."""
        with self._lock:
            self._cut = True
            self._listener.close()
            for s in self._sockets:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
            self._sockets.clear()


@dataclass
class Tally:
    """What the load saw: acknowledged codes, refusals, retries, failures."""

    acked: dict[str, tuple[str, str]] = field(default_factory=dict)  # rid -> (code, customer)
    refused: set[str] = field(default_factory=set)  # rule violations (rid)
    retries: int = 0
    failures: list[str] = field(default_factory=list)
    map_updates: int = 0  # partition maps the cluster-aware clients took


class Load:
    """Claims through every instance until stopped; pausable for the checks."""

    def __init__(self, ports: list[int], token: str, batch: str, ruled: str,
                 workers: int = 6) -> None:
        self.ports = ports
        self.token = token
        self.batch = batch
        self.ruled = ruled
        self.workers = workers
        self.tally = Tally()
        self._running = threading.Event()
        self._running.set()
        self._idle = 0
        self._stop = False
        self._ids = itertools.count()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        # A blocking cluster-aware client too, in a thread of its own.
        self._sync_thread = threading.Thread(target=self._sync_worker, daemon=True)
        self._lock = threading.Lock()

    def start(self) -> Load:
        self._thread.start()
        self._sync_thread.start()
        return self

    def _sync_worker(self) -> None:
        client = ango.Client("127.0.0.1", self.ports[0], self.token, timeout=3.0, cluster=True)
        try:
            while not self._stop:
                if not self._running.is_set():
                    with self._lock:
                        self._idle += 1
                    while not self._running.is_set() and not self._stop:
                        time.sleep(0.02)
                    with self._lock:
                        self._idle -= 1
                    continue
                n = next(self._ids)
                rid, customer = f"rid-{n}", f"sync-{n}"
                deadline = time.monotonic() + 60
                while True:
                    try:
                        code = client.claim(self.batch, customer, request_id=rid)
                    except AngoError as exc:
                        if exc.retryable and time.monotonic() < deadline:
                            self.tally.retries += 1
                            time.sleep(0.05)
                            continue
                        self.tally.failures.append(f"{rid}: {exc.code}: {exc}")
                        break
                    self.tally.acked[rid] = (code, customer)
                    break
        finally:
            self.tally.map_updates += client._routes.table.updates if client._routes else 0
            client.close()

    async def _main(self) -> None:
        cluster = await ango.AsyncClient.connect("127.0.0.1", self.ports[0], self.token,
                                                 timeout=3.0, cluster=True)
        plain = [ango.AsyncClient("127.0.0.1", p, self.token, timeout=3.0) for p in self.ports]
        tasks = [asyncio.create_task(self._worker(i, [cluster] if i % 2 == 0 else plain))
                 for i in range(self.workers)]
        await asyncio.gather(*tasks)
        self.tally.map_updates += cluster._routes.table.updates
        for c in [cluster, *plain]:
            await c.close()

    async def _worker(self, index: int, clients: list[ango.AsyncClient]) -> None:
        turn = index
        while not self._stop:
            if not self._running.is_set():
                with self._lock:
                    self._idle += 1
                while not self._running.is_set() and not self._stop:
                    await asyncio.sleep(0.02)
                with self._lock:
                    self._idle -= 1
                continue
            n = next(self._ids)
            rid = f"rid-{n}"
            if n % 4 == 3:  # a ruled batch: a few customers, each at most LIMIT codes
                batch, customer = self.ruled, f"ruled-{n % 37}"
            else:
                batch, customer = self.batch, f"cust-{n}"
            deadline = time.monotonic() + 60
            while True:
                turn += 1
                client = clients[turn % len(clients)]
                try:
                    code = await client.claim(batch, customer, request_id=rid)
                except RuleViolation:
                    self.tally.refused.add(rid)
                    break
                except BatchExhausted:
                    self._stop = True
                    break
                except AngoError as exc:
                    if exc.retryable and time.monotonic() < deadline:
                        self.tally.retries += 1
                        await asyncio.sleep(0.05)
                        continue
                    self.tally.failures.append(f"{rid}: {exc.code}: {exc}")
                    break
                self.tally.acked[rid] = (code, customer)
                break

    def pause(self, timeout: float = 120.0) -> None:
        """Stop starting claims and wait until every worker's current one is answered."""
        self._running.clear()
        deadline = time.monotonic() + timeout
        everyone = self.workers + 1  # the async workers and the blocking one
        while self._idle < everyone and time.monotonic() < deadline and \
                self._thread.is_alive():
            time.sleep(0.02)
        assert self._idle == everyone or not self._thread.is_alive(), "load did not pause"

    def resume(self) -> None:
        self._running.set()

    def stop(self) -> Tally:
        self._stop = True
        self._running.set()
        self._thread.join(120)
        self._sync_thread.join(120)
        return self.tally


def ownership(dsn: str) -> tuple[dict[str, int], set[str]]:
    """Slots owned per owner (None: no owner) and the live instances."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        owned = dict(conn.execute(
            "SELECT owner, count(*) FROM ango.routing_slots GROUP BY owner").fetchall())
        live = {r[0] for r in conn.execute("SELECT name FROM ango.live_instances")}
    return owned, live


def balanced(dsn: str, names: set[str]) -> bool:
    """Exactly ``names`` are live and each owns its fair share of the slots."""
    owned, live = ownership(dsn)
    total = sum(owned.values())
    return live == names and {k: v for k, v in owned.items() if k} == fair_shares(
        sorted(names), total)


def wait_for(predicate, what: str, timeout: float = 60.0, every: float = 0.05) -> float:
    """Poll ``predicate`` until true; the seconds it took (AssertionError after ``timeout``)."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, f"{what}: not within {timeout} s"
        time.sleep(every)
    return time.monotonic() - start


def check_invariants(dsn: str, tally: Tally, batches: tuple[str, str]) -> None:
    """Every invariant, read from PostgreSQL, against what the clients were told."""
    audit = subprocess.run([*ANGO, "audit", "--dsn", dsn], capture_output=True, text=True,
                           timeout=120)
    assert audit.returncode == 0, audit.stdout + audit.stderr
    with psycopg.connect(dsn, autocommit=True) as conn:
        dupes = conn.execute("SELECT code FROM ango.issues GROUP BY code HAVING count(*) > 1"
                             ).fetchall()
        assert dupes == [], f"codes issued twice: {dupes[:5]}"
        rows = conn.execute(
            "SELECT i.request_id, i.code, i.customer_id FROM ango.issues i "
            "JOIN ango.batches b ON b.key = i.batch_key WHERE b.id = ANY(%s::uuid[])",
            (list(batches),)).fetchall()
        over = conn.execute(
            "SELECT i.customer_id, count(*) FROM ango.issues i JOIN ango.batches b "
            "ON b.key = i.batch_key WHERE b.id = %s::uuid GROUP BY 1 HAVING count(*) > %s",
            (batches[1], LIMIT)).fetchall()
    recorded = {rid: (code, customer) for rid, code, customer in rows}
    assert over == [], f"customers over the rule's limit of {LIMIT}: {over}"
    assert recorded == tally.acked, (
        f"recorded and acknowledged differ: {len(recorded)} recorded, {len(tally.acked)} "
        f"acknowledged; only recorded: {sorted(set(recorded) - set(tally.acked))[:5]}; only "
        f"acknowledged: {sorted(set(tally.acked) - set(recorded))[:5]}")
    assert not (tally.refused & set(recorded)), "a refused claim was recorded"
