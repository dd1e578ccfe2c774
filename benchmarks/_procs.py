"""What the benchmarks read from ``/proc``: memory, open files and CPU time per process, and the
machine's CPU split, sampled on a thread while a run goes on.

The CPU series answers what a peak cannot: when a long run slows, which process took the cores
(the broker, the generators, the trainer ranks, or the machine: steal, iowait) and whether a
process does more work per sample or gets less of the machine for the same work.
"""

from __future__ import annotations

import bisect
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Self

_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")

ROLES = ("trainer", "generator")  # processes a run starts; their pids are registered as they start
CPU_PARTS = ("trainer", "generator", "broker", "other", "iowait", "steal")
#: The kernel's share (stime) of the processes' parts: file and socket work, page faults.
KERNEL_PARTS = ("trainer_kernel", "generator_kernel", "broker_kernel")
_ALL_PARTS = CPU_PARTS + KERNEL_PARTS


def rss(pid: int) -> int:
    """Resident bytes of one process (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


def memory(pid: int) -> tuple[int, int, int]:
    """(RSS, PSS, USS) in bytes: RSS counts torch's shared libraries in every process (about
    0.5 GB each); PSS splits shared pages among their processes (sums to the machine's use);
    USS is what the process alone holds."""
    values: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name in ("Rss", "Pss", "Private_Clean", "Private_Dirty"):
                    values[name] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return 0, 0, 0
    return (
        values.get("Rss", 0),
        values.get("Pss", 0),
        values.get("Private_Clean", 0) + values.get("Private_Dirty", 0),
    )


def open_files(pid: int) -> int:
    """File descriptors one process holds (0 once it is gone)."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (0 once it is gone)."""
    return sum(cpu_split(pid))


def cpu_split(pid: int) -> tuple[float, float]:
    """(utime, stime) of one process: its own code, and the kernel's on its behalf (0 once gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) / _TICK, int(fields[12]) / _TICK
    except (OSError, ValueError, IndexError):
        return 0.0, 0.0


def machine_cpu() -> tuple[float, float, float]:
    """The machine's (busy, iowait, steal) CPU seconds since boot, all cores together: busy is
    user + nice + system + irq + softirq; steal is time the hypervisor gave another guest."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return 0.0, 0.0, 0.0
    user, nice, system, _idle, iowait, irq, softirq, steal = ticks
    return (user + nice + system + irq + softirq) / _TICK, iowait / _TICK, steal / _TICK


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (torchrun's ranks)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    return found


@dataclass
class CpuSeries:
    """Cumulative CPU seconds per part (``CPU_PARTS`` and ``KERNEL_PARTS``) at each sample's wall time."""

    times: list[float] = field(default_factory=list)
    totals: list[dict[str, float]] = field(default_factory=list)

    def at(self, when: float) -> dict[str, float]:
        """Every part's cumulative CPU seconds at ``when``, linear between samples."""
        if not self.times:
            return dict.fromkeys(_ALL_PARTS, 0.0)
        i = bisect.bisect_left(self.times, when)
        if i <= 0 or i >= len(self.times):
            return dict(self.totals[min(max(i, 0), len(self.times) - 1)])
        t0, t1 = self.times[i - 1], self.times[i]
        w = (when - t0) / (t1 - t0) if t1 > t0 else 1.0
        a, b = self.totals[i - 1], self.totals[i]
        return {k: a[k] + w * (b[k] - a[k]) for k in _ALL_PARTS}

    def cores(self, start: float, end: float) -> dict[str, float]:
        """Cores each part used on average between two wall times."""
        if end <= start:
            return dict.fromkeys(_ALL_PARTS, 0.0)
        a, b = self.at(start), self.at(end)
        return {k: (b[k] - a[k]) / (end - start) for k in _ALL_PARTS}


class Sampler:
    """Every ``interval_s``, on a thread: the peak memory per role (broker; generator processes;
    trainer ranks), the broker's open files, and the CPU series (``cpu``)."""

    def __init__(self, broker_pid: int | None, interval_s: float = 0.5) -> None:
        self.broker_pid, self.interval_s = broker_pid, interval_s
        self.roles: dict[str, list[int]] = {role: [] for role in ROLES}  # launcher pids
        self.peak: dict[str, int] = {"broker": 0, "broker_fds": 0}
        for role in self.roles:
            self.peak.update({f"{role}_rss": 0, f"{role}_uss": 0, f"{role}_pss_all": 0})
        self.cpu = CpuSeries()
        self._last_cpu: dict[int, tuple[str, float, float]] = {}  # pid -> role, utime, stime when last seen
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Self:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self._sample()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _pids(self, role: str) -> list[int]:
        # torchrun's ranks are its children; a generator process is its own launcher
        launchers = list(self.roles[role])
        return [c for p in launchers for c in (children(p) if role == "trainer" else []) or [p]]

    def _sample(self) -> None:
        when = time.time()
        busy, iowait, steal = machine_cpu()
        totals = dict.fromkeys(_ALL_PARTS, 0.0) | {"iowait": iowait, "steal": steal}
        if self.broker_pid:
            self.peak["broker"] = max(self.peak["broker"], rss(self.broker_pid))
            self.peak["broker_fds"] = max(self.peak["broker_fds"], open_files(self.broker_pid))
            user, kernel = cpu_split(self.broker_pid)
            totals["broker"], totals["broker_kernel"] = user + kernel, kernel
        for role in self.roles:
            pids = self._pids(role)
            sizes = [memory(p) for p in pids]
            if sizes:
                self.peak[f"{role}_rss"] = max(self.peak[f"{role}_rss"], *(m[0] for m in sizes))
                self.peak[f"{role}_uss"] = max(self.peak[f"{role}_uss"], *(m[2] for m in sizes))
                self.peak[f"{role}_pss_all"] = max(self.peak[f"{role}_pss_all"], sum(m[1] for m in sizes))
            for p in {*pids, *self.roles[role]}:  # torchrun itself too; an exited process keeps its CPU
                user, kernel = cpu_split(p)
                if user + kernel > 0:
                    self._last_cpu[p] = (role, user, kernel)
        for role, user, kernel in self._last_cpu.values():
            totals[role] += user + kernel
            totals[f"{role}_kernel"] += kernel
        totals["other"] = busy - totals["trainer"] - totals["generator"] - totals["broker"]
        self.cpu.times.append(when)
        self.cpu.totals.append(totals)
