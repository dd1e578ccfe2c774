"""Progress of a stream, as every stage counts it: one rule for each count, in one place.

- ``PartitionCounters``: a samples partition's running counts, committed by the generators as the
  metadata of their prompt offsets (so whichever worker takes a partition over forwards a correct
  end-of-stream marker, and backpressure and ``status`` read the same numbers);
- ``StreamItem`` and ``StreamState``: what the read side hands out and what a checkpoint stores
  to resume it exactly;
- ``rank_partitions``: which samples partitions a trainer rank reads.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline.core.messages import SampleRef

__all__ = ("PartitionCounters", "StreamItem", "StreamState", "rank_partitions")


@dataclass(frozen=True)
class PartitionCounters:
    """Running counts of one samples partition, committed with the prompt offsets."""

    refs: int = 0
    dropped: int = 0
    ended: bool = False

    def to_metadata(self) -> str:
        """The offset-commit metadata that carries these counts to the partition's next owner."""
        return json.dumps({"refs": self.refs, "dropped": self.dropped, "ended": self.ended})

    @classmethod
    def from_metadata(cls, text: str) -> PartitionCounters:
        """Strictly read the generators' commit metadata (empty: a partition not started)."""
        if not text:
            return cls()
        data = json.loads(text)
        return cls(int(data["refs"]), int(data["dropped"]), bool(data["ended"]))

    @classmethod
    def parse(cls, text: str) -> PartitionCounters:
        """Leniently read commit metadata for monitoring: a missing or garbled field counts as 0
        (or not ended), so a foreign commit never stops backpressure."""

        return cls(
            _lenient(text, "refs", int, 0), _lenient(text, "dropped", int, 0), _lenient(text, "ended", bool, False)
        )


def _lenient(text: str, name: str, kind: Callable[[Any], Any], default: Any) -> Any:
    """One field of JSON metadata as ``kind``, or ``default`` when absent or unreadable."""
    try:
        return kind(json.loads(text).get(name, default)) if text else default
    except (ValueError, AttributeError, TypeError):
        return default


def rank_partitions(partitions: int, world_size: int, rank: int) -> list[int]:
    """Rank r reads partitions p with p % world_size == r."""
    return [p for p in range(partitions) if p % world_size == rank]


@dataclass(frozen=True)
class StreamItem:
    """One verified sample the read side hands out, with where it sat in its partition."""

    ref: SampleRef
    tensors: dict[str, Any]  # name -> torch.Tensor (core does not import torch)
    partition: int
    offset: int


@dataclass
class StreamState:
    """Everything a checkpoint needs to resume a stream exactly (JSON-serialisable)."""

    positions: dict[int, int]
    used: dict[int, int]
    rejected: dict[int, int]
    duplicates: dict[int, int]
    markers: dict[int, list[str]]
    cursor: int
    dead_letters: int = 0
    dropped_upstream: int = 0
    recent_ids: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "positions": {str(k): v for k, v in self.positions.items()},
            "used": {str(k): v for k, v in self.used.items()},
            "rejected": {str(k): v for k, v in self.rejected.items()},
            "duplicates": {str(k): v for k, v in self.duplicates.items()},
            "markers": {str(k): v for k, v in self.markers.items()},
            "cursor": self.cursor,
            "dead_letters": self.dead_letters,
            "dropped_upstream": self.dropped_upstream,
            "recent_ids": list(self.recent_ids),
        }

    @classmethod
    def from_json(cls, data: dict) -> StreamState:
        def ints(d: dict) -> dict[int, int]:
            return {int(k): int(v) for k, v in d.items()}

        return cls(
            positions=ints(data["positions"]),
            used=ints(data["used"]),
            rejected=ints(data["rejected"]),
            duplicates=ints(data["duplicates"]),
            markers={int(k): list(v) for k, v in data["markers"].items()},
            cursor=int(data["cursor"]),
            dead_letters=int(data.get("dead_letters", 0)),
            dropped_upstream=int(data.get("dropped_upstream", 0)),
            recent_ids=[str(i) for i in data.get("recent_ids", [])],
        )
