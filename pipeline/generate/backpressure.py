"""Backpressure for generator workers: pause prompt partitions while the samples backlog is high.

The backlog of a samples partition is what the generators produced there minus what the
trainer has consumed:

- *produced*: the running ``refs`` count the generators commit with their prompt offsets (the
  metadata of the generators' group, read by :mod:`pipeline.generate.backlog`), or, for the
  partitions this worker owns, its own count, which also covers the batches it has captured but
  not yet committed (so a worker never outruns its own view by more than one batch);
- *consumed*: the trainer's step progress, i.e. the newest ledger record's ``records`` count per
  partition (no ledger record yet: nothing consumed). Not the checkpoint-time group commit, so
  the watermark need not cover a whole checkpoint interval.

Why per partition and not one global number: a trainer rank takes its samples round-robin over
its partitions in a fixed order (``SampleStream``), so it blocks on its emptiest partition. A
global watermark could fill some partitions to the brim and pause the one the trainer is
waiting on: a deadlock. Each open partition therefore gets a share of the watermark, in
proportion to what its rank needs from it for one optimizer step plus prefetch (and at least
that), and a configuration where that cannot hold is refused at start (:func:`check_watermarks`).
When a partition ends, its share goes to the open partitions of the same rank.

A worker builds every batch within what each partition's share still allows (counting its own
captured but uncommitted batches), holding the rest of what it polled for later
(:mod:`pipeline.generate.intake`), so the backlog of a partition never exceeds its share and the
total never exceeds the high watermark, with any number of workers (each partition has one owner). End-of-stream markers always pass: the trainer needs them
to finish. The partition is paused at its cap and resumed at its share of the low watermark.

Bytes watermarks use the worker's measured bytes per sample; as in SpecForge they can never cap
a partition below what the trainer needs for one step, so they cannot deadlock either.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from pipeline.core.errors import ConfigError

__all__ = (
    "TrainerWindow",
    "Watermarks",
    "partition_needs",
    "required_high_watermark",
    "check_watermarks",
    "peak_backlog",
    "FlowControl",
    "Backlog",
)


@dataclass(frozen=True)
class TrainerWindow:
    """What the trainer must hold before it can report progress (one global step + prefetch).

    ``prefetch`` is in samples per rank (what a rank's prefetch thread fetches ahead of the step
    being assembled).
    """

    world_size: int
    batch_size: int
    grad_accum: int = 1
    prefetch: int = 0

    def __post_init__(self) -> None:
        for name in ("world_size", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError(f"trainer.{name}", f"must be at least 1, got {getattr(self, name)}")
        if self.prefetch < 0:
            raise ConfigError("trainer.prefetch", f"must not be negative, got {self.prefetch}")

    @property
    def per_rank(self) -> int:
        return self.batch_size * self.grad_accum + self.prefetch

    @property
    def samples(self) -> int:
        """``world_size * batch_size * grad_accum`` plus every rank's prefetch."""
        return self.world_size * self.per_rank


@dataclass(frozen=True)
class Watermarks:
    """Pause above ``high``, resume at or below ``low`` (samples; optional bytes twins).

    ``low`` defaults to three quarters of ``high``; ``check_interval_s`` bounds how often the
    remote state (group offsets, ledger) is read: never per record.
    """

    high: int
    low: int | None = None
    high_bytes: int | None = None
    low_bytes: int | None = None
    check_interval_s: float = 0.5

    @property
    def low_samples(self) -> int:
        return self.low if self.low is not None else (self.high * 3) // 4

    @property
    def low_bytes_or_default(self) -> int | None:
        if self.high_bytes is None:
            return None
        return self.low_bytes if self.low_bytes is not None else (self.high_bytes * 3) // 4


def _rank_partitions(window: TrainerWindow, partitions: int) -> list[list[int]]:
    return [[p for p in range(partitions) if p % window.world_size == r] for r in range(window.world_size)]


def partition_needs(
    window: TrainerWindow, partitions: int, ended: Iterable[int] = ()
) -> dict[int, int]:
    """Samples each open partition must be allowed to hold so that its rank can finish a step.

    Rank ``r`` reads its open partitions (``p % world_size == r``, not yet ended) round-robin,
    so one step plus prefetch of ``n`` samples takes at most ``ceil(n / k)`` from each of its
    ``k`` open partitions. Ended partitions need nothing (and their rank's others need more).
    """
    closed = set(ended)
    needs: dict[int, int] = {}
    for owned in _rank_partitions(window, partitions):
        open_ = [p for p in owned if p not in closed]
        for p in open_:
            needs[p] = math.ceil(window.per_rank / len(open_))
    return needs


def required_high_watermark(window: TrainerWindow, partitions: int) -> int:
    """The smallest high watermark that can never starve a rank, whichever partitions end first.

    ``world_size * (batch_size * grad_accum + prefetch)`` when the per-rank window divides
    evenly over the rank's partitions; a little more when it does not (rounding per partition).
    """
    total = 0
    for owned in _rank_partitions(window, partitions):
        if owned:
            total += max(math.ceil(window.per_rank / k) * k for k in range(1, len(owned) + 1))
    return max(total, window.samples)


def peak_backlog(marks: Watermarks, window: TrainerWindow, partitions: int) -> int:
    """The most samples the generators keep produced but not yet stepped: the high watermark,
    plus the trainer window that open partitions are never refused when ended partitions still
    hold the rest of the watermark (the prefetch and the batches in flight are part of both)."""
    return marks.high + required_high_watermark(window, partitions)


