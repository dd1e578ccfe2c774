"""Capture the held-out eval set once, beside the training prompts.

The eval prompts are a sub-run of their own (``RunTopics.eval``: ``<run>.eval``, one
partition), so a generator captures them with an ordinary :class:`GeneratorWorker` over that
sub-run: the same consume-transform-produce transactions make the capture exactly once (a
restart skips what was committed; a second worker finds the partition ended or owned), and the
features land under ``<storage root>/<run>.eval/``, where the trainer's retention (which deletes
only its own run's files) never looks. Which worker captures it:

- group mode (no fixed partitions): every worker joins the eval sub-run's group; the broker
  gives the one partition to one of them, the others leave once it has ended;
- fixed partitions: the worker that owns training partition 0 (under a claim on the eval
  partition, like its own); the others skip it.

It runs on a thread of its own beside the worker's training capture (:class:`EvalCapture`),
sharing the target one capture at a time (:class:`~pipeline.generate.backend.SharedTarget`):
its start-up (a claim, a transactional producer, the wait for its partition's end) would
otherwise delay the first training sample, and a worker that does not own the eval partition
would wait for whoever does. Rank 0 of the trainer loads the set from the start of training,
ahead of its first evaluation, with a bounded wait. A failure of the capture stops the worker at
its next poll, with the capture's error.

No backpressure: the eval set is small and read by the trainer once.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future
from concurrent.futures import wait as futures_wait
from dataclasses import replace
from typing import TYPE_CHECKING

from pipeline.core.background import in_background
from pipeline.generate.config import GeneratorConfig
from pipeline.generate.stats import GeneratorStats
from pipeline.storage import FeatureStore

if TYPE_CHECKING:
    from pipeline.generate.worker import GeneratorWorker

__all__ = ("EvalCapture", "eval_config", "eval_store")

logger = logging.getLogger(__name__)


class EvalCapture:
    """``worker``'s share of the eval capture, on a thread beside its own capture (a no-op when
    it has none); :meth:`start` takes the worker's stop, which :meth:`wait` passes on."""

    def __init__(self, worker: GeneratorWorker) -> None:
        self._worker = worker
        self._outer = threading.Event()
        self._stop = threading.Event()  # the capture's own: the worker's stop, or the worker failed
        self._future: Future[GeneratorStats] | None = None
        self._close_s = worker.config.drain_timeout_s + 30.0  # its writer's drain, then its clients

    def start(self, stop: threading.Event) -> None:
        """Start the capture, when this worker has a share of it."""
        worker, config = self._worker, eval_config(self._worker.config)
        self._outer = stop
        if config is None or stop.is_set():
            return
        sub = type(worker)(worker.transport, eval_store(worker.store, config), worker.target, config)
        self._future = in_background(f"{config.worker_id}-eval", _capture, sub, self._stop)

    def raise_if_failed(self) -> None:
        """Re-raise the capture's error on the worker's thread (its loop calls this every poll)."""
        if self._future is not None and self._future.done() and self._future.exception() is not None:
            self._future.result()

    def wait(self) -> GeneratorStats | None:
        """Wait for the capture to end (the worker's stop stops it too), then re-raise its error."""
        while self._future is not None:
            try:
                return self._future.result(timeout=0.2)
            except TimeoutError:
                if self._future.done():  # the capture's own TimeoutError, not the wait's
                    raise
                if self._outer.is_set():
                    self._stop.set()
        return None

    def cancel(self) -> None:
        """Stop the capture and wait for it to close its clients (the worker is failing or
        stopping; the capture's own close is bounded by its drain timeout)."""
        self._stop.set()
        if self._future is not None:
            done, _ = futures_wait([self._future], timeout=self._close_s)
            if not done:  # a capture stuck in the target: the process exit ends it
                logger.warning("the eval capture did not stop within %.0f s", self._close_s)


def _capture(sub: GeneratorWorker, stop: threading.Event) -> GeneratorStats:
    stats = sub.run(stop)
    logger.info("%s: eval set captured (%d refs by this worker) in %.1f s",
                sub.config.worker_id, stats.refs, stats.wall_s)  # fmt: skip
    return stats


def eval_config(config: GeneratorConfig) -> GeneratorConfig | None:
    """The eval capture's worker settings for this worker, or None when it has none to do."""
    if config.eval_run_id is None:
        return None
    if config.partitions is not None and 0 not in config.partitions:
        return None
    return replace(
        config,
        run_id=config.eval_run_id,
        partitions=None if config.partitions is None else [0],
        backpressure=None,
        trainer=None,
        exit_when_done=True,
        eval_run_id=None,
        heartbeat_interval_s=None,  # the worker's own heartbeat covers the capture
    )


def eval_store(store: FeatureStore, config: GeneratorConfig) -> FeatureStore:
    """The eval sub-run's feature store: the same root, the sub-run's own directory."""
    return FeatureStore(store.root_url, config.run_id, durable=store.durable, storage_options=store.storage_options)
