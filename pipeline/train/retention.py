"""Which feature files and checkpoints may go, once a new checkpoint is durable.

A checkpoint resumes from its stream positions, so it needs every sample consumed *after* them.
Each checkpoint lists, in ``interval.json``, the files first consumed between the previous
checkpoint and itself (tail samples included at the end of the stream). With retained checkpoints
``c_1 < ... < c_k`` (the newest ``keep_last``), the files of interval ``j`` are needed only by
checkpoints older than ``j``; so the files of every interval up to and including the oldest
retained one are consumed before every retained checkpoint's positions and can be deleted.

Policy ``delete`` (consume once) deletes them; ``retain`` (replay, later epochs) keeps every file
and only prunes old checkpoints. Order makes it crash safe: feature files first (idempotent
deletes), a marker, then the checkpoint directory; a crash anywhere repeats harmless deletes on
the next pass and never removes a file a retained checkpoint needs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from pipeline.train.checkpoint import CheckpointInfo, CheckpointManager

__all__ = ("RetentionPolicy", "RetentionReport", "apply_retention")

logger = logging.getLogger(__name__)

RetentionPolicy = Literal["delete", "retain"]


@dataclass(frozen=True)
class RetentionReport:
    """What one retention pass removed, for the log."""

    checkpoints_removed: list[str]
    features_deleted: int


def apply_retention(
    manager: CheckpointManager,
    policy: RetentionPolicy,
    delete_feature: Callable[[str], None],
) -> RetentionReport:
    """Prune checkpoints beyond ``keep_last`` and, under ``delete``, the features none can need.

    :param delete_feature: deletes one feature file by its uri (idempotent, e.g.
        :meth:`pipeline.storage.FeatureStore.delete`)
    """
    if policy not in ("delete", "retain"):
        raise ValueError(f"unknown retention policy {policy!r}: use 'delete' or 'retain'")
    found = manager.list()
    if not found:
        return RetentionReport([], 0)
    retained = found[-manager.keep_last :]
    oldest = retained[0]
    doomed: list[CheckpointInfo] = found[: len(found) - len(retained)]
    deleted = 0
    if policy == "delete":
        for info in [*doomed, oldest]:
            if manager.features_deleted(info):
                continue
            uris = manager.interval(info)
            for uri in uris:
                delete_feature(uri)
            deleted += len(uris)
            manager.mark_features_deleted(info)
    for info in doomed:
        manager.remove(info)
    if doomed or deleted:
        logger.info(
            "retention (%s): removed checkpoints %s, deleted %d feature files consumed before %s",
            policy,
            [i.name for i in doomed],
            deleted,
            oldest.name,
        )
    return RetentionReport([i.name for i in doomed], deleted)
