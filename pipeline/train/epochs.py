"""Epochs over retained features: the online pass, then the same samples again in a fresh order.

Epoch 0 is the live stream as the generators publish it. Once every partition of the rank has
ended, epochs 1..E-1 read the rank's samples again from storage, without running the target:
the online pass's accepted refs are listed once more from the retained samples topic (the same
deterministic merge, without payloads, so a resume lists exactly what an uninterrupted run
listed), then each epoch takes them in a permutation seeded by ``(seed, epoch)`` and fetches and
verifies every payload again when its turn comes (the prefetcher runs ahead of the trainer).

Under a storage budget (``storage.max_bytes``) the samples the online pass did not keep are
captured again for each later epoch (:mod:`pipeline.train.regenerate`) and taken at their turn
in the same order, so an epoch never lacks a sample.

The stream state carries the epoch and the position in its order, so a checkpoint anywhere in
any epoch resumes exactly. Micro-batches may span an epoch boundary: every sample is trained
exactly once per epoch, and only the last epoch can leave a tail.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from typing import Any

import numpy as np

from pipeline.core.deadletter import send_dead_letter
from pipeline.core.eos import Completeness
from pipeline.core.errors import PayloadError, StreamError
from pipeline.core.messages import SampleRef, encode
from pipeline.core.progress import StreamItem, StreamState
from pipeline.core.topics import Producer, Record
from pipeline.train.dataset import ItemSource
from pipeline.train.regenerate import Need, Regenerator, regeneration_needs

__all__ = ("EpochedSource", "epoch_order", "letter_again")

logger = logging.getLogger(__name__)


def epoch_order(count: int, seed: int, epoch: int) -> list[int]:
    """The order of a rank's ``count`` samples in ``epoch``: the same on every run and resume."""
    return [int(i) for i in np.random.default_rng([seed, epoch]).permutation(count)]


