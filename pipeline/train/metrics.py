"""Per-step training metrics: a JSONL file, a progress bar, and the throughput/data-wait figures.

Rank 0 writes one JSON object per optimizer step (appending, so a resumed run continues the file;
:func:`read_metrics` drops the rows a crashed attempt wrote after its last checkpoint). Ratios
that span ranks are computed from summed numerators and denominators, never by averaging
per-rank ratios.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.feedback import NullBar, Progress, open_bar

__all__ = ("StepRecord", "RankTiming", "MetricsLog", "ProgressBar", "read_metrics", "ThroughputTotals")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankTiming:
    """One rank's share of one step, gathered to rank 0 with the ledger progress."""

    samples: int
    tokens: int
    step_s: float  # wall time of the whole step on this rank (wait for data included)
    wait_s: float  # time blocked on the prefetch queue
    sync_s: float  # time in the step vote (waiting for the slowest rank)
    prepare_s: float = 0.0  # prefetch-thread time to fetch, verify and collate this step's samples


@dataclass(frozen=True)
class StepRecord:
    """One optimizer step's losses, accuracies, throughput and data wait: one metrics JSONL row."""

    step: int
    loss: float
    ploss: list[float]
    acc: list[float]
    acceptance_rate: list[float]
    acceptance_length: float
    lr: float
    samples: int
    tokens: int
    step_s: float
    samples_per_s: float
    tokens_per_s: float
    data_wait_frac: float  # this step, slowest rank
    data_wait_frac_total: float  # since the start of this process, slowest rank
    prepare_frac: float  # fetch+verify+collate time / step time (what prefetching hides), slowest rank
    grad_norm: float
    time: float

    @classmethod
    def build(
        cls,
        *,
        step: int,
        summary: dict[str, Any],
        lr: float,
        timings: list[RankTiming],
        totals: ThroughputTotals,
        grad_norm: float,
        now: float,
    ) -> StepRecord:
        step_s = max(t.step_s for t in timings)
        samples = sum(t.samples for t in timings)
        tokens = sum(t.tokens for t in timings)
        return cls(
            step=step,
            loss=float(summary["loss"]),
            ploss=list(summary["ploss"]),
            acc=list(summary["acc"]),
            acceptance_rate=list(summary["acceptance_rate"]),
            acceptance_length=float(summary["acceptance_length"]),
            lr=lr,
            samples=samples,
            tokens=tokens,
            step_s=step_s,
            samples_per_s=samples / step_s if step_s > 0 else 0.0,
            tokens_per_s=tokens / step_s if step_s > 0 else 0.0,
            data_wait_frac=max((t.wait_s / t.step_s if t.step_s > 0 else 0.0) for t in timings),
            data_wait_frac_total=totals.wait_fraction(),
            prepare_frac=max((t.prepare_s / t.step_s if t.step_s > 0 else 0.0) for t in timings),
            grad_norm=grad_norm,
            time=now,
        )


@dataclass
class ThroughputTotals:
    """Running per-rank sums since this process started (for the overall data-wait fraction)."""

    step_s: list[float] = field(default_factory=list)
    wait_s: list[float] = field(default_factory=list)

    def add(self, timings: list[RankTiming]) -> None:
        if not self.step_s:
            self.step_s = [0.0] * len(timings)
            self.wait_s = [0.0] * len(timings)
        for i, t in enumerate(timings):
            self.step_s[i] += t.step_s
            self.wait_s[i] += t.wait_s

    def wait_fraction(self) -> float:
        """The slowest rank's share of step time spent waiting for data."""
        fractions = [w / s for w, s in zip(self.wait_s, self.step_s) if s > 0]
        return max(fractions, default=0.0)


class MetricsLog:
    """Appends one JSON line per step; flushed per line so a crash loses at most one."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path else None
        self._handle = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = self.path.open("a", encoding="utf-8")

    def write(self, record: StepRecord | dict[str, Any]) -> None:
        if self._handle is None:
            return
        row = asdict(record) if isinstance(record, StepRecord) else dict(record)
        self._handle.write(json.dumps(row) + "\n")
        self._handle.flush()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The step rows that count: a repeated step discards it and every later row before it."""
    rows: list[dict[str, Any]] = []
    p = Path(path)
    if not p.is_file():
        return rows
    for line in p.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:  # a line torn by a crash
            continue
        if "step" not in row:
            continue
        while rows and rows[-1]["step"] >= row["step"]:
            rows.pop()
        rows.append(row)
    return rows


class ProgressBar:
    """Rank 0's training bar on stderr: tqdm on a terminal, a plain line per half minute in a log.

    ``total`` is the schedule's length when it is known (``max_steps``, or the cosine schedule's
    steps); None trains "to the end of the stream" (count and rate, no ETA).
    """

    def __init__(self, *, enabled: bool, total: int | None, initial: int = 0) -> None:
        self._bar: Progress = NullBar()
        if enabled:
            desc = "training" if total else "training (to the end of the stream)"
            self._bar = open_bar(sys.stderr, desc, total=total, unit="step", initial=initial)

    def update(self, record: StepRecord) -> None:
        self._bar.update(
            1,
            loss=f"{record.loss:.3f}",
            acc0=f"{record.acc[0]:.3f}" if record.acc else "-",
            tau=f"{record.acceptance_length:.2f}",
            sps=f"{record.samples_per_s:.1f}",
            wait=f"{100 * record.data_wait_frac_total:.1f}%",
        )

    def close(self) -> None:
        """Idempotent: the trainer closes it before its summary line, the reporter again at exit."""
        self._bar.close()
        self._bar = NullBar()
