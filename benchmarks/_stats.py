"""What every benchmark shares: sides run alternately in rotated order, spread, machine load, scratch.

A single timing of a baseline followed by a single timing of the subject says little on a shared
machine: load drifts, the first side pays the warm-up, and the ratio moves by more than the claim.
So each benchmark runs its sides (the baseline and what it is compared with) one after another
inside every repeat, rotating which side goes first, after optional discarded warm-up runs, and
reports min / median / max of every figure and of every ratio taken *within* a repeat. The load
average and CPU count are printed at the start and the end, so a reader can tell a quiet run from
a loaded one.

    results = alternate({"raw": raw_side, "ours": ours_side}, repeats=3, warmup=1)
    print_spread(results, "s", lower_is_better=True)
    print_ratios(results, baseline="raw", key="s")
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

#: One side's figures from one run, by name (seconds, bytes, samples/s ...).
Figures = Mapping[str, float]
Side = Callable[[], Figures]


def machine_load() -> str:
    """The 1/5/15-minute load average against the CPU count: the context every figure needs."""
    one, five, fifteen = os.getloadavg()
    cpus = os.cpu_count() or 1
    busy = " (loaded: more runnable work than CPUs)" if one > cpus else ""
    return f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} (1/5/15 min) on {cpus} CPUs{busy}"


def _exit_on_term(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def session(title: str) -> Iterator[None]:
    """Print the title and the machine's load at the start, and the load again at the end.

    SIGTERM (``timeout``, a scheduler) becomes SystemExit inside, so the ``finally`` blocks of the
    scratch directories and the throwaway broker still run.
    """
    print(f"{title}\n  start: {machine_load()}", flush=True)
    started = time.perf_counter()
    previous = signal.signal(signal.SIGTERM, _exit_on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        print(f"  end  : {machine_load()}, {time.perf_counter() - started:.0f} s in all", flush=True)


@contextlib.contextmanager
def scratch(prefix: str, keep: bool = False) -> Iterator[Path]:
    """A throwaway directory in TMPDIR, removed at exit (error or not) unless ``keep``."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        if keep:
            print(f"kept {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


def spread(values: Sequence[float]) -> tuple[float, float, float]:
    """(min, median, max)."""
    return min(values), statistics.median(values), max(values)


def fmt_spread(values: Sequence[float], fmt: str = "{:.2f}") -> str:
    """``median M (min A - max B, n runs)``: the form the README rows use."""
    lo, mid, hi = spread(values)
    return f"median {fmt.format(mid)} ({fmt.format(lo)} - {fmt.format(hi)}, {len(values)} runs)"


def alternate(
    sides: Mapping[str, Side],
    repeats: int,
    *,
    warmup: int = 0,
    show: str | None = None,
    fmt: str = "{:.2f}",
) -> dict[str, list[dict[str, float]]]:
    """Run every side once per repeat, rotating the order, after ``warmup`` discarded rounds.

    Returns each side's figures per repeat, in repeat order (so ratios pair runs of one repeat).
    ``show`` names a figure to print after each repeat, as progress.
    """
    names = list(sides)
    for _ in range(warmup):
        for name in names:
            sides[name]()
    results: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for repeat in range(repeats):
        shift = repeat % len(names)
        order = names[shift:] + names[:shift]
        for name in order:
            results[name].append(dict(sides[name]()))
            if show is not None:  # every figure, so a run cut short still leaves its numbers
                figures = ", ".join(f"{k} {v:.3g}" for k, v in results[name][-1].items())
                print(f"    {name}: {figures}", flush=True)
        if show is not None:
            line = ", ".join(f"{name} {fmt.format(results[name][-1][show])}" for name in order)
            print(f"  repeat {repeat + 1}/{repeats} ({show}): {line}", flush=True)
    return results


def column(runs: Sequence[Figures], key: str) -> list[float]:
    """One figure over the repeats."""
    return [run[key] for run in runs]


def ratios(results: Mapping[str, Sequence[Figures]], subject: str, baseline: str, key: str) -> list[float]:
    """subject / baseline for ``key``, paired within each repeat."""
    return [s[key] / b[key] for s, b in zip(results[subject], results[baseline], strict=True)]


def print_spread(
    results: Mapping[str, Sequence[Figures]], key: str, *, label: str = "", fmt: str = "{:8.2f}"
) -> None:
    """One line per side: min / median / max of ``key``."""
    print(f"  {label or key} (min / median / max):")
    width = max(len(name) for name in results)
    for name, runs in results.items():
        lo, mid, hi = spread(column(runs, key))
        print(f"    {name:<{width}} : {fmt.format(lo)} / {fmt.format(mid)} / {fmt.format(hi)}")


def print_ratios(
    results: Mapping[str, Sequence[Figures]], baseline: str, key: str, *, goal: str = "", label: str = ""
) -> dict[str, list[float]]:
    """Every other side's ``key`` over the baseline's, per repeat, min / median / max."""
    print(
        f"  {label or key} ratio to {baseline}, per repeat (min / median / max){f'; goal {goal}' if goal else ''}:"
    )
    out = {}
    width = max(len(name) for name in results)
    for name in results:
        if name == baseline:
            continue
        out[name] = ratios(results, name, baseline, key)
        lo, mid, hi = spread(out[name])
        print(f"    {name:<{width}} : {lo:.2f} / {mid:.2f} / {hi:.2f}")
    return out
