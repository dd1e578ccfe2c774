"""Prompts onto the prompts topic exactly once, restartably, and every partition closed.

:class:`PromptPublisher` sends prompt i to partition ``i % P`` and makes every chunk one
transaction (cut only after a prompt, so a dead letter commits with the prompt after it). Each
transaction also commits, as the metadata of the source group's offsets, every partition's
counts (:class:`~pipeline.core.progress.SourceCounters`: prompts, dead letters, ended). So after
a crash (the source's transactional id fences the dead instance and aborts its open chunk) a
restart reads those counts, one request whatever the size of the topic, and continues from
there without repeating a prompt or a dead letter. A partition whose end-of-stream marker is
committed is left alone. Records other producers wrote into the prompts topic never count: the
topic is not read at all.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

from pipeline.core.deadletter import DeadLetterLimitExceeded
from pipeline.core.errors import DecodeError
from pipeline.core.messages import DeadLetter, EndOfStream, Prompt, encode
from pipeline.core.progress import SourceCounters, read_source_counters
from pipeline.core.topics import Committed, RunTopics, TransactionalProducer, Transport

__all__ = ("SourceStats", "PromptPublisher")

logger = logging.getLogger(__name__)


@dataclass
class SourceStats:
    """What one publishing attempt did, so a restart can be told from a first run."""

    published: int = 0
    skipped: int = 0  # already committed by an earlier attempt
    dead_letters: int = 0
    per_partition: dict[int, int] = field(default_factory=dict)
    failed: str | None = None  # the reason the partitions were closed as failed
    stopped: bool = False  # a stop request ended the attempt: its open chunk aborted, a rerun resumes


class PromptPublisher:
    """Publishes a run's prompts exactly once and closes every partition."""

    def __init__(
        self,
        transport: Transport,
        run_id: str,
        partitions: int,
        *,
        chunk_size: int = 256,
        transaction_timeout_ms: int = 60_000,
    ) -> None:
        self.transport = transport
        self.run_id = run_id
        self.topics = RunTopics(run_id)
        self.partitions = partitions
        self.chunk_size = chunk_size
        self.transaction_timeout_ms = transaction_timeout_ms

    def publish(
        self,
        prompts: Iterable[Prompt | DeadLetter],
        *,
        before_close: Callable[[], None] | None = None,
        stop: threading.Event | None = None,
    ) -> SourceStats:
        """Send every prompt (DeadLetters go to the DLQ, keeping the prompt numbering).

        ``before_close`` runs after the last prompt is committed and before the end-of-stream
        markers are (the vocabulary mapping is stored there). When iterating ``prompts`` raises
        a :class:`~pipeline.core.errors.DecodeError` (bad input under a ``fail`` policy), the open
        chunk is aborted, every open partition is closed as failed with that reason, and the
        error is re-raised; any other error just aborts the chunk (a restart resumes). Once
        ``stop`` is set the open chunk is aborted and nothing more is sent (``stats.stopped``).
        """
        producer = self.transport.transactional_producer(
            f"{self.run_id}.source", transaction_timeout_ms=self.transaction_timeout_ms,
            writes=[self.topics.prompts, self.topics.dlq],
        )  # fmt: skip
        try:
            start = read_source_counters(self.transport, self.topics, self.partitions)
            stats = SourceStats(per_partition={p: c.prompts for p, c in start.items()})
            current, committed = dict(start), dict(start)
            try:
                sent = self._send_all(producer, prompts, start, current, committed, stats, stop)
            except (DecodeError, DeadLetterLimitExceeded) as exc:  # bad input: close every partition failed
                producer.abort()
                self._close(producer, committed, str(exc))
                stats.failed = str(exc)
                raise
            if sent is None:  # stopped: back at the last committed chunk
                stats.stopped = True
                return stats
            trailing, next_p = sent
            if before_close is not None:
                before_close()
            producer.begin()
            if trailing and not current[next_p].ended:  # letters after the last prompt go with the markers
                for letter in trailing:
                    producer.send(self.topics.dlq, 0, encode(letter))
                    stats.dead_letters += 1
                current[next_p] = replace(current[next_p], letters=current[next_p].letters + len(trailing))
            self._close(producer, current, None, begun=True)
            return stats
        finally:
            producer.close()

    def _send_all(
        self,
        producer: TransactionalProducer,
        items: Iterable[Prompt | DeadLetter],
        start: dict[int, SourceCounters],
        current: dict[int, SourceCounters],
        committed: dict[int, SourceCounters],
        stats: SourceStats,
        stop: threading.Event | None = None,
    ) -> tuple[list[DeadLetter], int] | None:
        """Send the items in chunk transactions, skipping what ``start`` says an earlier attempt
        committed; ``current`` counts what was sent, ``committed`` what each commit made durable
        (for the failed markers if the input turns out bad). Returns the dead letters after the
        last prompt (they commit with the end-of-stream markers) and the partition they count on,
        or None when ``stop`` ended the attempt (the open chunk is aborted)."""
        index = 0
        in_chunk = 0
        seen = {p: 0 for p in range(self.partitions)}  # own prompts of each partition met so far
        pending: list[DeadLetter] = []  # sent with the next prompt: committed together or not at all
        producer.begin()
        for item in items:
            if stop is not None and stop.is_set():
                producer.abort()
                return None
            if isinstance(item, DeadLetter):
                pending.append(item)
                continue
            p = index % self.partitions
            index += 1
            if start[p].ended or seen[p] < start[p].prompts:  # committed by an earlier attempt, letters too
                seen[p] += 1
                stats.skipped += 1
                pending.clear()
                continue
            for letter in pending:
                producer.send(self.topics.dlq, 0, encode(letter))
                stats.dead_letters += 1
                in_chunk += 1
            numbered = item.model_copy(update={"seq": seen[p]})
            producer.send(self.topics.prompts, p, encode(numbered), key=item.prompt_id.encode())
            seen[p] += 1
            current[p] = replace(current[p], prompts=seen[p], letters=current[p].letters + len(pending))
            pending.clear()
            stats.published += 1
            stats.per_partition[p] = seen[p]
            in_chunk += 1
            if in_chunk >= self.chunk_size:
                self._commit(producer, current, committed)
                producer.begin()
                in_chunk = 0
        self._commit(producer, current, committed)
        return pending, index % self.partitions

    def _offsets(self, counters: dict[int, SourceCounters]) -> dict[tuple[str, int], Committed]:
        """The source group's offsets that carry ``counters`` (offset: own records, marker included)."""
        return {
            (self.topics.prompts, p): Committed(c.prompts + int(c.ended), c.to_metadata())
            for p, c in counters.items()
        }

    def _commit(
        self,
        producer: TransactionalProducer,
        current: dict[int, SourceCounters],
        committed: dict[int, SourceCounters],
    ) -> None:
        """Commit the open chunk with the counts it changed."""
        changed = {p: c for p, c in current.items() if c != committed[p]}
        producer.commit(self._offsets(changed), self.topics.source_group)
        committed.update(changed)

    def _close(
        self,
        producer: TransactionalProducer,
        counters: dict[int, SourceCounters],
        fail_reason: str | None,
        *,
        begun: bool = False,
    ) -> None:
        """One transaction with an end-of-stream marker on every open partition, and its counts."""
        if not begun:
            producer.begin()
        closing = {p: replace(c, ended=True) for p, c in counters.items() if not c.ended}
        for p, c in closing.items():
            marker = EndOfStream(
                run_id=self.run_id,
                stage="source",
                partition=p,
                count=c.prompts,
                seq=c.prompts,
                status="failed" if fail_reason else "complete",
                reason=fail_reason or "",
                producer_id="source",
            )
            producer.send(self.topics.prompts, p, encode(marker))
        producer.commit(self._offsets(closing), self.topics.source_group)
        counters.update(closing)
