"""End-of-stream accounting: a partition ends only at its marker, and only if its count holds.

A stage ends each partition with an ``EndOfStream`` carrying how many records it wrote there
before the marker. A reader counts what it saw (used records plus records it sent to the DLQ) and
compares when the marker arrives: a mismatch is an error, a ``failed`` marker is an error that
wins over any ``complete`` one. With several independent writers per partition (each closing
its own share), the partition ends when every expected writer's marker has arrived.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from pipeline.core.errors import StreamError
from pipeline.core.messages import EndOfStream

__all__ = ("PartitionState", "CompletenessTracker", "Completeness")


@dataclass
class PartitionState:
    """One partition's counts and end-of-stream markers, as the tracker sees them."""

    partition: int
    used: int = 0
    rejected: int = 0
    duplicates: int = 0
    markers: dict[str, EndOfStream] = field(default_factory=dict)

    @property
    def seen(self) -> int:
        return self.used + self.rejected + self.duplicates

    @property
    def expected(self) -> int:
        return sum(m.count for m in self.markers.values())


@dataclass(frozen=True)
class Completeness:
    """The numbers of the run summary: ``N of N trained, 0 missing, D duplicates dropped``."""

    expected: int
    used: int
    rejected: int
    duplicates: int
    partitions_ended: int
    partitions: int

    @property
    def missing(self) -> int:
        return self.expected - self.used - self.rejected - self.duplicates


class CompletenessTracker:
    """Per-partition counts against end-of-stream markers."""

    def __init__(self, partitions: Iterable[int], *, writers_per_partition: int = 1) -> None:
        self.writers = writers_per_partition
        self.states = {p: PartitionState(p) for p in sorted(set(partitions))}

    def _state(self, partition: int) -> PartitionState:
        try:
            return self.states[partition]
        except KeyError:
            raise StreamError(f"record from partition {partition}, which this reader does not own") from None

    def used(self, partition: int) -> None:
        self._check_open(partition)
        self._state(partition).used += 1

    def rejected(self, partition: int) -> None:
        """A record of the stream that went to the DLQ: it still counts against the marker."""
        self._check_open(partition)
        self._state(partition).rejected += 1

    def duplicate(self, partition: int) -> None:
        self._check_open(partition)
        self._state(partition).duplicates += 1

    def _check_open(self, partition: int) -> None:
        if self.ended(partition):
            raise StreamError(f"record after the end-of-stream marker of partition {partition}")

    def end(self, marker: EndOfStream, partition: int | None = None) -> bool:
        """Record a marker; True when the partition has now ended. Raises on failure or mismatch."""
        p = marker.partition if partition is None else partition
        state = self._state(p)
        if marker.status == "failed":
            raise StreamError(f"partition {p} failed upstream ({marker.stage}): {marker.reason}")
        if marker.producer_id in state.markers:
            return self.ended(p)  # a restarted writer repeating its marker
        state.markers[marker.producer_id] = marker
        if not self.ended(p):
            return False
        if state.seen != state.expected:
            raise StreamError(
                f"partition {p}: end-of-stream says {state.expected} records, "
                f"{state.seen} arrived ({state.used} used, {state.rejected} to the DLQ, "
                f"{state.duplicates} duplicates)"
            )
        return True

    def ended(self, partition: int) -> bool:
        return len(self._state(partition).markers) >= self.writers

    def all_ended(self) -> bool:
        return all(self.ended(p) for p in self.states)

    def open_partitions(self) -> list[int]:
        return [p for p in self.states if not self.ended(p)]

    def summary(self) -> Completeness:
        states = list(self.states.values())
        return Completeness(
            expected=sum(s.expected for s in states),
            used=sum(s.used for s in states),
            rejected=sum(s.rejected for s in states),
            duplicates=sum(s.duplicates for s in states),
            partitions_ended=sum(1 for s in states if len(s.markers) >= self.writers),
            partitions=len(states),
        )
