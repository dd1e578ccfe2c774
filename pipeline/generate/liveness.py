"""What a generator worker tells its operator: its heartbeat, and when backpressure holds it.

A worker paused by backpressure used to say nothing for as long as the trainer needed: here
:class:`PauseReport` logs one line when partitions pause (their backlog against their cap and the
run's backlog against the high watermark), one when they resume (and how long they waited), and
puts the worker's heartbeat in state ``paused`` with that reason while every partition it owns is
held; the heartbeat publisher then logs a line every interval until it resumes.
:class:`IdleReport` does the same for a group-mode worker that owns no prompt partition.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence

from pipeline.core.heartbeat import HeartbeatPublisher
from pipeline.core.topics import Transport
from pipeline.generate.backpressure import Backlog, FlowControl
from pipeline.generate.config import GeneratorConfig
from pipeline.generate.stats import GeneratorStats

__all__ = ("generator_heartbeat", "IdleReport", "PauseReport")

logger = logging.getLogger(__name__)


def generator_heartbeat(
    transport: Transport, config: GeneratorConfig, stats: GeneratorStats
) -> HeartbeatPublisher:
    """The worker's heartbeat (not started), with its live counts as counters."""

    def counters() -> dict[str, int | float]:
        return {
            "refs": stats.refs,
            "dropped": stats.dropped,
            "batches": stats.batches,
            "tokens": stats.tokens,
            "pauses": stats.pauses,
            "paused_s": round(stats.paused_s, 1),
            "max_backlog": stats.max_backlog,
        }

    return HeartbeatPublisher(
        transport, config.run_id, "generator", config.worker_id, config.heartbeat_interval_s, counters
    )


class PauseReport:
    """Logs and heartbeat state for one worker's backpressure pauses (see module docstring)."""

    def __init__(
        self, name: str, flow: FlowControl, stats: GeneratorStats, heartbeat: HeartbeatPublisher | None = None
    ) -> None:
        self.name = name
        self.flow = flow
        self.stats = stats
        self.heartbeat = heartbeat
        self._held_since: dict[int, float] = {}  # partition -> when backpressure paused it

    def update(self, held: set[int], assigned: Iterable[int], backlog: Mapping[int, Backlog]) -> None:
        """``held``: the owned partitions backpressure keeps paused now; ``backlog``: all partitions."""
        owned = set(assigned)
        now = time.monotonic()
        run_backlog = sum(b.samples for b in backlog.values())
        paused = sorted(held - set(self._held_since))
        if paused:
            self.stats.pauses += 1
            logger.info(
                "%s: backpressure pauses prompt partitions %s: backlog %s >= cap %s (run backlog %d, high watermark %d)",
                self.name, paused, self._of(backlog, paused), self._caps(paused), run_backlog, self.flow.marks.high,
            )  # fmt: skip
            self._held_since.update({p: now for p in paused})
        resumed = sorted(set(self._held_since) - held)
        if resumed:
            waited = max(now - self._held_since.pop(p) for p in resumed)
            logger.info(
                "%s: backpressure resumes prompt partitions %s after %.1f s: backlog %s (low %s, run backlog %d)",
                self.name, resumed, waited, self._of(backlog, resumed),
                [self.flow.low.get(p, 0) for p in resumed], run_backlog,
            )  # fmt: skip
        if held and held >= owned:
            if self.stats.paused_since is None:  # every owned partition held since (metrics read it live)
                self.stats.paused_since = now
            if self.heartbeat is not None:
                self.heartbeat.set_state("paused", self.reason(held, backlog))
        else:
            if self.stats.paused_since is not None:
                self.stats.paused_s += now - self.stats.paused_since
                self.stats.paused_since = None
            if self.heartbeat is not None and self.heartbeat.state == "paused":
                self.heartbeat.set_state("running")

    def reason(self, held: Iterable[int], backlog: Mapping[int, Backlog]) -> str:
        """Why the worker is paused, in one line: what ``status`` shows."""
        parts = sorted(held)
        return (
            f"backpressure: backlog {sum(backlog[p].samples for p in parts if p in backlog)} >= "
            f"cap {sum(self._caps(parts))} on partitions {parts} "
            f"(run backlog {sum(b.samples for b in backlog.values())}, high watermark {self.flow.marks.high})"
        )

    def _caps(self, partitions: Iterable[int]) -> list[int]:
        return [self.flow.high.get(p, 0) for p in partitions]

    @staticmethod
    def _of(backlog: Mapping[int, Backlog], partitions: Iterable[int]) -> list[int]:
        return [backlog[p].samples if p in backlog else 0 for p in partitions]


class IdleReport:
    """Says when a group-mode worker has owned no prompt partition for a while, and when it owns
    some again.

    A group gives each prompt partition to one worker, so workers beyond the partition count stay
    idle, and a worker owns nothing while its group join is under way. Without this the trainer's
    stall line ("nothing written") was the only sign. After ``after_s`` one line is logged and the
    heartbeat says ``waiting`` with the reason (the publisher repeats it every interval).
    """

    def __init__(self, name: str, heartbeat: HeartbeatPublisher | None = None, after_s: float = 30.0) -> None:
        self.name = name
        self.heartbeat = heartbeat
        self.after_s = after_s
        self._since: float | None = None  # owning nothing since
        self._reported = False

    def update(self, assigned: Sequence[int], partitions: int) -> None:
        """The partitions the worker owns now, of the topic's ``partitions`` (once per poll)."""
        now = time.monotonic()
        if assigned:
            if self._reported and self._since is not None:
                logger.info("%s: owns prompt partitions %s again after %.0f s",
                            self.name, list(assigned), now - self._since)  # fmt: skip
                if self.heartbeat is not None:
                    self.heartbeat.set_state("running")
            self._since, self._reported = None, False
            return
        if self._since is None:
            self._since = now
        elif not self._reported and now - self._since >= self.after_s:
            reason = (
                f"owns none of the {partitions} prompt partitions: the group gives each to one worker "
                "(workers beyond the partition count stay idle), or its group join is still under way"
            )
            logger.warning("%s: %s", self.name, reason)
            if self.heartbeat is not None:
                self.heartbeat.set_state("waiting", reason)
            self._reported = True
