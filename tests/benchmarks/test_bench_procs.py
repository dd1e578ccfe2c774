"""The benchmarks' /proc sampler (benchmarks/_procs.py): CPU per part of the machine over a span."""

from __future__ import annotations

import subprocess
import sys
import time

from tests.benchmarks.modules import benchmark_module


def _procs():
    return benchmark_module("_procs")


def test_cores_between_two_times_are_linear_between_samples() -> None:
    procs = _procs()
    series = procs.CpuSeries()
    zero = dict.fromkeys(procs.CPU_PARTS + procs.KERNEL_PARTS, 0.0)
    for when, trainer in ((10.0, 0.0), (12.0, 2.0), (14.0, 2.0)):
        series.times.append(when)
        series.totals.append(zero | {"trainer": trainer})
    assert series.cores(10.0, 12.0)["trainer"] == 1.0
    assert series.cores(11.0, 13.0)["trainer"] == 0.5  # halfway into each interval
    assert series.cores(12.0, 14.0)["trainer"] == 0.0
    assert series.cores(13.0, 13.0) == zero


def test_a_busy_process_shows_in_its_role_and_keeps_its_cpu_after_it_exits() -> None:
    procs = _procs()
    spin = "import time\nend = time.process_time() + 0.6\nwhile time.process_time() < end: pass\n"
    with procs.Sampler(broker_pid=None, interval_s=0.05) as sampler:
        start = time.time()
        busy = subprocess.Popen([sys.executable, "-c", spin])
        sampler.roles["generator"].append(busy.pid)
        busy.wait(timeout=60)
        end = time.time()
    # leaving the sampler takes one last sample: after the process exited
    cores = sampler.cpu.cores(start, end)
    used = cores["generator"] * (end - start)
    assert 0.45 <= used <= 1.2, cores  # the 0.6 s it spun, less what ran before its first sample
    assert cores["trainer"] == 0.0 and cores["broker"] == 0.0
    assert 0.0 <= cores["generator_kernel"] < cores["generator"]  # a spin loop is user time
    assert sampler.cpu.at(end + 100)["generator"] >= used  # gone, its CPU still counted
