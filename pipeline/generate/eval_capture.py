"""Capture the held-out eval set once, before the training prompts.

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

No backpressure: the eval set is small and read by the trainer once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from pipeline.generate.backend import Capture, PromptTokens, TargetBackend, TargetInfo
from pipeline.generate.config import GeneratorConfig
from pipeline.generate.stats import GeneratorStats
from pipeline.storage import FeatureStore

if TYPE_CHECKING:
    from pipeline.generate.worker import GeneratorWorker

__all__ = ("BorrowedBackend", "eval_config", "eval_store", "capture_eval_set")

logger = logging.getLogger(__name__)


def capture_eval_set(worker: GeneratorWorker, stop: threading.Event) -> GeneratorStats | None:
    """Run ``worker``'s share of the eval capture (a worker of its class over the eval sub-run,
    lending it the target); None when it has none to do."""
    config = eval_config(worker.config)
    if config is None or stop.is_set():
        return None
    store, backend = eval_store(worker.store, config), BorrowedBackend(worker.backend)
    stats = type(worker)(worker.transport, store, backend, config).run(stop)
    logger.info(
        "%s: eval set captured (%d refs by this worker) in %.1f s", worker.config.worker_id, stats.refs, stats.wall_s
    )
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


class BorrowedBackend:
    """The worker's target lent to the eval capture: the capture's close leaves it loaded."""

    def __init__(self, backend: TargetBackend) -> None:
        self._backend = backend

    @property
    def info(self) -> TargetInfo:
        return self._backend.info

    def capture(self, prompts: Sequence[PromptTokens]) -> list[Capture]:
        return self._backend.capture(prompts)

    def close(self) -> None:
        """The owner closes the target, not the borrower."""
