"""Three `ango serve` instances on one PostgreSQL, as a StatefulSet runs them (issue 13).

Same configuration, names ango-0..2, distinct ports, one shard each. Claims go
through all of them at once, from cluster-aware clients (straight to the slot's
owner) and plain ones (to any instance, which forwards), each with a request id
and retried with it. Then: kill -9 of one, its restart, a rolling restart, and
an instance cut off from PostgreSQL (its connections go through a proxy that is
cut, then restored), and one frozen by SIGSTOP (its sessions stay open: only its heartbeat
stops). After each step every invariant is checked from PostgreSQL. The failover
times are printed (run with -s to see them); nothing asserts on them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request

import psutil
import psycopg
import pytest

import ango
from tests.cluster_harness import (
    LIMIT,
    Load,
    PgProxy,
    balanced,
    check_invariants,
    ownership,
    wait_for,
)
from tests.servers import ANGO, TOKEN, ServeProcess, new_batch

pytestmark = pytest.mark.timeout(600)

NAMES = ["ango-0", "ango-1", "ango-2"]


def instance(index: int, dsn: str, port: int = 0) -> ServeProcess:
    return ServeProcess("--dsn", dsn, "--shards", "1", "--instance-name", NAMES[index],
                        port=port, env={"ANGO_TOKEN": TOKEN})


def restart(proc: ServeProcess, index: int, dsn: str) -> ServeProcess:
    again = instance(index, dsn, proc.port)
    again.start()
    return again


def test_three_instances_share_slots_forward_claims_and_survive_failures(dsn):
    proxy = PgProxy(dsn)  # ango-2 reaches PostgreSQL only through it
    dsns = [dsn, dsn, proxy.dsn]
    procs = [instance(i, dsns[i]) for i in range(3)]
    times: dict[str, float] = {}
    load = None
    try:
        for p in procs:
            p.start()
        times["join_balanced_s"] = wait_for(lambda: balanced(dsn, set(NAMES)), "balanced")
        wait_for(lambda: all(_ready(p) for p in procs), "every instance ready", timeout=30)
        # Each instance re-reads the map every beat: soon each answers what PostgreSQL holds.
        for p in procs:
            wait_for(lambda p=p: _map_matches(dsn, p.port), "partition_map as recorded",
                     timeout=30)
        batch = new_batch(dsn, 200_000)
        ruled = new_batch(dsn, 5_000, {"maxpercustomer": LIMIT})
        load = Load([p.port for p in procs], TOKEN, batch, ruled).start()

        def checkpoint(step: str) -> None:
            load.pause()
            check_invariants(dsn, load.tally, (batch, ruled))
            assert load.tally.failures == [], f"{step}: {load.tally.failures[:5]}"
            load.resume()

        time.sleep(3)
        checkpoint("steady")
        forwarded = _forwarded(procs)
        assert forwarded > 0, "plain clients' claims were never forwarded"
        # HTTP claims to one instance: those of the others' slots are forwarded too.
        load.pause()
        for k in range(30):
            rid, customer = f"http-{k}", f"http-customer-{k}"
            load.tally.acked[rid] = (_http_claim(procs[0], batch, customer, rid), customer)
        assert _forwarded(procs) > forwarded
        checkpoint("HTTP claims")
        shown = subprocess.run([*ANGO, "stats", "--port", str(procs[1].port)], capture_output=True,
                               text=True, timeout=60, env=dict(os.environ, ANGO_TOKEN=TOKEN))
        assert "cluster         ango-1 at 127.0.0.1:" in shown.stdout, shown.stdout + shown.stderr
        assert "owns 341/1024 slots (fair share 341)" in shown.stdout, shown.stdout
        with urllib.request.urlopen(f"http://127.0.0.1:{procs[0].http_port}/metrics",
                                    timeout=30) as answer:
            exported = answer.read().decode()
        assert "ango_cluster_slots_owned 342.0" in exported
        assert 'ango_cluster_forwarded_total{peer="ango-1"}' in exported

        # kill -9: its slots move to the others.
        _kill_tree(procs[1])  # as a pod dies: the instance and its shard processes
        times["kill9_slots_moved_s"] = wait_for(
            lambda: ownership(dsn)[0].get("ango-1", 0) == 0 and None not in ownership(dsn)[0],
            "slots of the killed instance taken", timeout=60)
        times["kill9_balanced_s"] = wait_for(
            lambda: balanced(dsn, {"ango-0", "ango-2"}), "rebalanced over two", timeout=60) + \
            times["kill9_slots_moved_s"]
        checkpoint("kill -9")

        # Restart it: it gets its share back.
        procs[1] = restart(procs[1], 1, dsns[1])
        times["restart_balanced_s"] = wait_for(lambda: balanced(dsn, set(NAMES)),
                                               "rebalanced over three", timeout=60)
        checkpoint("restart")

        # A frozen instance (SIGSTOP: its PostgreSQL sessions stay open): its heartbeat
        # goes stale and the others take its slots; thawed, it gets its share back.
        procs[1].proc.send_signal(signal.SIGSTOP)
        try:
            times["frozen_slots_moved_s"] = wait_for(
                lambda: ownership(dsn)[0].get("ango-1", 0) == 0, "slots of the frozen one taken",
                timeout=60)
        finally:
            procs[1].proc.send_signal(signal.SIGCONT)
        times["thawed_balanced_s"] = wait_for(lambda: balanced(dsn, set(NAMES)),
                                              "rebalanced after the thaw", timeout=60)
        checkpoint("frozen and thawed")

        # Rolling restart: SIGTERM one at a time; retrying clients see no failure.
        for i in range(3):
            assert procs[i].stop(signal.SIGTERM) == 0, procs[i].stderr
            procs[i] = restart(procs[i], i, dsns[i])
            wait_for(lambda: balanced(dsn, set(NAMES)), f"balanced after restarting {i}",
                     timeout=60)
        checkpoint("rolling restart")

        # ango-2 cut off from PostgreSQL: the others take over its slots.
        proxy.cut()
        times["cut_slots_moved_s"] = wait_for(
            lambda: ownership(dsn)[0].get("ango-2", 0) == 0 and None not in ownership(dsn)[0],
            "slots of the cut instance taken", timeout=60)
        time.sleep(5)  # claims keep reaching ango-2 (plain clients): it must stay correct
        checkpoint("cut from PostgreSQL")
        # What ango-2 answers now it serves through the others (it cannot commit itself).
        load.pause()
        with ango.Client("127.0.0.1", procs[2].port, TOKEN, timeout=30) as client:
            for k in range(20):
                rid, customer = f"cut-{k}", f"cut-customer-{k}"
                load.tally.acked[rid] = (client.claim(batch, customer, request_id=rid), customer)
            assert client.stats()["cluster"]["joined"] is False
        assert not _ready(procs[2]), "an instance cut off from PostgreSQL says it is ready"
        checkpoint("claims answered by the cut instance")

        # PostgreSQL reachable again: ango-2 joins again and gets its share back.
        proxy.restore()
        times["reconnected_balanced_s"] = wait_for(lambda: balanced(dsn, set(NAMES)),
                                                   "rebalanced after the reconnection",
                                                   timeout=60)
        wait_for(lambda: _ready(procs[2]), "ango-2 ready again", timeout=60)
        time.sleep(2)
        checkpoint("reconnected")
        tally = load.stop()
        load = None
        check_invariants(dsn, tally, (batch, ruled))
        assert len(tally.acked) > 100, f"too few claims to mean anything: {len(tally.acked)}"
        print(f"\ncluster failover: {json.dumps(times)}; claims acknowledged "
              f"{len(tally.acked)}, refused by the rule {len(tally.refused)}, retries "
              f"{tally.retries}, forwarded before the kill {forwarded}, maps taken by the "
              f"cluster-aware clients {tally.map_updates}")
        assert tally.map_updates > 1, "the cluster-aware clients never refreshed their map"
        for p in procs:  # a restart under the same name is the same instance, not a twin
            assert "another live process uses the instance name" not in p.stderr
    finally:
        if load is not None:
            load.stop()
        for p in procs:
            _kill_tree(p)
        proxy.cut()


def _forwarded(procs: list[ServeProcess]) -> int:
    """Claims forwarded to a peer, summed over the instances' stats."""
    total = 0
    for p in procs:
        with ango.Client("127.0.0.1", p.port, TOKEN) as client:
            peers = client.stats()["cluster"]["peers"]
        total += sum(peer["forwarded"] for peer in peers.values())
    return total


