"""Later epochs under a storage budget: capture again the samples the budget did not keep.

With ``storage.max_bytes`` the online pass keeps each partition's first samples that fit its
share of the budget (:class:`pipeline.stream.SampleStream` ``keep_share``); retention deletes the
others once trained. For epochs 1..E-1 a rank knows, from its listing of the online pass, which
samples of each epoch's order are not on storage: its *needs*, in the order it will train them
(epoch by epoch, each in its permutation). It publishes their prompts to the regeneration
sub-run (``RunTopics.regen``, the same partitions) with the epoch in them, the generators
capture them there through the same exactly-once path (sample ids ``<run>.regen.e<epoch>...``,
files in the run's own store), and the rank takes each regenerated sample when its turn comes.

Two things keep storage within the budget and the run free of deadlock:

- the rank publishes at most ``window`` needs ahead of the one it is training, so at most that
  many regenerated samples wait on storage; the budget reserves room for them;
- it reads the sub-run in arrival order, not round-robin, so no partition waits for another
  whose next prompt is not published yet; one sub-run serves every later epoch, so a rank
  ahead in its epochs never waits for generators to finish another rank's epoch.

Exactly once and exact resume: each top-up is one transaction that also commits the rank's
published counts as the sub-run source group's offset metadata (as the source does). Needs are
published in one global order, so the committed counts always describe a prefix of it; a
restarted rank recomputes its needs from the same listing and continues from that prefix. The
regenerated refs are read again from the start of the sub-run on every resume; those before the
resume point are skipped.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline.core.errors import DecodeError, StreamError
from pipeline.core.messages import EndOfStream, Prompt, decode, encode
from pipeline.core.progress import SourceCounters, StreamItem, read_source_counters
from pipeline.core.topics import Committed, RunTopics, TransactionalProducer, Transport, read_to_end

if TYPE_CHECKING:
    from pipeline.stream import SampleStream

__all__ = ("Need", "regeneration_needs", "Regenerator")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Need:
    """A sample the budget did not keep, at its turn in a later epoch."""

    epoch: int
    position: int  # its place in that epoch's order
    item: StreamItem  # the online pass's listed sample (its partition, prompt and offset)


def regeneration_needs(
    samples: list[StreamItem], order: Callable[[int], list[int]], epochs: int, start_epoch: int = 1
) -> list[Need]:
    """Every not-kept sample of every later epoch, in the order the rank trains them."""
    return [
        Need(epoch, position, samples[i])
        for epoch in range(start_epoch, epochs)
        for position, i in enumerate(order(epoch))
        if not samples[i].kept
    ]


class Regenerator:
    """One rank's side of the regeneration sub-run: publishes its needs, takes them back.

    :param open_arrivals: opens a payload-free stream of the sub-run's samples over the rank's
        partitions, from the start (``SampleStream(..., fetch=False)``; read by ``arrivals()``)
    """

    def __init__(
        self,
        transport: Transport,
        run_id: str,
        partitions: list[int],
        num_partitions: int,
        needs: list[Need],
        *,
        rank: int,
        window: int,
        open_arrivals: Callable[[], SampleStream],
        transaction_timeout_ms: int = 60_000,
    ) -> None:
        if window < 1:
            raise ValueError("the regeneration window must be at least 1")
        self.transport = transport
        self.run_id = run_id
        self.topics = RunTopics(run_id).regen
        self.partitions = partitions
        self.num_partitions = num_partitions
        self.needs = needs
        self.window = window
        self._index = {(n.epoch, n.item.ref.prompt_id): j for j, n in enumerate(needs)}
        self._transactional_id = f"{self.topics.run_id}.publish.rank{rank}"
        self._timeout_ms = transaction_timeout_ms
        self._open_arrivals = open_arrivals
        self._producer: TransactionalProducer | None = None
        self._counters: dict[int, SourceCounters] = {}
        self._published = 0  # needs published: always a prefix of ``needs``
        self._prompts: dict[str, Prompt] | None = None
        self._stream: SampleStream | None = None
        self._interrupted = threading.Event()
        self._floor = 0
        self._arrivals: Iterator[StreamItem] | None = None
        self._arrived: dict[int, StreamItem] = {}  # need index -> its regenerated ref

    # --- publishing --------------------------------------------------------------------

    def start(self, taken: int) -> None:
        """Resume at need ``taken`` (the needs before it are trained): publish what the window allows."""
        self._producer = self.transport.transactional_producer(
            self._transactional_id, transaction_timeout_ms=self._timeout_ms, writes=[self.topics.prompts]
        )
        counts = read_source_counters(self.transport, self.topics, self.num_partitions)
        self._counters = {p: counts[p] for p in self.partitions}
        self._published = sum(c.prompts for c in self._counters.values())
        prefix: dict[int, int] = {p: 0 for p in self.partitions}
        for need in self.needs[: self._published]:
            prefix[need.item.partition] += 1
        if any(prefix[p] != c.prompts for p, c in self._counters.items()) or self._published > len(self.needs):
            raise StreamError(
                f"{self.topics.prompts}: the committed counts {({p: c.prompts for p, c in self._counters.items()})} "
                "are not a prefix of this rank's needs: the run's listing or its budget changed since they were published"
            )
        self._floor = taken
        self._top_up(taken)

    def _top_up(self, taken: int) -> None:
        """Publish needs up to ``taken + window`` in one transaction; close the partitions after the last."""
        assert self._producer is not None
        upto = min(len(self.needs), taken + self.window)
        closing = self._published >= upto == len(self.needs) and not all(c.ended for c in self._counters.values())
        if self._published >= upto and not closing:
            return
        changed: dict[int, SourceCounters] = {}
        self._producer.begin()
        for need in self.needs[self._published : upto]:
            p = need.item.partition
            c = changed.get(p, self._counters[p])
            prompt = self._prompt(need.item.ref.prompt_id)
            again = prompt.model_copy(update={"run_id": self.topics.run_id, "seq": c.prompts, "epoch": need.epoch})
            self._producer.send(self.topics.prompts, p, encode(again), key=prompt.prompt_id.encode())
            changed[p] = SourceCounters(c.prompts + 1, c.letters, c.ended)
        if upto == len(self.needs):  # every need is out: end each partition of this rank
            for p in self.partitions:
                c = changed.get(p, self._counters[p])
                if c.ended:
                    continue
                marker = EndOfStream(run_id=self.topics.run_id, stage="source", partition=p, count=c.prompts,
                                     seq=c.prompts, producer_id="source")  # fmt: skip
                self._producer.send(self.topics.prompts, p, encode(marker))
                changed[p] = SourceCounters(c.prompts, c.letters, True)
        offsets = {(self.topics.prompts, p): Committed(c.prompts + int(c.ended), c.to_metadata()) for p, c in changed.items()}
        self._producer.commit(offsets, self.topics.source_group)
        self._counters.update(changed)
        if upto > self._published:
            logger.debug("regeneration: published needs %d..%d of %d", self._published, upto - 1, len(self.needs))
        self._published = upto

    def _prompt(self, prompt_id: str) -> Prompt:
        """The online prompt of a need, read once from the run's prompts topic."""
        if self._prompts is None:
            wanted = {n.item.ref.prompt_id for n in self.needs}
            self._prompts = {}
            for record in read_to_end(self.transport, RunTopics(self.run_id).prompts, self.partitions):
                try:
                    message = decode(record.value or b"")
                except DecodeError:  # a stray record on the prompts topic: the generators dead-lettered it
                    continue
                if isinstance(message, Prompt) and message.run_id == self.run_id and message.prompt_id in wanted:
                    self._prompts.setdefault(message.prompt_id, message)
        try:
            return self._prompts[prompt_id]
        except KeyError:
            raise StreamError(f"prompt {prompt_id} is not on {RunTopics(self.run_id).prompts}: it cannot be captured again") from None

    # --- taking the regenerated samples back ----------------------------------------------

    def take(self, j: int) -> StreamItem | None:
        """Need ``j``'s regenerated sample (its ref, no payload), waiting for it; None: interrupted."""
        self._top_up(j + 1)
        if self._arrivals is None:
            self._stream = self._open_arrivals()
            self._arrivals = self._stream.arrivals()
            if self._interrupted.is_set():
                self._stream.interrupt()
        while j not in self._arrived:
            item = next(self._arrivals, None)
            if item is None:
                if self._interrupted.is_set():
                    return None
                raise StreamError(
                    f"{self.topics.samples} ended without the regenerated sample of need {j} "
                    f"(prompt {self.needs[j].item.ref.prompt_id}, epoch {self.needs[j].epoch})"
                )
            k = self._index.get((item.ref.epoch, item.ref.prompt_id))
            if k is None:
                raise StreamError(f"{self.topics.samples}: sample {item.ref.sample_id} is no need of this rank")
            if k >= self._floor:  # the ones before the resume point were trained before it
                self._arrived[k] = item
        return self._arrived.pop(j)

    def interrupt(self) -> None:
        """Ask a ``take`` blocked on another thread to return None at its next poll."""
        self._interrupted.set()
        if self._stream is not None:
            self._stream.interrupt()

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
        if self._producer is not None:
            self._producer.close()
