"""The reading half of the data plane: verified samples from the samples topic, exactly once.

A ``SampleStream`` reads a fixed set of samples partitions (``read_committed``, manual
assignment), decodes every record strictly, drops duplicate ``sample_id``s, fetches and verifies
each payload against its ref, and routes anything unusable to the DLQ with the reason. It ends a
partition only at its end-of-stream marker, after checking the marker's count. Its ``positions``
(the next offset per partition after the last record handed out) are what a checkpoint stores.

It knows nothing of torch models: the trainer, replay and the benchmarks all read through it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from pipeline.eos import Completeness, CompletenessTracker
from pipeline.errors import DecodeError, PayloadError, StreamError
from pipeline.generate.worker import dead_letter
from pipeline.kafka import KafkaSettings, PartitionReader, PlainProducer, Record, RunTopics
from pipeline.messages import EndOfStream, SampleRef, decode, encode
from pipeline.storage import FeatureStore

__all__ = ("StreamItem", "SampleStream", "rank_partitions")

logger = logging.getLogger(__name__)


def rank_partitions(partitions: int, world_size: int, rank: int) -> list[int]:
    """Rank r reads partitions p with p % world_size == r."""
    return [p for p in range(partitions) if p % world_size == rank]


@dataclass(frozen=True)
class StreamItem:
    ref: SampleRef
    tensors: dict
    partition: int
    offset: int


class SampleStream:
    """Verified samples of some partitions, in offset order per partition."""

    def __init__(
        self,
        settings: KafkaSettings,
        store: FeatureStore,
        run_id: str,
        partitions: Iterable[int],
        *,
        start: Mapping[int, int] | None = None,
        dlq: PlainProducer | None = None,
        idle_timeout_s: float | None = 600.0,
        poll_timeout_s: float = 0.5,
        max_poll_records: int = 64,
    ) -> None:
        self.run_id = run_id
        self.store = store
        self.topics = RunTopics(run_id)
        self.partitions = sorted(set(partitions))
        self.tracker = CompletenessTracker(self.partitions)
        self.positions: dict[int, int] = {p: 0 for p in self.partitions}
        if start:
            self.positions.update({p: int(o) for p, o in start.items() if p in self.positions})
        self._dlq = dlq
        self._idle_timeout_s = idle_timeout_s
        self._poll_timeout_s = poll_timeout_s
        self._seen: set[str] = set()
        self.dead_letters = 0
        self.dropped_upstream = 0
        self._reader = PartitionReader(
            settings,
            self.topics.samples,
            partitions=self.partitions,
            start=dict(self.positions),
            max_poll_records=max_poll_records,
        )

    def __iter__(self) -> Iterator[StreamItem]:
        return self.items()

    def items(self) -> Iterator[StreamItem]:
        """Yield until every partition has ended; raise ``StreamError`` on a broken stream."""
        last_progress = time.monotonic()
        while not self.tracker.all_ended():
            records = self._reader.poll(self._poll_timeout_s)
            if not records:
                idle = time.monotonic() - last_progress
                if self._idle_timeout_s is not None and idle > self._idle_timeout_s:
                    raise StreamError(
                        f"no record for {idle:.0f} s on partitions {self.tracker.open_partitions()} "
                        f"of {self.topics.samples}; is a generator running?"
                    )
                continue
            last_progress = time.monotonic()
            for record in records:
                item = self._handle(record)
                self.positions[record.partition] = record.offset + 1
                if item is not None:
                    yield item

    def _handle(self, record: Record) -> StreamItem | None:
        p = record.partition
        try:
            message = decode(record.value or b"")
            if message.run_id != self.run_id:
                raise DecodeError(f"record of run {message.run_id!r} in run {self.run_id!r}")
            if isinstance(message, EndOfStream):
                self.dropped_upstream += message.dropped
                self.tracker.end(message, p)
                return None
            if not isinstance(message, SampleRef):
                raise DecodeError(f"a {type(message).__name__} does not belong on the samples topic")
            if message.sample_id in self._seen:
                self.tracker.duplicate(p)
                logger.warning("duplicate sample %s at %s:%d dropped", message.sample_id, p, record.offset)
                return None
            tensors = self.store.get(message)
        except (DecodeError, PayloadError) as exc:
            self._reject(record, exc)
            return None
        self._seen.add(message.sample_id)
        self.tracker.used(p)
        return StreamItem(message, tensors, p, record.offset)

    def _reject(self, record: Record, error: Exception) -> None:
        logger.warning("dead letter %s:%d: %s", record.partition, record.offset, error)
        self.tracker.rejected(record.partition)
        self.dead_letters += 1
        if self._dlq is not None:
            self._dlq.send(self.topics.dlq, encode(dead_letter(self.run_id, record, error)), partition=0)

    def summary(self) -> Completeness:
        return self.tracker.summary()

    def close(self) -> None:
        self._reader.close()
        if self._dlq is not None:
            self._dlq.flush()
