"""The shard count follows the container's CPU quota (cgroup v2 and v1), not the node's cores.

Each test lays out the files a kernel would show (``/proc/self/cgroup`` and the
cgroup filesystem) under a temporary root and reads them with ``ango.cpus``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ango import cpus
from ango.allocator import Allocator

CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def write(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def cgroup_v2(root: Path, cpu_max: str | None, own: str = "/") -> Path:
    """A unified hierarchy; ``cpu_max`` written in this process's cgroup ``own``."""
    write(root, "proc/self/cgroup", f"0::{own}\n")
    write(root, "sys/fs/cgroup/cgroup.controllers", "cpuset cpu io memory pids\n")
    if cpu_max is not None:
        write(root, f"sys/fs/cgroup/{own.strip('/')}/cpu.max", cpu_max + "\n")
    return root


def cgroup_v1(root: Path, quota_us: int, period_us: int = 100_000,
              mount: str = "cpu,cpuacct", own: str = "/") -> Path:
    write(root, "proc/self/cgroup",
          f"12:memory:{own}\n4:cpu,cpuacct:{own}\n1:name=systemd:/init.scope\n")
    write(root, f"sys/fs/cgroup/{mount}/cpu.cfs_quota_us", f"{quota_us}\n")
    write(root, f"sys/fs/cgroup/{mount}/cpu.cfs_period_us", f"{period_us}\n")
    return root


@pytest.mark.parametrize(("cpu_max", "expected"), [
    ("200000 100000", 2.0),   # limits.cpu: "2"
    ("150000 100000", 1.5),   # limits.cpu: 1500m
    ("50000 100000", 0.5),    # limits.cpu: 500m
    ("max 100000", None),     # no limit
])
def test_cgroup_v2_cpu_max_is_the_quota(tmp_path, cpu_max, expected):
    assert cpus.quota(cgroup_v2(tmp_path, cpu_max)) == expected


def test_cgroup_v2_without_cpu_max_has_no_quota(tmp_path):
    assert cpus.quota(cgroup_v2(tmp_path, None)) is None


def test_cgroup_v2_takes_the_smallest_quota_of_the_cgroup_and_its_parents(tmp_path):
    # No cgroup namespace: the pod's cgroup (4 CPUs) holds the container's (3).
    own = "/kubepods.slice/kubepods-pod1.slice/cri-containerd-abc.scope"
    root = cgroup_v2(tmp_path, "300000 100000", own=own)
    write(root, "sys/fs/cgroup/kubepods.slice/kubepods-pod1.slice/cpu.max", "400000 100000\n")
    assert cpus.quota(root) == 3.0
    write(root, "sys/fs/cgroup/kubepods.slice/cpu.max", "100000 100000\n")
    assert cpus.quota(root) == 1.0


def test_cgroup_v2_outside_the_namespace_reads_the_mount_root(tmp_path):
    root = cgroup_v2(tmp_path, "200000 100000")
    write(root, "proc/self/cgroup", "0::/../../other.scope\n")
    assert cpus.quota(root) == 2.0


@pytest.mark.parametrize("mount", ["cpu,cpuacct", "cpu"])
def test_cgroup_v1_cfs_quota_over_period_is_the_quota(tmp_path, mount):
    # Kubernetes on cgroup v1 mounts the container's own cgroup at the root, while
    # /proc/self/cgroup names its path on the node.
    root = cgroup_v1(tmp_path, 250_000, mount=mount, own="/kubepods/burstable/pod1/abc")
    assert cpus.quota(root) == 2.5


def test_cgroup_v1_quota_minus_one_means_none(tmp_path):
    assert cpus.quota(cgroup_v1(tmp_path, -1)) is None


def test_no_cgroup_files_means_no_quota(tmp_path):
    assert cpus.quota(tmp_path) is None
    assert cpus.available(tmp_path) == CORES


def test_garbage_in_cgroup_files_means_no_quota(tmp_path):
    assert cpus.quota(cgroup_v2(tmp_path, "lots 100000")) is None
    assert cpus.quota(cgroup_v1(tmp_path / "v1", 0)) is None


@pytest.mark.parametrize(("cpu_max", "expected"), [
    ("100000 100000", 1),
    ("150000 100000", 1),     # rounded down: one process per CPU is never throttled
    ("20000 100000", 1),      # at least one
    ("6400000 100000", CORES),  # never more than the cores this process may run on
])
def test_available_is_the_quota_rounded_down_within_the_cores(tmp_path, cpu_max, expected):
    assert cpus.available(cgroup_v2(tmp_path, cpu_max)) == expected


def test_allocator_defaults_to_one_shard_per_available_cpu():
    assert Allocator("postgresql://unused").shard_count == cpus.available()


V1_CPU = Path("/sys/fs/cgroup/cpu")


@pytest.mark.skipif(not (V1_CPU / "cpu.cfs_quota_us").exists() or not os.access(V1_CPU, os.W_OK),
                    reason="needs a writable cgroup v1 cpu hierarchy (root)")
def test_a_process_in_a_real_cgroup_with_a_one_cpu_quota_gets_one():
    group = V1_CPU / f"ango-test-{os.getpid()}"
    group.mkdir()
    try:
        (group / "cpu.cfs_quota_us").write_text("100000\n")  # 100 ms per 100 ms period
        # The child moves itself into the cgroup, then reads its quota as Ango does.
        done = subprocess.run(
            ["sh", "-c", 'echo $$ > "$1/cgroup.procs" && exec "$2" -c "$3"', "sh", str(group),
             sys.executable, "from ango import cpus; print(cpus.quota(), cpus.available())"],
            capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["1.0", "1"]
    finally:
        group.rmdir()
