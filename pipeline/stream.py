"""The reading half of the data plane: verified samples from the samples topic, exactly once.

A ``SampleStream`` reads a fixed set of samples partitions (``read_committed``, manual
assignment) and takes from each only the generators' own numbered output (``pipeline.core.eos``):
it decodes every record strictly, checks the ref against the feature contract, fetches and
verifies its payload, and only then accepts it. Anything else (a foreign record, a ref that fails
a check, a number already used) goes to the DLQ with the reason and never touches the counts; a
true duplicate is counted and dropped. It ends a partition only at its end-of-stream marker. Its
``positions`` (the next offset per partition after the last record handed out) and sequence
counts are what a checkpoint stores.

It knows nothing of torch models: the trainer, replay and the benchmarks all read through it.
"""

from __future__ import annotations

import logging
import threading
import time
from bisect import bisect_left, bisect_right
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from pipeline.core.deadletter import DeadLetterLimits, DeadLetterPolicy, send_dead_letter
from pipeline.core.eos import Completeness, CompletenessTracker, PartitionState, Position
from pipeline.core.errors import (
    CaptureContractError,
    DecodeError,
    ForeignRecord,
    PayloadError,
    SpecstreamError,
    StreamError,
)
from pipeline.core.features import check_ref
from pipeline.core.messages import EndOfStream, SampleRef, decode
from pipeline.core.partition_wait import PartitionWait, Wait, ask_broker, end_hanging
from pipeline.core.progress import StreamItem, StreamState
from pipeline.core.recent_window import RecentWindow
from pipeline.core.topics import Producer, Record, RunTopics, Transport
from pipeline.feature_codec import decode_features
from pipeline.read_into import is_local, read_into, will_read
from pipeline.storage import FeatureStore

__all__ = ("SampleStream", "fetch_sample")

logger = logging.getLogger(__name__)


