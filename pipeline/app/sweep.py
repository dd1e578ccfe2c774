"""Remove the feature files of aborted attempts: ``specstream sweep`` and the end of a run.

Every attempt at a sample writes its own file (:mod:`pipeline.storage`), and only the file a
committed ref names is the sample's. An attempt whose transaction aborted (a generator killed,
fenced or revoked between its ``put`` and its commit) leaves a file that no committed ref names:
an orphan. The sweep lists the run's feature files first, then reads the samples topic
``read_committed`` to its end, keeps every file a committed ref of the run names (even one the
trainer dead-lettered: it is evidence), and deletes the others that are older than a grace
period. A younger file may belong to a transaction still open, whose ref is not visible yet.

At the end of a run (the trainer reached the end of every partition, so every generator has
closed its output) no transaction can still add a ref the trainer would take, and the run
sweeps with no grace. The retention policy (:mod:`pipeline.train.retention`) deletes committed
files; the sweep never touches one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.core.errors import DecodeError, StreamError
from pipeline.core.messages import SampleRef, decode
from pipeline.core.topics import RunTopics, Transport, read_to_end
from pipeline.storage import FeatureStore

__all__ = ("SweepReport", "committed_uris", "sweep_at_end", "sweep_run")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepReport:
    """What a sweep removed (or, dry, would remove) and what it kept."""

    orphans: dict[str, int]  # uri -> bytes
    committed: int  # stored files a committed ref names
    young: int  # unnamed files within the grace period, left alone
    dry_run: bool

    @property
    def nbytes(self) -> int:
        return sum(self.orphans.values())

    def line(self) -> str:
        """One line for people and scripts."""
        verb = "would remove" if self.dry_run else "removed"
        return (
            f"{verb} {len(self.orphans)} orphaned feature files ({self.nbytes} bytes) of aborted attempts; "
            f"kept {self.committed} committed, {self.young} younger than the grace period"
        )


def committed_uris(transport: Transport, run_id: str, *, timeout_s: float = 600.0) -> set[str]:
    """Every uri a committed ref of ``run_id`` names on its samples topic (read to its end), and on
    its regeneration sub-run's, whose files are in the run's own store."""
    topics = RunTopics(run_id)
    with transport.admin() as admin:
        count = admin.partition_count(topics.samples)
        regen = admin.partition_count(topics.regen.samples)  # a storage budget's captures for later epochs
    if count is None:
        raise StreamError(f"run {run_id} has no topics on this broker (no {topics.samples})")
    uris: set[str] = set()
    sources = [(topics.samples, run_id, count)] + ([(topics.regen.samples, topics.regen.run_id, regen)] if regen else [])
    for topic, runs, partitions in sources:
        for record in read_to_end(transport, topic, range(partitions), timeout_s=timeout_s):
            try:
                message = decode(record.value or b"")
            except DecodeError:
                continue  # garbage names no file
            if isinstance(message, SampleRef) and message.run_id == runs:
                uris.add(message.uri)
    return uris


def sweep_run(
    transport: Transport,
    store: FeatureStore,
    *,
    grace_s: float,
    dry_run: bool = False,
    timeout_s: float = 600.0,
) -> SweepReport:
    """Delete (unless ``dry_run``) the run's feature files that no committed ref names and that
    are older than ``grace_s``. The files are listed before the refs are read, so a file whose
    ref commits in between is either seen committed or young."""
    listed = store.listing()
    keep = committed_uris(transport, store.run_id, timeout_s=timeout_s)
    orphans = store.orphans(keep, min_age_s=grace_s, listing=listed)
    if not dry_run:
        for uri in orphans:
            store.delete(uri)
    unnamed = sum(1 for uri in listed if uri not in keep)
    return SweepReport(
        orphans=orphans, committed=len(listed) - unnamed, young=unnamed - len(orphans), dry_run=dry_run
    )


def sweep_at_end(
    transport: Transport, store: FeatureStore, say: Callable[[str], object]
) -> SweepReport | None:
    """The end-of-run sweep, after the trainer reached the end of every partition (no grace: no
    transaction can add a ref the trainer takes any more). It says what it removed; a sweep that
    fails is a warning with the command to run later, never the run's failure."""
    try:
        report = sweep_run(transport, store, grace_s=0.0)
    except Exception as exc:  # the run itself succeeded; the orphans can wait
        logger.debug("end-of-run sweep failed", exc_info=True)  # the line below says it
        say(
            f"orphaned feature files were not swept ({type(exc).__name__}: {exc}): run `specstream sweep --config ...`"
        )
        return None
    if report.orphans:
        say(report.line())
    return report
