"""The generator's write half: a thread that stores files and commits transactions.

The worker's main thread polls and captures batch N+1 (the target's forward) while this thread
writes batch N's feature files and commits its transaction, so storage and Kafka hide behind
compute. The queue between them is bounded (one or two batches): the capture can run at most
that far ahead, which bounds memory and the work lost to a rebalance.

Exactly-once does not depend on this thread's timing. Each batch carries the consumer-group
metadata snapshot taken when its records were polled (KIP-447): if the group rebalanced since,
the broker refuses its offsets and the transaction aborts. Batches the worker already knows to
be stale (its assignment changed after they were polled: ``is_stale``) are dropped before any
file is written. An aborted batch makes every later queued batch stale too (they continue from
offsets that were never committed), and the worker rewinds to the committed offsets
(:meth:`BatchWriter.take_reset`). Any other failure (storage down, producer fenced by a restart
with the same id) stops the worker with that error.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline.core.errors import StreamError
from pipeline.core.faults import crash_point
from pipeline.core.feature_encoding import FeatureDtype
from pipeline.core.messages import Prompt, SampleRef, TargetInfo, encode, now
from pipeline.core.progress import PartitionCounters
from pipeline.core.topics import Committed, FencedError, TransactionalProducer, TransportError
from pipeline.feature_codec import encode_features
from pipeline.generate.backend import Capture
from pipeline.storage import FeatureStore

__all__ = ("Publish", "Sample", "PlannedBatch", "BatchWriter", "WriterStats", "merge")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Publish:
    """A record produced as-is in the batch's transaction (a DLQ letter, a forwarded EOS)."""

    topic: str
    partition: int
    value: bytes
    key: bytes | None = None


@dataclass
class Sample:
    """A captured prompt: its file is written, then its ref is produced."""

    partition: int
    prompt: Prompt
    sample_id: str
    tensors: Capture
    seq: int  # its number in the generators' own output of the samples partition


@dataclass
class PlannedBatch:
    """Everything one transaction will do, decided by the main thread in record order."""

    epoch: int
    group: object  # the consumer-group metadata snapshot taken at poll time (KIP-447)
    items: list[Publish | Sample]
    offsets: dict[tuple[str, int], Committed]
    refs: dict[int, int] = field(default_factory=dict)  # partition -> refs added
    dropped: dict[int, int] = field(default_factory=dict)
    ended: list[int] = field(default_factory=list)
    tokens: int = 0
    counters: dict[int, PartitionCounters] = field(default_factory=dict)  # partition -> counts after the batch

    @property
    def samples(self) -> int:
        return sum(self.refs.values())


@dataclass
class WriterStats:
    """What the writer thread stored and committed, and the batches it dropped or aborted."""

    batches: int = 0
    refs: int = 0
    dropped: int = 0
    tokens: int = 0
    nbytes: int = 0
    ended_partitions: list[int] = field(default_factory=list)
    stale_batches: int = 0
    aborted_batches: int = 0
    write_s: float = 0.0
    commit_s: float = 0.0


_STOP = object()


def merge(batches: list[PlannedBatch]) -> PlannedBatch:
    """Consecutive batches of one epoch as one transaction (later offsets and counts win)."""
    if len(batches) == 1:
        return batches[0]
    out = PlannedBatch(epoch=batches[0].epoch, group=batches[-1].group, items=[], offsets={})
    for b in batches:
        out.items.extend(b.items)
        out.offsets.update(b.offsets)
        out.counters.update(b.counters)
        out.ended.extend(b.ended)
        out.tokens += b.tokens
        for p, n in b.refs.items():
            out.refs[p] = out.refs.get(p, 0) + n
        for p, n in b.dropped.items():
            out.dropped[p] = out.dropped.get(p, 0) + n
    return out


