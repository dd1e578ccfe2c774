"""Progress of a stream, as every stage counts it: one rule for each count, in one place.

- ``PartitionCounters``: a samples partition's running counts, committed by the generators as the
  metadata of their prompt offsets (so whichever worker takes a partition over forwards a correct
  end-of-stream marker, and backpressure and ``status`` read the same numbers);
- ``SourceCounters``: a prompts partition's counts, committed by the source in the same
  transactions as its prompts, as the metadata of its own group's offsets: a source restart, the
  trainer's schedule and the run's summary read them in O(partitions), never the prompts topic;
- ``StreamItem`` and ``StreamState``: what the read side hands out and what a checkpoint stores
  to resume it exactly;
- ``rank_partitions``: which samples partitions a trainer rank reads.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.core.errors import StreamError
from pipeline.core.messages import SampleRef
from pipeline.core.topics import RunTopics, Transport

__all__ = (
    "PartitionCounters", "SourceCounters", "read_source_counters", "StreamItem", "StreamState", "rank_partitions",
)  # fmt: skip


@dataclass(frozen=True)
class PartitionCounters:
    """Running counts of one samples partition, committed with the prompt offsets."""

    refs: int = 0  # own prompts published as sample refs (the samples partition's numbers)
    dropped: int = 0  # own prompts dead-lettered (capture refused, token ids out of range...)
    ended: bool = False
    missing: int = 0  # own prompt numbers that never arrived (a gap in the source's output)
    foreign: int = 0  # records that are not the source's output (dead-lettered, never counted)

    @property
    def next_prompt(self) -> int:
        """The number of the source's next own prompt in this partition."""
        return self.refs + self.dropped + self.missing

    def to_metadata(self) -> str:
        """The offset-commit metadata that carries these counts to the partition's next owner."""
        return json.dumps(
            {"refs": self.refs, "dropped": self.dropped, "ended": self.ended, "missing": self.missing,
             "foreign": self.foreign}
        )  # fmt: skip

    @classmethod
    def from_metadata(cls, text: str) -> PartitionCounters:
        """Strictly read the generators' commit metadata (empty: a partition not started)."""
        if not text:
            return cls()
        data = json.loads(text)
        return cls(
            int(data["refs"]), int(data["dropped"]), bool(data["ended"]), int(data.get("missing", 0)),
            int(data.get("foreign", 0)),
        )  # fmt: skip

    @classmethod
    def parse(cls, text: str) -> PartitionCounters:
        """Leniently read commit metadata for monitoring: a missing or garbled field counts as 0
        (or not ended), so a foreign commit never stops backpressure."""

        return cls(
            _lenient(text, "refs", int, 0),
            _lenient(text, "dropped", int, 0),
            _lenient(text, "ended", bool, False),
        )


@dataclass(frozen=True)
class SourceCounters:
    """What the source has committed to one prompts partition (the metadata of the source group's
    offset, written in the transaction that holds the prompts it counts).

    ``letters`` are the input lines the source dead-lettered, each counted on the partition of
    the prompt it was committed with (the letters after the last prompt: the partition the next
    prompt would have gone to). The offset itself is ``prompts`` (+1 for the marker): the source
    group has no consumer, its offsets are a ledger, not a position in the topic.
    """

    prompts: int = 0  # own prompts committed: the partition's next ``seq``
    letters: int = 0  # input lines dead-lettered by the source
    ended: bool = False  # its end-of-stream marker is committed

    def to_metadata(self) -> str:
        """The offset-commit metadata that carries these counts to a restart."""
        return json.dumps({"prompts": self.prompts, "letters": self.letters, "ended": self.ended})

    @classmethod
    def from_metadata(cls, text: str) -> SourceCounters:
        """Strictly read the source's commit metadata (empty: nothing committed yet)."""
        if not text:
            return cls()
        data = json.loads(text)
        return cls(int(data["prompts"]), int(data["letters"]), bool(data["ended"]))


def read_source_counters(
    transport: Transport, topics: RunTopics, partitions: int
) -> dict[int, SourceCounters]:
    """Every prompts partition's committed source counts: one offsets request, O(partitions)."""
    with transport.admin() as admin:
        committed = admin.group_offsets(topics.source_group, topics.prompts)  # the transport rides out transient errors
    counters = {}
    for p in range(partitions):
        try:
            counters[p] = SourceCounters.from_metadata(committed[p].metadata if p in committed else "")
        except (ValueError, KeyError, TypeError) as exc:
            raise StreamError(
                f"group {topics.source_group}, partition {p}: unreadable source counts "
                f"{committed[p].metadata!r} ({exc}); only the source may commit to this group"
            ) from exc
    return counters


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
    epoch: int = 0  # the training epoch it is handed out for (0: the online pass)
    # False: a storage budget (``storage.max_bytes``) does not keep its file for later epochs,
    # which capture it again; retention may delete it once this pass has trained it.
    kept: bool = True


@dataclass
class StreamState:
    """Everything a checkpoint needs to resume a stream exactly (JSON-serialisable).

    ``partitions`` holds each partition's sequence accounting (``pipeline.core.eos``), ``recent``
    the dedup window of ``(sample_id, checksum)`` pairs, ``consumed`` the own records passed per
    partition (what backpressure subtracts from the generators' count). Past the online pass
    (``train.epochs`` > 1) ``epoch`` is the epoch being read again from retained features,
    ``epoch_position`` how many samples of its order were handed out, and ``replayed`` every
    sample handed out in those later epochs.
    """

    positions: dict[int, int]
    partitions: dict[int, dict[str, Any]]
    cursor: int
    dead_letters: int = 0
    dropped_upstream: int = 0
    recent: Sequence[tuple[str, str]] = field(default_factory=list)  # a RecentPairs snapshot, or a list
    epoch: int = 0
    epoch_position: int = 0
    replayed: int = 0

    def consumed(self, partition: int) -> int:
        """Own records of the partition passed so far (used, duplicate-free, missing included)."""
        return int(self.partitions.get(partition, {}).get("next_seq", 0))

    def used(self, partition: int) -> int:
        return int(self.partitions.get(partition, {}).get("used", 0))

    def to_json(self) -> dict[str, Any]:
        return {
            "positions": {str(k): v for k, v in self.positions.items()},
            "partitions": {str(k): v for k, v in self.partitions.items()},
            "cursor": self.cursor,
            "dead_letters": self.dead_letters,
            "dropped_upstream": self.dropped_upstream,
            "recent": [list(pair) for pair in self.recent],
            "epoch": self.epoch,
            "epoch_position": self.epoch_position,
            "replayed": self.replayed,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StreamState:
        return cls(
            positions={int(k): int(v) for k, v in data["positions"].items()},
            partitions={int(k): dict(v) for k, v in data["partitions"].items()},
            cursor=int(data["cursor"]),
            dead_letters=int(data.get("dead_letters", 0)),
            dropped_upstream=int(data.get("dropped_upstream", 0)),
            recent=[(str(i), str(c)) for i, c in data.get("recent", [])],
            epoch=int(data.get("epoch", 0)),
            epoch_position=int(data.get("epoch_position", 0)),
            replayed=int(data.get("replayed", 0)),
        )
