"""How many CPUs this process may use: the container's CPU quota, not the node's cores.

In a container (a Kubernetes pod with ``resources.limits.cpu``, ``docker run
--cpus``) ``os.cpu_count()`` still counts every core of the node, so a pod
limited to 2 CPUs on a 64-core node would start 64 shards and have them
throttled. The quota lives in the cgroup: ``cpu.max`` ("QUOTA PERIOD" or
"max PERIOD") on cgroup v2, ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` on
cgroup v1. Every function takes the filesystem root to read them under, so that
tests can lay out fake cgroup files in a temporary directory.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

ROOT = Path("/")


def _own_cgroups(root: Path) -> dict[str, str]:
    """Controller -> this process's cgroup path, from ``/proc/self/cgroup``
    (``""`` is cgroup v2's unified hierarchy)."""
    try:
        text = (root / "proc/self/cgroup").read_text()
    except OSError:
        return {}
    found: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)  # "hierarchy-id:controllers:path"
        if len(parts) == 3:
            for controller in parts[1].split(","):
                found.setdefault(controller, parts[2])
    return found


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _candidates(mount: Path, cgroup_path: str | None) -> list[Path]:
    """The process's cgroup directory under ``mount`` and its ancestors, innermost first;
    else the mount itself (a container with its own cgroup namespace, or cgroup v1
    where the container's cgroup is mounted at the root)."""
    if cgroup_path and ".." not in Path(cgroup_path).parts:  # "/..": outside our namespace
        inner = mount / cgroup_path.strip("/")
        if inner.is_dir():
            return [inner, *(p for p in inner.parents if p.is_relative_to(mount))]
    return [mount]


def _v2_quota(root: Path, cgroup_path: str | None) -> float | None:
    limits = []
    for directory in _candidates(root / "sys/fs/cgroup", cgroup_path):
        fields = (_read(directory / "cpu.max") or "").split()
        if len(fields) == 2 and fields[0] != "max":
            try:
                quota, period = int(fields[0]), int(fields[1])
            except ValueError:
                continue
            if quota > 0 and period > 0:
                limits.append(quota / period)
    # A parent's quota bounds its children's: the smallest one holds.
    return min(limits) if limits else None


def _v1_quota(root: Path, cgroup_path: str | None) -> float | None:
    for name in ("cpu,cpuacct", "cpu", "cpuacct,cpu"):
        mount = root / "sys/fs/cgroup" / name
        if not mount.is_dir():
            continue
        for directory in _candidates(mount, cgroup_path):
            quota = _read(directory / "cpu.cfs_quota_us")
            period = _read(directory / "cpu.cfs_period_us")
            try:
                q, p = int(quota or ""), int(period or "")
            except ValueError:
                continue
            if q > 0 and p > 0:  # -1: no quota
                return q / p
        return None
    return None


def quota(root: Path = ROOT) -> float | None:
    """CPUs the cgroup quota allows (e.g. 1.5), or None when there is none to be found."""
    cgroups = _own_cgroups(root)
    if (root / "sys/fs/cgroup/cgroup.controllers").exists():  # cgroup v2 (unified)
        return _v2_quota(root, cgroups.get(""))
    return _v1_quota(root, cgroups.get("cpu"))


def _cores() -> int:
    """CPUs this process may be scheduled on (its affinity mask, e.g. a cpuset), else all."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def available(root: Path = ROOT) -> int:
    """Whole CPUs this process may keep busy: the quota rounded down (at least 1),
    never more than the cores it may run on.

    Rounded down so that one process per CPU is never throttled: a quota of 1.5
    gives 1.
    """
    cores = _cores()
    allowed = quota(root)
    if allowed is None:
        return cores
    return max(1, min(cores, math.floor(allowed)))