class EpochedSource:
    """The online pass, then ``epochs - 1`` passes over its samples from retained features.

    :param live: the rank's live stream, opened at ``state`` (it hands out nothing once ended)
    :param open_listing: opens a payload-free stream of the rank's partitions from the start
    :param fetch: fetches and verifies one sample's payload (``FeatureStore.get``)
    :param reject: dead-letters a sample whose payload fails its checks in a later epoch
    :param regenerate: under a storage budget, makes the rank's :class:`Regenerator` for these
        needs (None: every sample is kept)
    """

    def __init__(
        self,
        live: ItemSource,
        *,
        open_listing: Callable[[], ItemSource],
        fetch: Callable[[SampleRef], dict[str, Any]],
        epochs: int,
        seed: int,
        state: StreamState | None = None,
        reject: Callable[[StreamItem, Exception], None] | None = None,
        regenerate: Callable[[list[Need]], Regenerator] | None = None,
    ) -> None:
        if epochs < 1:
            raise ValueError("epochs must be at least 1")
        self._live = live
        self._open_listing = open_listing
        self._fetch = fetch
        self._reject = reject
        self.epochs = epochs
        self.seed = seed
        self.epoch = state.epoch if state is not None else 0
        self.position = state.epoch_position if state is not None else 0
        self.replayed = state.replayed if state is not None else 0
        self._letters = 0  # dead letters of later epochs since this source was opened
        self._interrupted = threading.Event()
        self._listing: ItemSource | None = None
        self._regenerate = regenerate
        self._regenerator: Regenerator | None = None
        self._hint: Callable[[SampleRef], None] | None = None  # starts the disk on the next file

    def read_into_slots(self, dest: Callable[[SampleRef], Mapping[str, Any] | None]) -> bool:
        """The prefetcher's reused batch buffers (:mod:`pipeline.train.slots`), for the online pass
        and the later epochs alike; False where the live stream cannot read into them."""
        install, fetch = getattr(self._live, "read_into_slots", None), getattr(self._live, "fetch", None)
        if install is None or fetch is None or not install(dest):
            return False
        self._fetch = fetch  # the same fetch (every check, decoded), into the buffers
        self._hint = getattr(self._live, "hint", None)
        return True

    @property
    def dead_letters(self) -> int:
        return self._live.dead_letters + self._letters

    @property
    def dropped_upstream(self) -> int:
        return self._live.dropped_upstream

    def items(self) -> Iterator[StreamItem]:
        """Every sample once per epoch; returns early (resumable) when interrupted."""
        if self.epoch == 0:
            yield from self._live.items()
            done = self._live.summary()
            if done.partitions_ended < done.partitions or self.epochs == 1:
                return  # interrupted mid-pass, or the online pass was the only one
            self.epoch, self.position = 1, 0
        if self.epoch >= self.epochs or self._interrupted.is_set():
            return
        samples = self._list()
        if samples is None:
            return
        needs, taken = self._start_regeneration(samples)
        while self.epoch < self.epochs:
            order = epoch_order(len(samples), self.seed, self.epoch)
            if self.position == 0:
                again = sum(1 for n in needs if n.epoch == self.epoch)
                logger.info("epoch %d of %d: %d samples from retained features, %d captured again",
                            self.epoch + 1, self.epochs, len(order) - again, again)  # fmt: skip
            while self.position < len(order):
                if self._interrupted.is_set():
                    return
                listed = samples[order[self.position]]
                if not listed.kept:
                    assert self._regenerator is not None
                    regenerated = self._regenerator.take(taken)
                    if regenerated is None:
                        return  # interrupted: the position stays at this need
                    taken += 1
                    listed = replace(listed, ref=regenerated.ref, kept=False)
                self.position += 1
                upcoming = samples[order[self.position]] if self.position < len(order) else None
                if self._hint is not None and upcoming is not None and upcoming.kept:
                    self._hint(upcoming.ref)  # the disk starts on it while this one is read and checked
                try:
                    tensors = self._fetch(listed.ref)
                except PayloadError as exc:
                    self._letters += 1
                    logger.error("epoch %d: sample %s fails its checks now: %s", self.epoch, listed.ref.sample_id, exc)
                    if self._reject is not None:
                        self._reject(listed, exc)
                    continue
                self.replayed += 1
                yield replace(listed, tensors=tensors, epoch=self.epoch)
            self.epoch, self.position = self.epoch + 1, 0

    def _start_regeneration(self, samples: list[StreamItem]) -> tuple[list[Need], int]:
        """The rank's needs from here on and how many of them are behind the resume point."""
        if self._regenerate is None:
            if any(not s.kept for s in samples):
                raise StreamError(
                    "the run's storage budget (storage.max_bytes) did not keep every sample for later epochs, and "
                    "this reader cannot capture them again (a replay: their files were deleted once trained)"
                )
            return [], 0
        needs = regeneration_needs(samples, lambda e: epoch_order(len(samples), self.seed, e), self.epochs)
        taken = sum(1 for n in needs if (n.epoch, n.position) < (self.epoch, self.position))
        self._regenerator = self._regenerate(needs)
        self._regenerator.start(taken)
        return needs, taken

    def _list(self) -> list[StreamItem] | None:
        """The online pass's samples of this rank, in their stream order (None: interrupted)."""
        listing = self._open_listing()
        self._listing = listing
        try:
            samples = list(listing.items())
            done = listing.summary()
        finally:
            self._listing = None
            listing.close()
        if self._interrupted.is_set():
            return None
        if done.partitions_ended < done.partitions:
            raise StreamError("listing the online pass's samples again did not reach every end-of-stream marker")
        return samples

    def state(self) -> StreamState:
        """The live stream's state (final once it ended) with the epoch and position in its order."""
        return replace(
            self._live.state(),
            dead_letters=self.dead_letters,
            epoch=self.epoch,
            epoch_position=self.position,
            replayed=self.replayed,
        )

    def summary(self) -> Completeness:
        """The online pass's accounting; ``used`` counts every sample handed out, all epochs."""
        live = self._live.summary()
        return replace(live, used=live.used + self.replayed)

    def interrupt(self) -> None:
        """Ask a blocked ``items()`` (on the prefetch thread) to return at its next poll."""
        self._interrupted.set()
        for stream in (self._live, self._listing, self._regenerator):
            interrupt = getattr(stream, "interrupt", None)  # in-memory sources never block
            if interrupt is not None:
                interrupt()

    def close(self) -> None:
        self._live.close()
        if self._regenerator is not None:
            self._regenerator.close()


def letter_again(dlq: Producer, topic: str, item: StreamItem, error: Exception, run_id: str) -> None:
    """Dead-letter a sample whose payload failed in a later epoch, as the live stream letters a record."""
    send_dead_letter(dlq, run_id, Record(topic, item.partition, item.offset, None, encode(item.ref)), error, item.ref.sample_id)