def _floor_shares(total: int, needs: Mapping[int, int]) -> dict[int, int]:
    """Split a watermark over the partitions in proportion to their needs (never over the total)."""
    weight = sum(needs.values())
    return {p: (total * n) // weight for p, n in needs.items()} if weight else {}


def check_watermarks(marks: Watermarks, window: TrainerWindow, partitions: int | None = None) -> None:
    """Refuse, with the setting's name, any watermark that could deadlock the trainer."""
    if marks.high < window.samples:
        raise ConfigError(
            "backpressure.high_watermark",
            f"{marks.high} samples is below one trainer window of {window.samples} "
            f"(world_size {window.world_size} x batch_size {window.batch_size} x grad_accum "
            f"{window.grad_accum} + prefetch {window.prefetch} per rank): the generators would "
            "pause before the trainer can report a single step, a deadlock",
            f"set backpressure.high_watermark >= {window.samples}",
        )
    if not 0 <= marks.low_samples < marks.high:
        raise ConfigError(
            "backpressure.low_watermark",
            f"{marks.low_samples} must be in [0, high_watermark {marks.high})",
        )
    if marks.high_bytes is not None:
        low_bytes = marks.low_bytes_or_default
        if marks.high_bytes <= 0 or low_bytes is None or not 0 <= low_bytes < marks.high_bytes:
            raise ConfigError(
                "backpressure.low_watermark_bytes",
                f"{low_bytes} must be in [0, high_watermark_bytes {marks.high_bytes})",
            )
    if marks.check_interval_s < 0:
        raise ConfigError("backpressure.check_interval_s", "must not be negative")
    if partitions is None:
        return
    if partitions < window.world_size:
        raise ConfigError(
            "partitions",
            f"{partitions} partitions cannot feed {window.world_size} trainer ranks",
            f"use at least {window.world_size} partitions (a multiple of the world size)",
        )
    required = required_high_watermark(window, partitions)
    if marks.high < required:
        raise ConfigError(
            "backpressure.high_watermark",
            f"{marks.high} samples over {partitions} partitions leaves some partition less than "
            f"its trainer rank needs for one step once the window ({window.per_rank} per rank) "
            f"is rounded up per partition",
            f"set backpressure.high_watermark >= {required}, or use a partition count that "
            f"divides the per-rank window",
        )


@dataclass
class Backlog:
    """One partition's backlog as the flow control sees it."""

    produced: int
    consumed: int

    @property
    def samples(self) -> int:
        return max(self.produced - self.consumed, 0)


class FlowControl:
    """Per-partition caps with hysteresis.

    Each open partition gets a share of the watermarks in proportion to what its rank needs from
    it (shares sum to at most the watermark less what ended partitions still hold, and each is at
    least the need: see :func:`check_watermarks`). :meth:`allowance` caps how many more samples a
    partition may take now (the worker builds its batches within it), so the total backlog never
    exceeds the high watermark, or, once ended partitions hold most of it, the trainer window
    on top of what they hold (:func:`peak_backlog`); :meth:`update` latches a pause at the cap
    and releases it at the low share.
    """

    def __init__(self, marks: Watermarks, window: TrainerWindow, partitions: int) -> None:
        check_watermarks(marks, window, partitions)
        self.marks = marks
        self.window = window
        self.partitions = partitions
        self.latched: set[int] = set()
        self._ended: tuple[frozenset[int], int] | None = None
        self._reshare(frozenset())

    def _reshare(self, ended: frozenset[int], held: int = 0) -> None:
        if (ended, held) == self._ended:
            return
        self._ended = (ended, held)
        self.needs = partition_needs(self.window, self.partitions, ended)
        # What ended partitions still hold (the trainer has yet to read it) counts against the
        # watermark, but an open partition is never capped below what its rank needs for a step.
        self.high = _floor_shares(max(self.marks.high - held, sum(self.needs.values())), self.needs)
        self.low = {p: min(s, self.high[p] - 1) for p, s in _floor_shares(self.marks.low_samples, self.needs).items()}
        self.high_bytes = _floor_shares(self.marks.high_bytes, self.needs) if self.marks.high_bytes else None
        low_bytes = self.marks.low_bytes_or_default
        self.low_bytes = _floor_shares(low_bytes, self.needs) if low_bytes is not None else None

    def update(
        self, backlog: Mapping[int, Backlog], bytes_per_sample: float, ended: Iterable[int] = ()
    ) -> set[int]:
        """The partitions to keep paused, given their backlog now."""
        closed = frozenset(ended)
        self._reshare(closed, sum(b.samples for p, b in backlog.items() if p in closed))
        for p, b in backlog.items():
            if p not in self.high:  # ended: nothing left to pause
                self.latched.discard(p)
                continue
            if p in self.latched:
                nbytes = b.samples * bytes_per_sample
                below_low = b.samples <= self.low[p] and (self.low_bytes is None or nbytes <= self.low_bytes[p])
                # Whatever the low share says, a partition holding less than its rank needs for
                # one step must flow again: the trainer may be waiting on exactly this partition,
                # and it reports progress (which lowers the backlog) only after a whole step.
                if below_low or b.samples < self.needs[p]:
                    self.latched.discard(p)
            elif self.allowance(p, b.samples, bytes_per_sample) <= 0:
                self.latched.add(p)
        return set(self.latched)

    def allowance(self, partition: int, backlog: int, bytes_per_sample: float) -> int:
        """How many more samples the partition may take now (bytes never cut below one step)."""
        if partition not in self.high:
            return 0
        allowed = self.high[partition] - backlog
        if self.high_bytes is not None and bytes_per_sample > 0:
            by_bytes = math.floor((self.high_bytes[partition] - backlog * bytes_per_sample) / bytes_per_sample)
            allowed = min(allowed, max(by_bytes, self.needs[partition] - backlog))
        return max(allowed, 0)
