"""Serve the regeneration sub-run: capture again, for later epochs, what a storage budget did not keep.

Under ``storage.max_bytes`` with more than one epoch, trainer ranks publish to the sub-run
``<run>.regen`` (``RunTopics.regen``) the prompts of the samples the budget did not keep, with
the epoch they are for (:mod:`pipeline.train.regenerate`). Once its share of the run's own
prompts is done, every generator joins that sub-run as an ordinary :class:`GeneratorWorker`
(group mode, or its same fixed partitions), so the capture is exactly once by the same
consume-transform-produce transactions. The files go to the run's own store (the sample ids
carry the epoch: no two captures share a file), where the trainer reads and deletes them.

No backpressure: the ranks publish only a window ahead of their training, which bounds what
waits on storage. The worker leaves once every rank has closed every sub-run partition, after
the last epoch's needs are out.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import replace
from typing import TYPE_CHECKING

from pipeline.generate.stats import GeneratorStats

if TYPE_CHECKING:
    from pipeline.generate.worker import GeneratorWorker

__all__ = ("serve_regeneration",)

logger = logging.getLogger(__name__)


def serve_regeneration(worker: GeneratorWorker, stop: threading.Event) -> GeneratorStats | None:
    """Run ``worker``'s share of the regeneration sub-run (None: the run has none, or stopped)."""
    sub = worker.config.regen_run_id
    if sub is None or stop.is_set():
        return None
    config = replace(
        worker.config,
        run_id=sub,
        backpressure=None,
        trainer=None,
        exit_when_done=True,
        eval_run_id=None,
        regen_run_id=None,
        heartbeat_interval_s=None,  # the worker's own heartbeat covers it
    )
    logger.info("%s: serving %s (samples captured again for later epochs)", worker.config.worker_id, sub)
    stats = type(worker)(worker.transport, worker.store, worker.target, config).run(stop)
    logger.info("%s: %d samples captured again for later epochs", worker.config.worker_id, stats.refs)
    return stats
