"""The samples backlog as the generators see it, and the throttle that keeps a worker within it.

:class:`BacklogMonitor` reads the remote half of the backlog, rate-limited: what every worker
committed (the ``refs`` counts in the generators' offset metadata) and what the trainer has
consumed (the newest ledger record). :class:`Throttle` applies the flow-control policy of
:mod:`pipeline.generate.backpressure` to one worker's prompt partitions: it pauses those whose
samples partition reached its cap, resumes them at the low share, and says how many more prompts
each partition may take (the worker's intake builds its batches within that).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence

from pipeline.core.errors import StreamError
from pipeline.core.messages import LedgerStep
from pipeline.core.progress import PartitionCounters
from pipeline.core.topics import Admin, Committed, Reader, RunTopics, Transport
from pipeline.core.heartbeat import HeartbeatPublisher
from pipeline.generate.backpressure import Backlog, FlowControl
from pipeline.generate.liveness import PauseReport
from pipeline.generate.stats import GeneratorStats
from pipeline.ledger import LedgerTail

__all__ = ("consumed_from", "slowest", "generator_commits", "BacklogMonitor", "Throttle")

logger = logging.getLogger(__name__)


def consumed_from(step: LedgerStep | None) -> dict[int, int]:
    """Records consumed per samples partition according to one ledger step (none: nothing)."""
    if step is None:
        return {}
    return {position.partition: position.records for rank in step.ranks for position in rank.next_offsets}


def slowest(progress: Iterable[Mapping[int, int]]) -> dict[int, int]:
    """Per partition, the fewest records any trainer group has consumed (a group without a step: 0)."""
    views = list(progress)
    partitions = {p for view in views for p in view}
    return {p: min(view.get(p, 0) for view in views) for p in partitions}


def generator_commits(admin: Admin, topics: RunTopics) -> dict[int, Committed]:
    """The generators' committed prompt offsets (the transport rides out transient answers)."""
    return admin.group_offsets(topics.generator_group, topics.prompts)


class BacklogMonitor:
    """The remote half of the backlog (other workers' commits, trainer progress), rate-limited."""

    def __init__(
        self,
        transport: Transport,
        topics: RunTopics,
        *,
        interval_s: float = 0.5,
        admin: Admin | None = None,
        groups: Sequence[str] = (),
    ) -> None:
        self.topics = topics
        self.interval_s = interval_s
        self._own_admin = admin is None
        self._admin = admin or transport.admin()
        # One ledger per trainer group (``train_groups``); progress is the slowest group's.
        self._ledgers = [LedgerTail(transport, topics.run_id, group=g) for g in (tuple(groups) or (None,))]
        self.produced: dict[int, int] = {}
        self.ended: set[int] = set()
        self.consumed: dict[int, int] = {}
        self._checked_at = -math.inf
        self.ledger_timeout_s = 2.0

    def refresh(self, *, force: bool = False) -> bool:
        """Re-read the remote state when the interval has passed; True when it did."""
        now = time.monotonic()
        if not force and now - self._checked_at < self.interval_s:
            return False
        self._checked_at = now
        commits = generator_commits(self._admin, self.topics)
        committed = {p: PartitionCounters.parse(c.metadata) for p, c in commits.items()}
        self.produced = {p: c.refs for p, c in committed.items()}
        self.ended = {p for p, c in committed.items() if c.ended}
        try:
            self.consumed = slowest(consumed_from(t.latest(timeout_s=self.ledger_timeout_s)) for t in self._ledgers)
        except StreamError as exc:  # a slow read keeps the older (lower, so safe) progress
            logger.warning("backpressure: trainer progress not read (%s); keeping the last", exc)
        return True

    def backlog(self, partitions: Iterable[int], local_produced: Mapping[int, int]) -> dict[int, Backlog]:
        """Per partition: produced (local view wins, it includes uncommitted batches) - consumed."""
        out = {}
        for p in partitions:
            produced = max(local_produced.get(p, 0), self.produced.get(p, 0))
            out[p] = Backlog(produced, self.consumed.get(p, 0))
        return out

    def close(self) -> None:
        """Close the ledger reader, and the admin client when this monitor opened it."""
        for tail in self._ledgers:
            tail.close()
        if self._own_admin:
            self._admin.close()


class Throttle:
    """One worker's flow control: which prompt partitions to pause, and how much each may take.

    ``counters`` are the worker's own counts of the partitions it owns (queued batches
    included); the rest of the backlog comes from the monitor.
    """

    def __init__(
        self, flow: FlowControl, monitor: BacklogMonitor, stats: GeneratorStats, *, name: str,
        heartbeat: HeartbeatPublisher | None = None,
    ) -> None:  # fmt: skip
        self.flow = flow
        self.monitor = monitor
        self.stats = stats
        self.name = name
        self.report = PauseReport(name, flow, stats, heartbeat)  # the log lines and the heartbeat state

    def _backlog(self, assigned: list[int], counters: Mapping[int, PartitionCounters]) -> dict[int, Backlog]:
        """Per partition: produced (ours exact, with queued batches; others' as committed)
        minus the trainer's newest reported progress."""
        local = {p: c.refs for p, c in counters.items() if p in assigned}
        return self.monitor.backlog(range(self.flow.partitions), local)

    def apply(self, reader: Reader, counters: Mapping[int, PartitionCounters], bytes_per_sample: float) -> set[int]:
        """The owned partitions whose backlog reached their cap (to pause), resumed below low."""
        assigned = reader.assignment()
        want: set[int] = set()
        backlog: dict[int, Backlog] = {}
        if assigned:
            self.monitor.refresh()
            backlog = self._backlog(assigned, counters)
            self.stats.max_backlog = max(self.stats.max_backlog, sum(b.samples for b in backlog.values()))
            ended = {p for p, c in counters.items() if c.ended} | self.monitor.ended
            want = self.flow.update(backlog, bytes_per_sample, ended) & set(assigned)
        self.report.update(want, assigned, backlog)
        return want

    def allowances(
        self, assigned: list[int], counters: Mapping[int, PartitionCounters], bytes_per_sample: float
    ) -> dict[int, int]:
        """Per owned partition, how many more prompts its cap allows now (own queued batches
        counted): what the worker's :class:`~pipeline.generate.intake.Intake` may take."""
        backlog = self._backlog(assigned, counters)
        return {p: self.flow.allowance(p, backlog[p].samples, bytes_per_sample) for p in assigned}
