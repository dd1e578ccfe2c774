"""Retention ``delete`` with several trainer groups: the last group to release a feature deletes it.

Each group decides, exactly as a run with one trainer does (:mod:`pipeline.train.retention`),
when it no longer needs a feature: its last epoch consumed it (``Trainer._done_with``) and the
oldest of its retained checkpoints starts after it, so no resume of that group can read it again.
With several groups that decision is one group's only. So instead of deleting, a group
*releases* the feature: it writes an empty marker ``<run>/released/<group>/<uri>`` on the
feature storage, then looks for every other declared group's marker of the same uri; when all
are there, it deletes the feature and the markers.

Why this design: it keeps the per-uri contract the retention pass already has (the checkpoint
intervals of two groups never line up, since their batch shapes, save intervals and epochs may
differ, so a position-based "retention point" would need a per-partition order the features do
not have after the first epoch's shuffles). It is correct under races and crashes because each
group writes its own marker *before* it reads the others': of two groups releasing the same
feature at once, the later writer sees both markers, so the last release always deletes (both
may delete: deletes are idempotent). A crash after the marker and before the delete repeats the
retention pass at the next checkpoint (its interval is not marked done), which finds the markers
and deletes; a pass repeated after the feature went writes no marker. A lost marker only
leaves a feature on storage, never deletes one too early.

Cost: one empty write and ``groups - 1`` existence checks per feature per group, and the deletes;
on an object store these are requests (cheap next to the feature itself). Limit: a group that
never releases a feature (stopped early by ``max_steps``, or never started) keeps it on storage.
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.storage import FeatureStore

__all__ = ("RELEASED_DIR", "GroupRelease")

logger = logging.getLogger(__name__)

#: Under the run's storage root, beside ``features/``: one marker tree per group.
RELEASED_DIR = "released"


class GroupRelease:
    """``delete_feature`` for one group of several: release the uri, delete it once all have."""

    def __init__(self, store: FeatureStore, group: str, groups: Sequence[str]) -> None:
        if group not in groups:
            raise ValueError(f"group {group!r} is not one of the declared groups {list(groups)}")
        self.store = store
        self.group = group
        self.groups = tuple(groups)

    def marker(self, group: str, uri: str) -> str:
        """The absolute path of ``group``'s release marker of ``uri`` (confined like the uri)."""
        feature = self.store.resolve(uri)
        rel = posixpath.relpath(feature, self.store.run_root)
        return posixpath.join(self.store.run_root, RELEASED_DIR, group, rel)

    def released_by(self, uri: str) -> list[str]:
        """The declared groups that have released ``uri`` so far."""
        fs = self.store.fs
        return [g for g in self.groups if fs.exists(self.marker(g, uri))]

    def __call__(self, uri: str) -> None:
        """Release ``uri`` for this group; delete it (and every marker) when every group has."""
        fs, mine = self.store.fs, self.marker(self.group, uri)
        if not self.store.exists(uri):  # the last group deleted it already (a pass repeated after a crash)
            return
        fs.makedirs(posixpath.dirname(mine), exist_ok=True)
        fs.pipe_file(mine, b"")  # mine first, then the others': the last to release sees all
        if any(not fs.exists(self.marker(g, uri)) for g in self.groups if g != self.group):
            return
        self.store.delete(uri)
        for group in self.groups:
            try:
                fs.rm_file(self.marker(group, uri))
            except FileNotFoundError:  # another group deleting at the same time
                pass
        logger.debug("feature %s released by every group (%s): deleted", uri, ", ".join(self.groups))
