"""Where the CPU goes during a measured window: per-process CPU time, grouped.

The client, ``ango serve``, its shard processes and PostgreSQL's processes share
the machine's cores; a :class:`CpuSplit` takes two samples (window start and
end) and reports each group's CPU seconds per wall second ("cores"), what the
whole machine spent, and ``other_processes``: busy time no group accounts for
(other users of the machine, the kernel).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import psutil
import psycopg

# PostgreSQL process titles of its auxiliary processes (no database attached).
_BACKGROUND = ("checkpointer", "background writer", "walwriter", "wal writer", "io worker",
               "walsummarizer", "autovacuum launcher", "logical replication launcher",
               "archiver", "stats collector", "postmaster")


def postmaster_pid(dsn: str) -> int | None:
    """The PostgreSQL server's main process id, if it runs on this machine and is visible."""
    try:
        with psycopg.connect(dsn) as conn:
            (backend,) = conn.execute("SELECT pg_backend_pid()").fetchone()
            parent = psutil.Process(backend).parent()  # while the backend lives
        return parent.pid if parent else None
    except (psycopg.Error, psutil.Error):
        return None


def _cpu(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return times.user + times.system


def _machine_busy() -> float:
    t = psutil.cpu_times()
    # guest time is already inside user time; steal is the hypervisor's, not ours.
    skip = ("idle", "iowait", "steal", "guest", "guest_nice")
    return sum(v for name, v in t._asdict().items() if name not in skip)


class CpuSplit:
    """CPU seconds per group of processes between :meth:`start` and :meth:`stop`.

    ``groups`` maps a group name to a function returning that group's process
    ids now. ``dbname`` and ``postmaster`` add PostgreSQL's processes, split
    into ``pg_backends`` (connections to ``dbname``), ``pg_autovacuum``,
    ``pg_background`` (WAL writer, checkpointer, I/O workers...) and
    ``pg_other`` (connections to other databases).
    """

    def __init__(self, groups: dict[str, Callable[[], list[int]]], *,
                 dbname: str | None = None, postmaster: int | None = None) -> None:
        self.groups = groups
        self.dbname = dbname
        self.postmaster = postmaster
        self._start: dict[int, tuple[str, float]] = {}
        self._t0 = 0.0
        self._busy0 = 0.0
        self.result: dict | None = None

    def _postgres_group(self, proc: psutil.Process) -> str:
        try:
            title = " ".join(proc.cmdline()).strip()
        except psutil.Error:
            return "pg_other"
        if "autovacuum worker" in title:
            return "pg_autovacuum"
        if self.dbname and f" {self.dbname} " in f"{title} ":
            return "pg_backends"
        if any(name in title for name in _BACKGROUND):
            return "pg_background"
        return "pg_other"

    def _sample(self) -> dict[int, tuple[str, float]]:
        found: dict[int, tuple[str, float]] = {}
        for name, pids in self.groups.items():
            for pid in pids():
                try:
                    found[pid] = (name, _cpu(psutil.Process(pid)))
                except psutil.Error:
                    pass
        if self.postmaster:
            try:
                main = psutil.Process(self.postmaster)
                found[main.pid] = ("pg_background", _cpu(main))
                children = main.children()
            except psutil.Error:
                children = []
            for child in children:
                try:  # a backend may exit meanwhile: skip it, keep the others
                    found[child.pid] = (self._postgres_group(child), _cpu(child))
                except psutil.Error:
                    pass
        return found

    def start(self) -> None:
        """First sample: the window starts."""
        self._start = self._sample()
        self._busy0 = _machine_busy()
        self._t0 = time.monotonic()

    def stop(self) -> dict:
        """Second sample; return and keep the split (cores per group)."""
        end = self._sample()
        wall = time.monotonic() - self._t0
        busy = _machine_busy() - self._busy0
        spent: dict[str, float] = {}
        for pid, (name, cpu) in end.items():
            before = self._start.get(pid)
            # A process born inside the window spent all its CPU time in it.
            spent[name] = spent.get(name, 0.0) + cpu - (before[1] if before else 0.0)
        known = sum(spent.values())
        cores = {name: round(cpu / wall, 3) for name, cpu in sorted(spent.items())}
        cores["other_processes"] = round(max(0.0, busy - known) / wall, 3)
        self.result = {
            "wall_s": round(wall, 3),
            "machine_cores": os.cpu_count(),
            "machine_busy_cores": round(busy / wall, 3),
            "cores": cores,
            "cpu_s": {name: round(cpu, 3) for name, cpu in sorted(spent.items())},
        }
        return self.result


#: CPU not spent on the measured claims: other users of the machine, other databases.
NOT_OURS = ("other_processes", "pg_other")


def us_per_claim(split: dict, claims: float, digits: int = 1) -> dict[str, float]:
    """CPU µs per claim of each group of a :class:`CpuSplit` result, and ``all`` of them
    (what is :data:`NOT_OURS` left out)."""
    per = {k: round(v / claims * 1e6, digits) for k, v in split["cpu_s"].items()
           if k not in NOT_OURS}
    per["all"] = round(sum(per.values()), digits)
    return per


def children_of(pid: int) -> Callable[[], list[int]]:
    """A group function: the (recursive) children of ``pid`` now."""
    def pids() -> list[int]:
        try:
            return [p.pid for p in psutil.Process(pid).children(recursive=True)]
        except psutil.Error:
            return []
    return pids
