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
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator

from pipeline.core.deadletter import dead_letter
from pipeline.core.eos import Completeness, CompletenessTracker
from pipeline.core.errors import DecodeError, PayloadError, StreamError
from pipeline.core.messages import EndOfStream, SampleRef, decode, encode
from pipeline.core.progress import StreamItem, StreamState
from pipeline.core.topics import Producer, Record, RunTopics, Transport
from pipeline.storage import FeatureStore

__all__ = ("SampleStream",)

logger = logging.getLogger(__name__)


class SampleStream:
    """Verified samples of some partitions, in a deterministic order.

    Samples are taken round-robin over the open partitions in ascending order, one sample per
    turn (end-of-stream markers, dead letters and duplicates do not use up a turn), whatever
    order the broker delivers them in: the same topic gives the same sequence on every run,
    which exact resume and bit-for-bit replay rely on. Records fetched ahead for other
    partitions wait in small buffers; a partition whose buffer is full is paused.
    """

    def __init__(
        self,
        transport: Transport,
        store: FeatureStore,
        run_id: str,
        partitions: Iterable[int],
        *,
        state: StreamState | None = None,
        dlq: Producer | None = None,
        idle_timeout_s: float | None = 600.0,
        poll_timeout_s: float = 0.5,
        max_poll_records: int = 64,
        max_buffered: int = 128,
        dedup_window: int = 65536,
    ) -> None:
        self.run_id = run_id
        self.store = store
        self.topics = RunTopics(run_id)
        self.partitions = sorted(set(partitions))
        if not self.partitions:
            raise ValueError("a sample stream needs at least one partition")
        self.tracker = CompletenessTracker(self.partitions)
        self.positions: dict[int, int] = {p: 0 for p in self.partitions}
        self.cursor = self.partitions[0]
        self.dead_letters = 0
        self.dropped_upstream = 0
        # Dedup by sample_id over a bounded window of recent ids, carried across resumes in the
        # state: duplicates (at-least-once republishing) sit close together in a partition.
        self._recent: deque[str] = deque(maxlen=dedup_window)
        self._seen: set[str] = set()
        self._interrupted = threading.Event()
        if state is not None:
            self._restore(state)
        self._dlq = dlq
        self._idle_timeout_s = idle_timeout_s
        self._poll_timeout_s = poll_timeout_s
        self._max_buffered = max_buffered
        self._buffers: dict[int, deque[Record]] = {p: deque() for p in self.partitions}
        self._reader = transport.reader(self.topics.samples,
            partitions=self.partitions,
            start=dict(self.positions),
            max_poll_records=max_poll_records,
        )

    def _restore(self, state: StreamState) -> None:
        if sorted(state.positions) != self.partitions:
            raise StreamError(
                f"checkpointed stream read partitions {sorted(state.positions)}, this one reads "
                f"{self.partitions}: resume with the same partitions and world size"
            )
        self.positions = dict(state.positions)
        for p, st in self.tracker.states.items():
            st.used = state.used.get(p, 0)
            st.rejected = state.rejected.get(p, 0)
            st.duplicates = state.duplicates.get(p, 0)
            for raw in state.markers.get(p, []):
                marker = decode(raw)
                assert isinstance(marker, EndOfStream)
                st.markers[marker.producer_id] = marker
        self.cursor = state.cursor
        self.dead_letters = state.dead_letters
        self.dropped_upstream = state.dropped_upstream
        for sample_id in state.recent_ids:
            self._remember(sample_id)

    def state(self) -> StreamState:
        """The resume point after the last item handed out (buffered records are re-read)."""
        states = self.tracker.states
        return StreamState(
            positions=dict(self.positions),
            used={p: s.used for p, s in states.items()},
            rejected={p: s.rejected for p, s in states.items()},
            duplicates={p: s.duplicates for p, s in states.items()},
            markers={p: [encode(m).decode() for m in s.markers.values()] for p, s in states.items()},
            cursor=self.cursor,
            dead_letters=self.dead_letters,
            dropped_upstream=self.dropped_upstream,
            recent_ids=list(self._recent),
        )

    def interrupt(self) -> None:
        """Ask a blocked ``items()`` (on another thread) to return at its next poll."""
        self._interrupted.set()

    def _remember(self, sample_id: str) -> None:
        if len(self._recent) == self._recent.maxlen:
            self._seen.discard(self._recent[0])
        self._recent.append(sample_id)
        self._seen.add(sample_id)

    def __iter__(self) -> Iterator[StreamItem]:
        return self.items()

    def items(self) -> Iterator[StreamItem]:
        """Yield until every partition has ended; raise ``StreamError`` on a broken stream."""
        while not self.tracker.all_ended():
            p = self._turn()
            record = self._next_record(p)
            if record is None:  # interrupted
                return
            item = self._handle(record)
            self.positions[p] = record.offset + 1
            if item is not None:
                self.cursor = self._after(p)
                yield item

    def _turn(self) -> int:
        """The open partition whose turn it is: the cursor, or the next open one after it."""
        open_ = [p for p in self.partitions if not self.tracker.ended(p)]
        for p in open_:
            if p >= self.cursor:
                return p
        return open_[0]

    def _after(self, partition: int) -> int:
        later = [p for p in self.partitions if p > partition]
        return later[0] if later else self.partitions[0]

    def _next_record(self, partition: int) -> Record | None:
        buffer = self._buffers[partition]
        deadline = None if self._idle_timeout_s is None else time.monotonic() + self._idle_timeout_s
        while not buffer:
            if self._interrupted.is_set():
                return None
            if partition in self._reader.paused():
                self._reader.resume([partition])
            records = self._reader.poll(self._poll_timeout_s)
            for record in records:
                self._buffers[record.partition].append(record)
            full = [p for p, b in self._buffers.items() if len(b) >= self._max_buffered and p != partition]
            if full:
                self._reader.pause(full)
            if not buffer and deadline is not None and time.monotonic() > deadline:
                raise StreamError(
                    f"no record for {self._idle_timeout_s:.0f} s on partition {partition} of "
                    f"{self.topics.samples} (open: {self.tracker.open_partitions()}); is a generator running?"
                )
        record = buffer.popleft()
        if len(buffer) < self._max_buffered // 2 and partition in self._reader.paused():
            self._reader.resume([partition])
        return record

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
        self._remember(message.sample_id)
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
