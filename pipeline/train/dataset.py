"""The stream dataset of one trainer rank: verified samples -> collated micro-batches, prefetched.

A :class:`Prefetcher` runs the rank's :class:`~pipeline.stream.SampleStream` (or anything that
behaves like it: replay, in-memory tests) in a background thread: it fetches and verifies the
payloads, collates ``batch_size`` samples into one right-padded :class:`Batch` and puts it in a
bounded queue, so the training step never waits on Kafka, storage or padding while the queue is
full. Each micro-batch carries the stream's resume state *as of its last sample*: the trainer
checkpoints the state of the last micro-batch it stepped on, not the prefetcher's read-ahead
position, which is what makes resume exact.

A :class:`LockstepFeeder` turns micro-batches into optimizer steps. Its :meth:`~LockstepFeeder.vote`
says whether this rank holds ``grad_accum`` full micro-batches; the ranks combine their votes
(:meth:`pipeline.train.distributed.DistContext.agree`), and only a unanimous READY starts a step.
When the decision is ENDED every rank :meth:`~LockstepFeeder.drain`\\ s its stream to the end of
stream and reports what it could not step: the tail.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields, replace
from typing import Protocol

import torch

from pipeline.core.eos import Completeness
from pipeline.core.messages import SampleRef
from pipeline.core.progress import StreamItem, StreamState
from pipeline.train.collate import Batch, collate
from pipeline.train.distributed import Vote
from pipeline.train.slots import BatchSlots

__all__ = (
    "ItemSource",
    "SampleInfo",
    "MicroBatch",
    "StreamEnd",
    "Prefetcher",
    "LockstepFeeder",
    "Tail",
)

logger = logging.getLogger(__name__)


class ItemSource(Protocol):
    """What the dataset reads: :class:`~pipeline.stream.SampleStream` is the live implementation."""

    dead_letters: int
    dropped_upstream: int

    def items(self) -> Iterator[StreamItem]: ...

    def state(self) -> StreamState: ...

    def summary(self) -> Completeness: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class SampleInfo:
    """What the ledger and the retention policy need to know of one sample."""

    sample_id: str
    partition: int
    offset: int
    uri: str
    num_tokens: int
    epoch: int = 0  # the training epoch it was read for (0: the online pass)
    kept: bool = True  # False: no later epoch reads this file (a storage budget captures it again)


@dataclass(frozen=True)
class MicroBatch:
    """``batch_size`` collated samples and the stream state right after the last of them."""

    batch: Batch
    samples: tuple[SampleInfo, ...]
    state: StreamState
    prepare_s: float  # prefetch-thread time spent fetching, verifying and collating it

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.samples)


@dataclass(frozen=True)
class StreamEnd:
    """Every partition of this rank has ended; ``partial`` is the last, incomplete micro-batch."""

    partial: tuple[SampleInfo, ...]
    state: StreamState
    summary: Completeness
    dead_letters: int
    dropped_upstream: int


@dataclass(frozen=True)
class _Failure:
    error: BaseException


@dataclass
class Tail:
    """What a rank could not step at the end of the stream, and its final stream state."""

    samples: list[SampleInfo] = field(default_factory=list)
    end: StreamEnd | None = None


def _info(item: StreamItem) -> SampleInfo:
    ref = item.ref
    return SampleInfo(ref.sample_id, item.partition, item.offset, ref.uri, ref.num_tokens, item.epoch, item.kept)


def _pinned(batch: Batch) -> Batch:
    return replace(batch, **{f.name: getattr(batch, f.name).pin_memory() for f in fields(batch)})


class Prefetcher:
    """Fetch, verify and collate in a background thread, ``depth`` micro-batches ahead.

    :param check_ref: called for every sample ref before use (e.g. refuse another target's
        features); an exception stops the stream and reaches the trainer as its error
    """

    def __init__(
        self,
        source: ItemSource,
        *,
        batch_size: int,
        depth: int = 4,
        max_length: int | None = None,
        dtype: torch.dtype | None = None,
        pin_memory: bool = False,
        check_ref: Callable[[SampleRef], None] | None = None,
        name: str = "prefetch",
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.source = source
        self.batch_size = batch_size
        self.max_length = max_length
        self.dtype = dtype
        self.pin_memory = pin_memory
        self._check_ref = check_ref
        self._slots = BatchSlots.install(  # hidden states read straight into reused (pinned) batch buffers
            source, batch_size, max_length=max_length, dtype=dtype, pin=pin_memory, keep=max(1, depth) + 10
        )  # up to: the queue, the one being filled, the step's grad_accum (<= 8) and one being dropped
        self._queue: queue.Queue[MicroBatch | StreamEnd | _Failure] = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._started = False

    def start(self) -> Prefetcher:
        if not self._started:
            self._started = True
            self._thread.start()
        return self

    def get(self, timeout_s: float) -> MicroBatch | StreamEnd | None:
        """The next micro-batch or the end marker; None if nothing came within ``timeout_s``.

        Re-raises, on the caller's thread, an error the prefetch thread hit.
        """
        try:
            got = self._queue.get(timeout=timeout_s)
        except queue.Empty:
            return None
        if isinstance(got, _Failure):
            try:
                self._queue.put_nowait(got)  # sticky: later calls fail the same way
            except queue.Full:
                pass
            raise got.error
        return got

    def close(self, timeout_s: float = 3.0) -> None:
        """Stop the thread; the source is closed by the thread itself (consumers are not thread safe).

        A thread stuck in a poll past ``timeout_s`` is left to die with the process (daemon).
        """
        self._stop.set()
        if not self._started:
            self.source.close()
            return
        interrupt = getattr(self.source, "interrupt", None)
        if interrupt is not None:
            interrupt()  # unblocks a poll waiting for data that may never come
        self._thread.join(timeout=timeout_s)
        if self._thread.is_alive():
            logger.warning(
                "prefetch thread still busy after %.0f s; leaving it to exit with the process", timeout_s
            )

    # --- the thread ----------------------------------------------------------------------

    def _put(self, item: MicroBatch | StreamEnd | _Failure) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            pending: list[StreamItem] = []
            started = time.perf_counter()
            for item in self.source.items():
                if self._stop.is_set():
                    return
                if self._check_ref is not None:
                    self._check_ref(item.ref)
                pending.append(item)
                if self._slots is not None:
                    self._slots.row = len(pending)
                if len(pending) == self.batch_size:
                    micro = self._collate(pending, started)
                    pending = []
                    if not self._put(micro):
                        return
                    started = time.perf_counter()
            end = StreamEnd(
                partial=tuple(_info(i) for i in pending),
                state=self.source.state(),
                summary=self.source.summary(),
                dead_letters=self.source.dead_letters,
                dropped_upstream=self.source.dropped_upstream,
            )
            self._put(end)
        except BaseException as exc:  # handed to the trainer's thread, re-raised there
            logger.debug("prefetch thread failed", exc_info=True)
            self._put(_Failure(exc))
        finally:
            try:
                self.source.close()
            except Exception as exc:  # closing after a failure must not mask it
                logger.warning("closing the sample stream failed: %s", exc)

    def _collate(self, items: list[StreamItem], started: float) -> MicroBatch:
        out = None if self._slots is None else self._slots.take()
        batch = collate([i.tensors for i in items], max_length=self.max_length, dtype=self.dtype, out=out)
        if self.pin_memory:
            batch = _pinned(batch)
        return MicroBatch(
            batch=batch,
            samples=tuple(_info(i) for i in items),
            state=self.source.state(),
            prepare_s=time.perf_counter() - started,
        )


class LockstepFeeder:
    """Hands out exactly ``grad_accum`` micro-batches per optimizer step, or none.

    ``wait_s`` accumulates the time the training loop spent blocked on the prefetch queue: the
    numerator of the data-wait fraction.
    """

    def __init__(self, prefetcher: Prefetcher, grad_accum: int, *, poll_s: float = 0.05) -> None:
        if grad_accum < 1:
            raise ValueError("grad_accum must be at least 1")
        self.prefetcher = prefetcher
        self.grad_accum = grad_accum
        self.poll_s = poll_s
        self.held: list[MicroBatch] = []
        self.end: StreamEnd | None = None
        self.error: BaseException | None = None
        self.wait_s = 0.0

    def vote(self, stop: threading.Event) -> Vote:
        """Block until this rank has a full step, its stream ended, a stop came or it failed."""
        while True:
            if self.error is not None:
                return Vote.FAILED
            if stop.is_set():
                return Vote.STOP
            if len(self.held) >= self.grad_accum:
                return Vote.READY
            if self.end is not None:
                return Vote.ENDED
            started = time.perf_counter()
            try:
                got = self.prefetcher.get(self.poll_s)
            except BaseException as exc:  # noqa: BLE001 - voted FAILED, re-raised by the trainer
                self.error = exc
                continue
            finally:
                self.wait_s += time.perf_counter() - started
            if isinstance(got, StreamEnd):
                self.end = got
            elif got is not None:
                self.held.append(got)

    def take(self) -> list[MicroBatch]:
        """The next step's micro-batches; only after a unanimous READY."""
        if len(self.held) < self.grad_accum:
            raise RuntimeError(f"take() with {len(self.held)} of {self.grad_accum} micro-batches held")
        step, self.held = self.held[: self.grad_accum], self.held[self.grad_accum :]
        return step

    def drain(self, deadline_s: float | None = None) -> Tail:
        """After an ENDED decision: read this rank's stream to its end; return what was not stepped.

        The stream's own idle timeout bounds the wait for a stalled producer; ``deadline_s``
        bounds the whole drain on top of it.
        """
        limit = None if deadline_s is None else time.monotonic() + deadline_s
        tail = Tail()
        for micro in self.held:
            tail.samples.extend(micro.samples)
        self.held = []
        while self.end is None:
            if self.error is not None:
                raise self.error
            if limit is not None and time.monotonic() > limit:
                raise TimeoutError(f"the stream did not end within {deadline_s:.0f} s of the last step")
            got = self.prefetcher.get(self.poll_s)
            if isinstance(got, StreamEnd):
                self.end = got
            elif got is not None:
                tail.samples.extend(got.samples)
        tail.samples.extend(self.end.partial)
        tail.end = self.end
        return tail