class BatchWriter:
    """Owns the transactional producer; writes and commits queued batches in order."""

    def __init__(
        self,
        producer: TransactionalProducer,
        store: FeatureStore,
        *,
        run_id: str,
        producer_id: str,
        epoch: int,
        target: TargetInfo,
        samples_topic: str,
        is_stale: Callable[[int], bool] = lambda _epoch: False,
        on_committed: Callable[[PlannedBatch], None] | None = None,
        depth: int = 2,
        max_merge: int = 8,
        storage_dtype: FeatureDtype = "as_captured",
    ) -> None:
        self.producer = producer
        self.store = store
        self.run_id = run_id
        self.producer_id = producer_id
        self.epoch = epoch
        self.target = target
        self.samples_topic = samples_topic
        self.stats = WriterStats()
        self.max_merge = max(max_merge, 1)
        self.storage_dtype = storage_dtype
        self._is_stale = is_stale
        self._on_committed = on_committed
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(depth, 1))
        self._cond = threading.Condition()
        self._pending = 0
        self._aborted_epoch = -1
        self._reset = False
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    # --- control (main thread) -----------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=f"writer-{self.producer_id}", daemon=True)
        self._thread.start()

    def submit(self, batch: PlannedBatch, *, stop: threading.Event | None = None, stop_grace_s: float = 30.0) -> None:
        """Queue a batch; blocks while the queue is full (the capture is far enough ahead).

        Once ``stop`` is set it waits at most ``stop_grace_s`` more: a writer stuck in storage or
        in a commit must not keep a SIGTERMed worker alive. Giving up loses nothing: the batch was
        never committed, so its prompts are redone by whoever owns the partition next.
        """
        self.raise_if_failed()
        with self._cond:
            self._pending += 1
        give_up_at: float | None = None
        while True:
            try:
                self._queue.put(batch, timeout=0.5)
                return
            except queue.Full:
                if self._error is not None or not self._alive():
                    with self._cond:
                        self._pending -= 1
                    self.raise_if_failed()
                    raise RuntimeError("the writer thread is gone") from None
                if stop is not None and stop.is_set():
                    give_up_at = give_up_at or time.monotonic() + stop_grace_s
                    if time.monotonic() > give_up_at:
                        with self._cond:
                            self._pending -= 1
                        raise StreamError(
                            f"the writer took no batch for {stop_grace_s:.0f} s after the stop request "
                            "(storage or broker stuck); exiting without committing it"
                        ) from None

    def write_now(self, batch: PlannedBatch) -> None:
        """Synchronous variant (no thread): write and commit one batch on the caller's thread."""
        with self._cond:
            self._pending += 1
        self._handle(batch)
        self.raise_if_failed()

    def drain(self, timeout_s: float) -> bool:
        """Wait until every submitted batch is committed or dropped; False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    @property
    def pending(self) -> int:
        return self._pending

    def take_reset(self) -> bool:
        """True once after a batch was aborted: the worker must rewind to committed offsets."""
        with self._cond:
            reset, self._reset = self._reset, False
            return reset

    def raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the thread after the queued batches (the caller drained or gave up on them)."""
        if self._thread is None:
            return
        if self._thread.is_alive():
            try:
                self._queue.put(_STOP, timeout=timeout_s)
            except queue.Full:
                logger.warning("writer queue still full at stop; abandoning it")
            self._thread.join(timeout=timeout_s)
            if self._thread.is_alive():
                logger.warning("writer thread did not stop within %.0f s", timeout_s)
        self._thread = None

    def _alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # --- the thread ----------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            batch = self._queue.get()
            if batch is _STOP:
                return
            # Group commit: whatever queued up while the last transaction was committing goes
            # into the next one, so a slow commit costs one round of latency, not one per batch.
            group = [batch]
            stop = False
            while len(group) < self.max_merge:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is _STOP:
                    stop = True
                    break
                group.append(more)
            self._handle(*group)
            if stop:
                return

    def _handle(self, *batches: PlannedBatch) -> None:
        try:
            live = [b for b in batches if self._error is None and not self._stale(b)]
            self.stats.stale_batches += len(batches) - len(live)
            if live:
                merged = merge(live)
                try:
                    self._write(merged)
                except TransportError as exc:
                    self._abort_after(merged, exc)
        except BaseException as exc:  # storage or anything else: stop the worker
            self._fail(exc)
        finally:
            with self._cond:
                self._pending -= len(batches)
                self._cond.notify_all()

    def _stale(self, batch: PlannedBatch) -> bool:
        return batch.epoch <= self._aborted_epoch or self._is_stale(batch.epoch)

    def _abort_after(self, batch: PlannedBatch, exc: TransportError) -> None:
        """A refused commit (e.g. a rebalance fenced our generation): abort, rewind, go on."""
        try:
            self.producer.abort()
        except BaseException as abort_exc:  # fenced producer, broker gone: fatal
            # A fenced producer cannot abort (the broker already did): expected, not an error of its own.
            logger.log(logging.INFO if isinstance(exc, FencedError) else logging.ERROR,
                       "abort after %r failed: %s", exc, abort_exc)  # fmt: skip
            self._fail(exc)
            return
        self.stats.aborted_batches += 1
        logger.warning("batch of epoch %d aborted (%s: %s); rewinding to committed offsets",
                       batch.epoch, type(exc).__name__, exc)
        with self._cond:
            self._aborted_epoch = max(self._aborted_epoch, batch.epoch)
            self._reset = True

    def _fail(self, exc: BaseException) -> None:
        try:
            self.producer.abort()
        except BaseException:  # noqa: BLE001 - the first error is the one to report
            pass
        if self._error is None:
            self._error = exc

    def _write(self, batch: PlannedBatch) -> None:
        started = time.perf_counter()
        # The claim check: every file is complete and visible before any ref of the batch exists.
        stored = {}
        for item in batch.items:
            if isinstance(item, Sample):
                tensors = encode_features(item.tensors, self.storage_dtype)  # storage.dtype, off the capture thread
                stored[id(item)] = self.store.put(item.partition, item.sample_id, tensors)
        if self._stale(batch):  # the assignment moved while we wrote: do not even try
            self.stats.stale_batches += 1
            return
        write_s = time.perf_counter() - started
        started = time.perf_counter()
        self.producer.begin()
        nbytes = 0
        for item in batch.items:
            if isinstance(item, Sample):
                s = stored[id(item)]
                nbytes += s.nbytes
                ref = SampleRef(
                    run_id=self.run_id,
                    sample_id=item.sample_id,
                    prompt_id=item.prompt.prompt_id,
                    epoch=item.prompt.epoch or self.epoch,
                    producer_id=self.producer_id,
                    uri=s.uri,
                    nbytes=s.nbytes,
                    checksum=s.checksum,
                    num_tokens=len(item.prompt.input_ids),
                    tensors=s.tensors,
                    target=self.target,
                    created_at=now(),
                    seq=item.seq,
                )
                self.producer.send(self.samples_topic, item.partition, encode(ref), key=item.sample_id.encode())
            else:
                self.producer.send(item.topic, item.partition, item.value, key=item.key)
            crash_point("generate.after_send", self._flush)
        crash_point("generate.before_commit", self._flush)
        self.producer.commit(batch.offsets, batch.group)
        crash_point("generate.after_commit")
        self.stats.write_s += write_s
        self.stats.commit_s += time.perf_counter() - started
        self.stats.batches += 1
        self.stats.refs += batch.samples
        self.stats.dropped += sum(batch.dropped.values())
        self.stats.tokens += batch.tokens
        self.stats.nbytes += nbytes
        self.stats.ended_partitions.extend(batch.ended)
        if self._on_committed is not None:
            self._on_committed(batch)

    def _flush(self) -> None:
        """Before a crash point kills us: make the doomed records really reach the log."""
        self.producer.flush(timeout=10)