def _ready(proc: ServeProcess) -> bool:
    """GET /readyz answers 200."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{proc.http_port}/readyz",
                                    timeout=10) as answer:
            return answer.status == 200
    except urllib.error.HTTPError:
        return False


def _map_matches(dsn: str, port: int, tls=None) -> bool:
    """The partition_map an instance answers is the ownership PostgreSQL records."""
    with ango.Client("127.0.0.1", port, TOKEN, tls=tls) as client:
        found = client.partition_map()
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute("SELECT r.slot, i.address FROM ango.routing_slots r "
                            "JOIN ango.instances i ON i.name = r.owner ORDER BY r.slot").fetchall()
    assert found["slots"] == len(rows) == 1024
    return [found["addresses"][i] for i in found["owners"]] == [a for _, a in rows]


def _http_claim(proc: ServeProcess, batch: str, customer: str, request_id: str) -> str:
    """A claim over HTTP (POST /api/v1/code/redeem); its code."""
    body = json.dumps({"batchid": batch, "customerid": customer, "requestid": request_id})
    request = urllib.request.Request(
        f"http://127.0.0.1:{proc.http_port}/api/v1/code/redeem", data=body.encode(),
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.loads(answer.read())["code"]


def test_instances_serving_tls_forward_to_each_other_over_tls(dsn, tmp_path):
    import ssl

    from ango.server.tls import self_signed

    cert, key = self_signed(tmp_path)
    procs = [ServeProcess("--dsn", dsn, "--shards", "1", "--instance-name", f"tls-{i}",
                          "--tls-cert", cert, "--tls-key", key, env={"ANGO_TOKEN": TOKEN})
             for i in range(2)]
    try:
        for p in procs:
            p.start()
        wait_for(lambda: balanced(dsn, {"tls-0", "tls-1"}), "balanced")
        for p in procs:  # each knows the other's slots
            wait_for(lambda p=p: _map_matches(dsn, p.port, ssl.create_default_context(
                cafile=cert)), "partition_map as recorded", timeout=30)
        batch = new_batch(dsn, 1000)
        context = ssl.create_default_context(cafile=cert)
        with ango.Client("127.0.0.1", procs[0].port, TOKEN, tls=context) as client:
            codes = [client.claim(batch, f"customer-{k}", request_id=f"r{k}")
                     for k in range(60)]
            peers = client.stats()["cluster"]["peers"]
        assert len(set(codes)) == 60
        assert peers["tls-1"]["forwarded"] > 0
        assert peers["tls-1"]["served_here_instead"] == 0
    finally:
        for p in procs:
            _kill_tree(p)


@pytest.mark.parametrize(("option", "value", "said"), [
    ("--advertise", "no-port-here", "address must be HOST:PORT"),
    ("--advertise", "host:99999", "address must be HOST:PORT"),
    ("--instance-name", "bad name!", "must be 1-63 letters"),
])
def test_bad_cluster_options_are_refused_saying_what(option, value, said):
    done = subprocess.run([*ANGO, "serve", option, value], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2
    assert said in done.stderr and option in done.stderr
    assert "Traceback" not in done.stderr


def test_two_live_processes_with_one_instance_name_are_reported(dsn):
    procs = [ServeProcess("--dsn", dsn, "--shards", "1", "--instance-name", "twin",
                          env={"ANGO_TOKEN": TOKEN}) for _ in range(2)]
    try:
        for p in procs:
            p.start()
        wait_for(lambda: any("another live process uses the instance name 'twin'" in p.stderr
                             for p in procs), "the shared name reported", timeout=30)
    finally:
        for p in procs:
            _kill_tree(p)


def _kill_tree(proc: ServeProcess) -> None:
    """SIGKILL the instance and its shard processes (a shard whose parent was killed
    alone lives on, holding its PostgreSQL connections)."""
    if proc.proc is None:
        return
    try:
        children = psutil.Process(proc.proc.pid).children(recursive=True)
    except psutil.Error:
        children = []
    proc.kill()
    for child in children:
        try:
            child.kill()
        except psutil.Error:
            pass
