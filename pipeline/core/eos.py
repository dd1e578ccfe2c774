"""End-of-stream accounting: a stage's own output is a numbered sequence, and only it counts.

Every record a stage writes into a partition carries ``seq``, its position in that stage's own
output of the partition (0, 1, 2, ...), and the end-of-stream marker carries ``seq == count``. A
reader therefore knows, record by record, whether it is looking at

- the next record of the sequence (``seq == next``): used (if it also verifies);
- a record of the sequence it has already used (``seq < next``): a duplicate when its id was
  seen (defence in depth behind the transactions), else a foreign record claiming a used number;
- a record after a gap (``seq > next``): the records between were lost (``missing``);
- a record without a number, of another run or not decodable: foreign.

Foreign records go to the dead-letter queue with the reason and never touch the counts, so a stray
record cannot break a run, and a duplicate is reported, not fatal. A marker ends the partition;
a ``failed`` marker is an error that wins. Loss is never silent: a gap, or a marker whose number
is ahead of what arrived, counts as missing, and a run with anything missing fails at its end.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pipeline.core.errors import StreamError
from pipeline.core.messages import EndOfStream, decode, encode

__all__ = ("Position", "PartitionState", "CompletenessTracker", "Completeness")


class Position(enum.Enum):
    """Where a numbered record stands against the partition's sequence."""

    NEXT = "next"  # seq >= next: in order (a gap before it is counted as missing when it is used)
    EARLIER = "earlier"  # seq < next: a duplicate or a foreign record reusing a number
    UNNUMBERED = "unnumbered"  # no seq: not a stage's own output


@dataclass
class PartitionState:
    """One partition's counts; JSON-friendly so a checkpoint can carry it."""

    partition: int
    next_seq: int = 0
    used: int = 0
    missing: int = 0
    duplicates: int = 0
    foreign: int = 0
    marker: EndOfStream | None = None
    kept_bytes: int = 0  # bytes of the samples a storage budget keeps for later epochs

    @property
    def ended(self) -> bool:
        return self.marker is not None

    @property
    def expected(self) -> int:
        """Records the writer says it wrote (known once the marker arrived)."""
        return self.marker.count if self.marker is not None else self.next_seq

    def to_json(self) -> dict[str, Any]:
        """For a checkpoint: the counts and the marker as its encoded record."""
        return {
            "next_seq": self.next_seq,
            "used": self.used,
            "missing": self.missing,
            "duplicates": self.duplicates,
            "foreign": self.foreign,
            **({"kept_bytes": self.kept_bytes} if self.kept_bytes else {}),
            "marker": encode(self.marker).decode() if self.marker is not None else None,
        }

    @classmethod
    def from_json(cls, partition: int, data: dict[str, Any]) -> PartitionState:
        marker = decode(data["marker"]) if data.get("marker") else None
        if marker is not None and not isinstance(marker, EndOfStream):
            raise StreamError(f"checkpointed marker of partition {partition} is a {type(marker).__name__}")
        return cls(
            partition,
            next_seq=int(data["next_seq"]),
            used=int(data["used"]),
            missing=int(data["missing"]),
            duplicates=int(data["duplicates"]),
            foreign=int(data["foreign"]),
            marker=marker,
            kept_bytes=int(data.get("kept_bytes", 0)),  # absent in checkpoints taken before budgets
        )


@dataclass(frozen=True)
class Completeness:
    """The numbers of the run summary: ``N of N trained, 0 missing, D duplicates dropped``."""

    expected: int
    used: int
    missing: int
    duplicates: int
    foreign: int
    partitions_ended: int
    partitions: int


@dataclass
class CompletenessTracker:
    """Per-partition sequence accounting against end-of-stream markers."""

    states: dict[int, PartitionState] = field(default_factory=dict)

    @classmethod
    def over(cls, partitions: Iterable[int]) -> CompletenessTracker:
        """A tracker for these partitions, nothing seen yet."""
        return cls({p: PartitionState(p) for p in sorted(set(partitions))})

    def state(self, partition: int) -> PartitionState:
        try:
            return self.states[partition]
        except KeyError:
            raise StreamError(f"record from partition {partition}, which this reader does not own") from None

    def position(self, partition: int, seq: int | None) -> Position:
        """Classify a record's number before deciding what to do with it."""
        if seq is None:
            return Position.UNNUMBERED
        return Position.NEXT if seq >= self.state(partition).next_seq else Position.EARLIER

    def used(self, partition: int, seq: int) -> None:
        """The record numbered ``seq`` was handed out; numbers skipped before it are missing."""
        st = self._open(partition)
        if seq < st.next_seq:
            raise StreamError(f"partition {partition}: seq {seq} used after {st.next_seq - 1}")
        st.missing += seq - st.next_seq
        st.next_seq = seq + 1
        st.used += 1

    def duplicate(self, partition: int) -> None:
        self._open(partition).duplicates += 1

    def foreign(self, partition: int) -> None:
        self.state(partition).foreign += 1

    def _open(self, partition: int) -> PartitionState:
        st = self.state(partition)
        if st.ended:
            raise StreamError(f"record after the end-of-stream marker of partition {partition}")
        return st

    def end(self, marker: EndOfStream, partition: int) -> None:
        """Close the partition at its marker (which must be numbered and in order).

        A failed marker raises. Numbers the marker says were written but never arrived count as
        missing; the run's summary turns them into an error once every partition has ended.
        """
        st = self._open(partition)
        if marker.status == "failed":
            raise StreamError(f"partition {partition} failed upstream ({marker.stage}): {marker.reason}")
        if marker.seq is None or marker.seq < st.next_seq:
            raise ValueError("end() takes the partition's own marker: check position() first")
        st.missing += marker.seq - st.next_seq
        st.next_seq = marker.seq + 1
        st.marker = marker

    def ended(self, partition: int) -> bool:
        return self.state(partition).ended

    def all_ended(self) -> bool:
        return all(st.ended for st in self.states.values())

    def open_partitions(self) -> list[int]:
        return [p for p, st in self.states.items() if not st.ended]

    def summary(self) -> Completeness:
        states = list(self.states.values())
        return Completeness(
            expected=sum(s.expected for s in states),
            used=sum(s.used for s in states),
            missing=sum(s.missing for s in states),
            duplicates=sum(s.duplicates for s in states),
            foreign=sum(s.foreign for s in states),
            partitions_ended=sum(1 for s in states if s.ended),
            partitions=len(states),
        )
