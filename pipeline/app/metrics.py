"""Prometheus metrics as views over the counters the stages already keep (issue 10, item 6).

Nothing here counts: :class:`RunCollector` reads, at scrape time, the live objects of this
process (each generator worker's :class:`~pipeline.generate.stats.GeneratorStats`, each trainer
rank's step, samples and newest step record) and the run's per-partition produced and trained
counts from :func:`pipeline.app.status.run_status`. That read goes to Kafka, so it is cached
(:class:`StatusCache`: at most one read every 5 s, on its own thread; a scrape waits for it at most
about a second), and an idle exporter does no work at all. The read is the light one
(``full=False``: the partitions' counts, not the DLQ or heartbeats), about 0.06 s of CPU.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.registry import Collector

from pipeline.app.status import RunStatus, run_status
from pipeline.core.topics import Transport

if TYPE_CHECKING:
    from pipeline.generate.worker import GeneratorWorker
    from pipeline.train.trainer import Trainer

__all__ = ("LiveProcess", "RunCollector", "StatusCache", "status_reader")

logger = logging.getLogger(__name__)

PREFIX = "specstream_"
PROC = ("run", "role", "id")  # the labels of one process's (or thread's) own figures


@dataclass
class LiveProcess:
    """What this process runs, for the collector to read: the app layer registers the live objects.

    ``transport`` is where the run's per-partition counts are read (None: no lag yet; a generator
    brings its own)."""

    run_id: str
    transport: Transport | None = None
    generators: list[GeneratorWorker] = field(default_factory=list)
    trainers: list[Trainer] = field(default_factory=list)

    def watch_generator(self, worker: GeneratorWorker) -> None:
        if self.transport is None:
            self.transport = worker.transport
        self.generators.append(worker)

    def watch_trainer(self, trainer: Trainer) -> None:
        self.trainers.append(trainer)


class StatusCache:
    """``run_status`` at most every ``every_s``, read on a daemon thread started by a scrape.

    A scrape waits for a fresh read at most ``wait_s`` and otherwise serves the last one (or
    none yet): a slow or unreachable broker never holds a scrape longer. ``read`` is injectable
    for tests."""

    def __init__(
        self,
        read: Callable[[], RunStatus],
        *,
        every_s: float = 5.0,
        wait_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._read = read
        self.every_s = every_s
        self.wait_s = wait_s
        self._clock = clock
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._status: RunStatus | None = None
        self._started_at: float | None = None
        self.read_at: float | None = None  # clock() when the served status was read
        self.error: str | None = None  # the last failed read, one line

    def latest(self) -> RunStatus | None:
        """The freshest status this scrape can have within ``wait_s``."""
        with self._lock:
            due = self._started_at is None or self._clock() - self._started_at >= self.every_s
            if due and (self._thread is None or not self._thread.is_alive()):
                self._started_at = self._clock()
                self._thread = threading.Thread(target=self._refresh, name="metrics-status", daemon=True)
                self._thread.start()
            thread = self._thread
        if thread is not None:
            thread.join(self.wait_s)
        return self._status

    def _refresh(self) -> None:
        try:
            status = self._read()
        except Exception as exc:  # noqa: BLE001 - topics not created yet, broker away: serve no lag
            self.error = f"{type(exc).__name__}: {exc}"
            logger.debug("metrics: run status unavailable: %s", self.error)
            return
        self._status, self.read_at, self.error = status, self._clock(), None

    def age(self) -> float:
        """Seconds since the served status was read (0 before any)."""
        return 0.0 if self.read_at is None else max(0.0, self._clock() - self.read_at)


def status_reader(transport: Transport, run_id: str, timeout_s: float = 10.0) -> Callable[[], RunStatus]:
    """The per-partition counts ``specstream status`` reads, as the cache's read (one counting path
    for both; only the partitions: the DLQ and heartbeats are ``status``'s, not a scrape's)."""
    return lambda: run_status(transport, run_id, timeout_s=timeout_s, full=False)


class RunCollector(Collector):
    """Yields this process's metric families at scrape time (register it in a ``CollectorRegistry``)."""

    def __init__(
        self,
        live: LiveProcess,
        *,
        status_every_s: float = 5.0,
        status_wait_s: float = 1.0,
        status: StatusCache | None = None,
    ) -> None:
        self.live = live
        self._every_s, self._wait_s = status_every_s, status_wait_s
        self._cache = status  # given: read from it whatever the transport (tests)
        self._fixed = status is not None
        self._cache_for: Transport | None = None

    def status_cache(self) -> StatusCache | None:
        """The cache for the live transport (made once one is known)."""
        transport = self.live.transport
        if self._fixed or transport is None:
            return self._cache
        if self._cache is None or self._cache_for is not transport:
            self._cache = StatusCache(status_reader(transport, self.live.run_id), every_s=self._every_s,
                                      wait_s=self._wait_s)  # fmt: skip
            self._cache_for = transport
        return self._cache

    def collect(self) -> Iterator[Metric]:
        dropped = _counter("samples_dead_lettered", "Records this process sent to the DLQ (generator: prompts, "
                           "trainer: samples)")  # fmt: skip
        yield from self._generators(dropped)
        yield from self._trainers(dropped)
        yield dropped
        yield from self._partitions()

    def _generators(self, dropped: CounterMetricFamily) -> Iterator[Metric]:
        run = self.live.run_id
        produced = _counter("samples_produced", "Samples this generator published (committed transactions)")
        written = _counter("feature_bytes_written", "Feature bytes this generator wrote to storage (committed)")
        commits = SummaryMetricFamily(
            PREFIX + "transaction_commit_seconds", "Committed transactions and their seconds (send + commit)",
            labels=PROC,
        )  # fmt: skip
        paused = _gauge("backpressure_paused", "1 while backpressure pauses every prompt partition of this worker")
        paused_s = _counter("backpressure_paused_seconds", "Seconds this worker spent paused by backpressure")
        pauses = _counter("backpressure_pauses", "Times backpressure paused prompt partitions of this worker")
        now = time.monotonic()  # the clock of GeneratorStats.paused_since
        for worker in list(self.live.generators):
            s = worker.stats
            labels = [run, "generator", worker.config.worker_id]
            since = s.paused_since
            produced.add_metric(labels, s.refs)
            dropped.add_metric(labels, s.dropped)
            written.add_metric(labels, s.nbytes)
            commits.add_metric(labels, count_value=s.batches, sum_value=s.commit_s)
            paused.add_metric(labels, 0 if since is None else 1)
            paused_s.add_metric(labels, s.paused_s + (0.0 if since is None else max(0.0, now - since)))
            pauses.add_metric(labels, s.pauses)
        yield from (produced, written, commits, paused, paused_s, pauses)

    def _trainers(self, dropped: CounterMetricFamily) -> Iterator[Metric]:
        run = self.live.run_id
        trained = _counter("samples_trained", "Samples this trainer rank stepped (every attempt of the run)")
        step = _gauge("trainer_step", "The last optimizer step")
        step_s = _gauge("trainer_step_seconds", "Wall time of the last step, slowest rank (rank 0)")
        wait = _gauge("trainer_data_wait_ratio", "Share of step time spent waiting for data since this process "
                      "started, slowest rank (rank 0)")  # fmt: skip
        rate = _gauge("trainer_samples_per_second", "Samples per second of the last step, all ranks (rank 0)")
        for trainer in list(self.live.trainers):
            labels = [run, "trainer", f"rank-{trainer.dist.rank}"]  # the heartbeat's id
            trained.add_metric(labels, trainer.trained_local)
            step.add_metric(labels, trainer.step)
            state = trainer.state  # the stream state after the last stepped sample
            dropped.add_metric(labels, state.dead_letters if state is not None else 0)
            records = trainer.records  # rank 0's step rows, appended live by its reporter
            if records:
                last = records[-1]
                step_s.add_metric(labels, last.step_s)
                wait.add_metric(labels, last.data_wait_frac_total)
                rate.add_metric(labels, last.samples_per_s)
        yield from (trained, step, step_s, wait, rate)

    def _partitions(self) -> Iterator[Metric]:
        cache = self.status_cache()
        status = cache.latest() if cache is not None else None
        if cache is None or status is None:
            return
        run = [self.live.run_id]
        by = ("run", "partition")
        lag = _gauge("consumer_lag", "Samples produced but not yet trained, per samples partition", by)
        produced = _gauge("partition_samples_produced", "Samples the generators committed to the partition", by)
        trained = _gauge("partition_samples_trained", "Samples of the partition the trainers stepped (ledger)", by)
        for p in status.partitions:
            labels = [*run, str(p.partition)]
            lag.add_metric(labels, p.backlog)
            produced.add_metric(labels, p.produced)
            trained.add_metric(labels, p.consumed)
        age = _gauge("run_status_age_seconds", "Age of the per-partition figures (read every few seconds)", ("run",))
        age.add_metric(run, cache.age())
        yield from (lag, produced, trained, age)


def _counter(name: str, doc: str, labels: tuple[str, ...] = PROC) -> CounterMetricFamily:
    return CounterMetricFamily(PREFIX + name, doc, labels=labels)


def _gauge(name: str, doc: str, labels: tuple[str, ...] = PROC) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, doc, labels=labels)
