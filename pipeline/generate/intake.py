"""A generator's polled prompts, held per partition and handed out as batches that span partitions.

Why: a Kafka consumer hands out one partition's fetched records until they are used up, so a
polled batch usually comes from one partition. With many partitions, each partition's share of
the backpressure watermark (``high_watermark / partitions``) can be smaller than a capture batch:
cutting such a batch at the share and seeking back re-fetched most prompts again and sent
one-sample transactions, and the trainer starved (issue 13: 64 partitions, share 4, batch 8).

The :class:`Intake` keeps what was polled instead, in offset order per partition, pauses the
fetching of a partition that already holds a batch's worth, and builds each batch round-robin
over the partitions (one record each per turn, from a rotating start), within what each
partition's share still allows. Nothing polled is fetched twice unless the worker repositions
(a rebalance or an aborted batch: :meth:`Intake.clear`). A trainer rank also reads its partitions
round-robin, so batches that span partitions feed it evenly.

:func:`check_batch_share` refuses, at start, a configuration where the watermark share of all
the partitions one generator owns is below its batch: batches would be cut to that share.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Mapping

from pipeline.core.errors import ConfigError
from pipeline.core.messages import Prompt
from pipeline.core.progress import PartitionCounters
from pipeline.core.topics import Reader
from pipeline.generate.backlog import Throttle
from pipeline.generate.backpressure import FlowControl, TrainerWindow, Watermarks
from pipeline.generate.planner import Decoded, decode_prompts

__all__ = ("Intake", "batch_share", "check_batch_share")


class Intake:
    """Polled records held per partition; batches taken round-robin within each partition's allowance."""

    def __init__(self, batch_size: int, run_id: str) -> None:
        self.batch_size = batch_size
        self.run_id = run_id
        self._held: dict[int, deque[Decoded]] = {}
        self._turn = 0  # where the next round-robin starts (every partition gets its turn)

    @property
    def held(self) -> int:
        return sum(len(q) for q in self._held.values())

    def add(self, decoded: list[Decoded]) -> None:
        """Hold polled records (in offset order per partition, as polled)."""
        for record, item in decoded:
            self._held.setdefault(record.partition, deque()).append((record, item))

    def clear(self) -> int:
        """Forget everything held (the worker repositions at the committed offsets); how many."""
        dropped = self.held
        self._held.clear()
        return dropped

    def pause(self, reader: Reader, latched: set[int]) -> None:
        """Pause the partitions backpressure holds and those already holding a batch's worth."""
        full = {p for p, q in self._held.items() if len(q) >= self.batch_size}
        want = (latched | full) & set(reader.assignment())
        have = set(reader.paused())
        if want - have:
            reader.pause(sorted(want - have))
        if have - want:
            reader.resume(sorted(have - want))

    def poll(
        self, reader: Reader, throttle: Throttle | None, counters: Callable[[], Mapping[int, PartitionCounters]],
        bytes_per_sample: float, *, timeout_s: float, current: Callable[[], bool],
    ) -> tuple[int, list[Decoded]]:  # fmt: skip
        """Poll into the intake and take a batch across partitions within backpressure's caps:
        (records polled, the batch; empty: poll on). ``current``: whether the worker's positions
        still hold (else what was polled belongs to a changed assignment and is re-read)."""
        allowance: dict[int, int] | None = None
        latched: set[int] = set()
        if throttle is not None:
            own = counters()
            latched = throttle.apply(reader, own, bytes_per_sample)
            allowance = throttle.allowances(reader.assignment(), own, bytes_per_sample)
        self.pause(reader, latched)
        if self.takeable(allowance):
            timeout_s = 0.0  # a batch can start now: take only what is already fetched
        elif throttle is not None:  # held back: wake at the next progress check, not a whole poll later
            timeout_s = min(timeout_s, max(throttle.monitor.interval_s, 0.01))
        records = reader.poll(timeout_s, max_records=self.batch_size)
        if not current():
            return len(records), []
        self.add(decode_prompts(records, self.run_id))
        if len(records) >= self.batch_size and not self.ready(allowance):
            return len(records), []  # more may be fetched already: fill the batch from other partitions
        return len(records), self.take(allowance)

    def takeable(self, allowance: Mapping[int, int] | None) -> int:
        """How many held records a batch could take now (at most a batch)."""
        n = 0
        for p, q in self._held.items():
            n += min(len(q), self._budget(p, q, allowance))
        return min(n, self.batch_size)

    def ready(self, allowance: Mapping[int, int] | None) -> bool:
        return self.takeable(allowance) >= self.batch_size

    def take(self, allowance: Mapping[int, int] | None) -> list[Decoded]:
        """Up to a batch of records, one per partition per turn, each partition in offset order.

        ``allowance``: prompts each partition may still take (None: no backpressure). Markers
        and bad records cost nothing (an end-of-stream marker must never wait on the trainer),
        but nothing passes a prompt its partition has no room for.
        """
        left = dict(allowance) if allowance is not None else None
        order = sorted(self._held)
        if order:
            start = self._turn % len(order)
            order = order[start:] + order[:start]
        out: list[Decoded] = []
        progress = True
        while len(out) < self.batch_size and progress:
            progress = False
            for p in order:
                q = self._held.get(p)
                if not q or len(out) >= self.batch_size:
                    continue
                if isinstance(q[0][1], Prompt) and left is not None:
                    if left.get(p, 0) <= 0:
                        continue
                    left[p] -= 1
                out.append(q.popleft())
                progress = True
        for p in [p for p, q in self._held.items() if not q]:
            del self._held[p]
        self._turn += 1
        return out

    @staticmethod
    def _budget(p: int, q: deque[Decoded], allowance: Mapping[int, int] | None) -> int:
        """Records of ``q`` a batch may take: markers free, prompts up to the allowance."""
        if allowance is None:
            return len(q)
        room, n = allowance.get(p, 0), 0
        for _, item in q:
            if isinstance(item, Prompt):
                if room <= 0:
                    break
                room -= 1
            n += 1
        return n


def batch_share(marks: Watermarks, window: TrainerWindow, partitions: int, owned: int) -> int:
    """The watermark share of the ``owned`` smallest-share partitions: what one generator owning
    that many may hold, so the largest batch its flow control lets through."""
    shares = sorted(FlowControl(marks, window, partitions).high.values())
    return sum(shares[: max(owned, 1)])


def check_batch_share(
    marks: Watermarks, window: TrainerWindow, partitions: int, batch_size: int, owned: int,
    *, batch_key: str = "generate.batch_size",
) -> None:  # fmt: skip
    """Refuse a batch no generator could fill: one owning ``owned`` of the ``partitions`` (the
    fewest any generator gets) must be allowed to hold ``batch_size`` under the high watermark."""
    owned = max(owned, 1)
    share = batch_share(marks, window, partitions, owned)
    if share >= batch_size:
        return
    needed = partitions * math.ceil(batch_size / owned)
    while batch_share(Watermarks(high=needed), window, partitions, owned) < batch_size:
        needed += 1
    raise ConfigError(
        "backpressure.high_watermark",
        f"{batch_key} {batch_size} > the share {share} of backpressure.high_watermark {marks.high} "
        f"that a generator owning {owned} of {partitions} partitions may hold: every batch would be "
        "cut to that share",
        f"raise backpressure.high_watermark to >= {needed}, lower {batch_key} to {share}, "
        "or give each generator more partitions (fewer generators)",
    )