def fetch_sample(
    store: FeatureStore, ref: SampleRef, dest: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """One sample's tensors: fetched, verified against its ref, and (``storage.dtype``) decoded
    back to the capture's dtype; the hidden states read straight into ``dest``'s tensors where they
    fit (:func:`pipeline.read_into.read_into`)."""
    return decode_features(ref, read_into(store, ref, dest))


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
        dead_letters: DeadLetterLimits = DeadLetterLimits(),
        fetch: bool = True,
        keep_share: int | None = None,
        stall_report_s: float = 60.0,
    ) -> None:
        """``fetch=False`` hands out the accepted refs without their payloads (``tensors`` empty):
        later epochs list the online pass's samples this way, then fetch them in their own order.

        ``stall_report_s``: while one partition keeps the stream waiting, every this many seconds
        the log says what the broker holds for it (:mod:`.core.partition_wait`), and a client that
        holds back committed records is replaced.

        ``keep_share``: the bytes of each partition's samples a storage budget keeps for later
        epochs (None: all). A sample is kept when it still fits the share in the partition's own
        order (first fit), decided before its payload is read, so that the online pass and every
        later listing of it decide alike; the others are handed out ``kept=False``."""
        self.run_id = run_id
        self._fetch = fetch
        self._keep_share = keep_share
        self.policy = DeadLetterPolicy("train", dead_letters)
        self.store = store
        self._dest: Callable[[SampleRef], Mapping[str, Any] | None] | None = None  # see read_into_slots
        self.topics = RunTopics(run_id)
        self.partitions = sorted(set(partitions))
        if not self.partitions:
            raise ValueError("a sample stream needs at least one partition")
        self.tracker = CompletenessTracker.over(self.partitions)
        self.positions: dict[int, int] = {p: 0 for p in self.partitions}
        self.cursor = self.partitions[0]
        self.dead_letters = 0
        self.dropped_upstream = 0
        # Dedup by sample_id over recent (id, checksum) pairs, resumed from the state: duplicates sit close
        self._recent = RecentWindow(dedup_window)  # each micro-batch snapshots it: shared chunks, no copy
        self._seen: dict[str, str] = {}
        self._interrupted = threading.Event()
        self._hints = fetch and is_local(store)  # see _hint_upcoming
        self._peeked: dict[tuple[int, int], Any] = {}  # (partition, offset) -> the decoded message
        if state is not None:
            self._restore(state)
        # Every turn looks these up: kept here, not rebuilt per sample (O(partitions) each, 256 in
        # production). The stream alone pauses and resumes its reader, so its set is the reader's.
        self._open = self.tracker.open_partitions()
        self._paused: set[int] = set()
        self._dlq = dlq
        self._idle_timeout_s = idle_timeout_s
        self._stall_report_s = stall_report_s
        self._undelivered: dict[int, int] = {}  # partition -> the committed end its last report saw
        self._transport = transport
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
        for p in self.partitions:
            if p in state.partitions:
                self.tracker.states[p] = PartitionState.from_json(p, state.partitions[p])
        self.cursor = state.cursor
        self.dead_letters = state.dead_letters
        self.dropped_upstream = state.dropped_upstream
        for sample_id, checksum in state.recent:
            self._remember(sample_id, checksum)

    def state(self) -> StreamState:
        """The resume point after the last item handed out (buffered records are re-read)."""
        return StreamState(
            positions=dict(self.positions),
            partitions={p: st.to_json() for p, st in self.tracker.states.items()},
            cursor=self.cursor,
            dead_letters=self.dead_letters,
            dropped_upstream=self.dropped_upstream,
            recent=self._recent.snapshot(),
        )

    def read_into_slots(self, dest: Callable[[SampleRef], Mapping[str, Any] | None]) -> bool:
        """Read each sample's tensors straight into ``dest(ref)`` (rows of a reused batch buffer),
        with every check of ``get``; False (and ``get`` as before) where the store is not local."""
        if not is_local(self.store):
            return False
        self._dest = dest
        return True

    def hint(self, ref: SampleRef) -> None:
        """Start the disk on ``ref``'s file now, as it is fetched next (:func:`.read_into.will_read`)."""
        will_read(self.store, ref)

    def fetch(self, ref: SampleRef) -> dict[str, Any]:
        """One sample's verified, decoded tensors, read into ``read_into_slots``'s buffers if set."""
        return fetch_sample(self.store, ref, None if self._dest is None else self._dest(ref))

    def interrupt(self) -> None:
        """Ask a blocked ``items()`` (on another thread) to return at its next poll."""
        self._interrupted.set()

    def _remember(self, sample_id: str, checksum: str) -> None:
        evicted = self._recent.append((sample_id, checksum))
        if evicted is not None:
            self._seen.pop(evicted[0], None)
        self._seen[sample_id] = checksum

    def __iter__(self) -> Iterator[StreamItem]:
        return self.items()

    def items(self) -> Iterator[StreamItem]:
        """Yield until every partition has ended; raise ``StreamError`` on a broken stream."""
        while self._open:
            p = self._turn()
            record = self._next_record(p)
            if record is None:  # interrupted
                return
            self._hint_upcoming(self._turn(self._after(p)))
            item = self._handle(record)
            self.positions[p] = record.offset + 1
            if item is not None:
                self.cursor = self._after(p)
                yield item

    def _turn(self, start: int | None = None) -> int:
        """The open partition whose turn it is: the cursor (or ``start``), or the next open one after it."""
        i = bisect_left(self._open, self.cursor if start is None else start)
        return self._open[i] if i < len(self._open) else self._open[0]

    def _hint_upcoming(self, partition: int | None) -> None:
        """Hint the file of ``partition``'s next buffered sample before this one is fetched: on a
        cold disk the next read is under way while this one is checked (bench_read_path.py --cold).
        The record is decoded once: ``_handle`` takes the decoded message from here."""
        buffer = self._buffers.get(partition) if self._hints and partition is not None else None
        if not buffer:
            return
        record = buffer[0]
        try:
            message = decode(record.value or b"")
        except DecodeError:
            return  # _handle dead-letters it in its turn
        self._peeked[record.partition, record.offset] = message
        if len(self._peeked) > 2:  # the one hinted before this one, if it was never handled
            del self._peeked[next(iter(self._peeked))]
        if isinstance(message, SampleRef) and message.run_id == self.run_id:
            self.hint(message)

    def _decoded(self, record: Record) -> Any:
        message = self._peeked.pop((record.partition, record.offset), None)
        return decode(record.value or b"") if message is None else message

    def _after(self, partition: int) -> int:
        i = bisect_right(self.partitions, partition)
        return self.partitions[i] if i < len(self.partitions) else self.partitions[0]

    def _next_record(self, partition: int) -> Record | None:
        buffer = self._buffers[partition]
        since = time.monotonic()
        deadline = None if self._idle_timeout_s is None else since + self._idle_timeout_s
        report_at = since + self._stall_report_s
        while not buffer:
            if self._interrupted.is_set():
                return None
            if partition in self._paused:
                self._resume(partition)
            records = self._reader.poll(self._poll_timeout_s)
            for record in records:
                self._buffers[record.partition].append(record)
            full = [p for p, b in self._buffers.items()
                    if len(b) >= self._max_buffered and p != partition and p not in self._paused]  # fmt: skip
            if full:
                self._reader.pause(full)
                self._paused.update(full)
            if buffer:
                break
            now = time.monotonic()
            if deadline is not None and now > deadline:
                wait = self._ask_broker(partition)
                why = "the broker did not say why" if wait is None else wait.reason
                raise StreamError(f"no record for {self._idle_timeout_s:.0f} s on partition {partition} of "
                                  f"{self.topics.samples} (open: {self._open}): {why}")  # fmt: skip
            if now > report_at:
                self._report_wait(partition, now - since)
                report_at = now + self._stall_report_s
        record = buffer.popleft()
        if len(buffer) < self._max_buffered // 2 and partition in self._paused:
            self._resume(partition)
        return record

    def _ask_broker(self, partition: int, hanging_idle_s: float | None = None) -> PartitionWait | None:
        try:
            with self._transport.admin() as admin:
                at = self._reader.position(partition)  # past aborted records, unlike self.positions
                wait = ask_broker(admin, self.topics.samples, partition, at)
                if hanging_idle_s is not None and wait.cause is Wait.OPEN_TRANSACTION:
                    end_hanging(admin, [self.topics.samples], hanging_idle_s)
                return wait
        except SpecstreamError as exc:
            logger.info("the broker did not say what it holds for partition %d: %s", partition, exc)
            return None

    def _report_wait(self, partition: int, waited_s: float) -> None:
        """Say why the stream waits. A client still short of the committed end the broker gave a
        report ago is replaced, at the positions handed out (what it had buffered is read again:
        nothing lost or repeated). A transaction its coordinator ended but left open is aborted."""
        wait = self._ask_broker(partition, hanging_idle_s=waited_s)
        if wait is None:
            return
        cause = wait.cause
        level = logging.INFO if cause is Wait.NOTHING_WRITTEN else logging.WARNING
        logger.log(level, "waiting %.0f s for partition %d of %s: %s",
                   waited_s, partition, self.topics.samples, wait.reason)  # fmt: skip
        earlier = self._undelivered.pop(partition, None)
        if cause is not Wait.UNDELIVERED:
            return
        if earlier is None or wait.at >= earlier:
            self._undelivered[partition] = wait.stable_end  # a fetch may be under way: checked next report
            return
        logger.warning("partition %d: the client did not fetch committed records in %.0f s; replacing it",
                       partition, self._stall_report_s)  # fmt: skip
        for buffer in self._buffers.values():
            buffer.clear()
        self._peeked.clear()
        self._paused.clear()
        self._undelivered.clear()
        self._reader.reopen(self.positions)

    def _resume(self, partition: int) -> None:
        self._reader.resume([partition])
        self._paused.discard(partition)

    def _handle(self, record: Record) -> StreamItem | None:
        """Accept the record as the partition's next own sample, or account for it otherwise."""
        p = record.partition
        try:
            message = self._decoded(record)
            if message.run_id != self.run_id:
                raise ForeignRecord(f"record of run {message.run_id!r} in run {self.run_id!r}")
            if isinstance(message, EndOfStream):
                return self._end(message, p)
            if not isinstance(message, SampleRef):
                raise ForeignRecord(f"a {type(message).__name__} does not belong on the samples topic")
            position = self.tracker.position(p, message.seq)
            if position is Position.UNNUMBERED:
                raise ForeignRecord("a sample ref without a sequence number is no generator's output")
            if position is Position.EARLIER:
                return self._earlier(message, record)
            check_ref(message)
            kept = self._keep(p, message.nbytes)
            tensors = self.fetch(message) if self._fetch else {}
        except (DecodeError, PayloadError, CaptureContractError) as exc:
            self._reject(record, exc)
            return None
        assert message.seq is not None
        self._remember(message.sample_id, message.checksum)
        self.tracker.used(p, message.seq)
        self.policy.record(valid=True)
        return StreamItem(message, tensors, p, record.offset, kept=kept)

    def _keep(self, partition: int, nbytes: int) -> bool:
        """Whether the partition's share of the storage budget still holds this sample."""
        if self._keep_share is None:
            return True
        st = self.tracker.state(partition)
        if st.kept_bytes + nbytes > self._keep_share:
            return False
        st.kept_bytes += nbytes
        return True

    def arrivals(self) -> Iterator[StreamItem]:
        """The own samples in the order they arrive, until every partition has ended.

        For a consumer that imposes its own order (regenerated samples, taken in an epoch's
        permutation): nothing waits on one partition while another has records. A record after
        its partition's marker is foreign. Returns when interrupted."""
        while not self.tracker.all_ended():
            ready = next((p for p in self.partitions if self._buffers[p]), None)
            if ready is None:
                if self._interrupted.is_set():
                    return
                for record in self._reader.poll(self._poll_timeout_s):
                    self._buffers[record.partition].append(record)
                continue
            record = self._buffers[ready].popleft()
            self._hint_upcoming(next((p for p in self.partitions if self._buffers[p]), None))
            if self.tracker.ended(ready):
                self._reject(record, ForeignRecord(f"a record after the end-of-stream marker of partition {ready}"))
                continue
            item = self._handle(record)
            self.positions[ready] = record.offset + 1
            if item is not None:
                yield item

    def _end(self, marker: EndOfStream, partition: int) -> None:
        """The partition's own marker ends it (a failed one fails the run); others are foreign."""
        st = self.tracker.state(partition)
        if marker.stage != "generate":
            raise ForeignRecord(f"a {marker.stage} end-of-stream marker does not belong on the samples topic")
        if marker.seq is None or marker.seq != marker.count:
            raise ForeignRecord("an end-of-stream marker without its sequence number is no generator's")
        if marker.seq < st.next_seq:
            raise ForeignRecord(f"an end-of-stream marker at seq {marker.seq}, after seq {st.next_seq - 1} arrived")
        self.dropped_upstream += marker.dropped
        self.tracker.end(marker, partition)
        self._open.remove(partition)
        if st.missing:
            logger.error("partition %d ended with %d of its samples missing", partition, st.missing)

    def _earlier(self, ref: SampleRef, record: Record) -> None:
        """A number already used: the same sample again is a duplicate, anything else foreign."""
        if self._seen.get(ref.sample_id) == ref.checksum:
            self.tracker.duplicate(record.partition)
            logger.warning("duplicate sample %s at %s:%d dropped", ref.sample_id, record.partition, record.offset)
            return None
        raise ForeignRecord(
            f"seq {ref.seq} of partition {record.partition} was already used by another record "
            f"(sample {ref.sample_id} with checksum {ref.checksum} is not the one trained)"
        )

    def _reject(self, record: Record, error: Exception) -> None:
        """Dead-letter one record with the reason; the counts stay the writers' own."""
        logger.warning("dead letter %s:%d: %s", record.partition, record.offset, error)
        self.tracker.foreign(record.partition)
        self.dead_letters += 1
        if self._dlq is not None:
            send_dead_letter(self._dlq, self.run_id, record, error)
        self.policy.record(valid=False, reason=str(error))

    def summary(self) -> Completeness:
        return self.tracker.summary()

    def close(self) -> None:
        self._reader.close()
        if self._dlq is not None:
            self._dlq.flush()
