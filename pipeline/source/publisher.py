"""Prompts onto the prompts topic exactly once, restartably, and every partition closed.

:class:`PromptPublisher` sends prompt i to partition ``i % P`` and makes every chunk one
transaction (cut only after a prompt, so a dead letter commits with the prompt after it), so after
a crash it counts the committed prompts per partition (the source's transactional id fences the
dead instance and aborts its open chunk) and continues from there, without repeating a prompt or
a dead letter. A partition that already carries its end-of-stream marker is left alone.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from pipeline.core.deadletter import DeadLetterLimitExceeded
from pipeline.core.errors import DecodeError
from pipeline.core.messages import DeadLetter, EndOfStream, Prompt, decode, encode
from pipeline.core.topics import RunTopics, TransactionalProducer, Transport, read_to_end

__all__ = ("SourceStats", "committed_prompt_counts", "PromptPublisher")

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


def committed_prompt_counts(
    transport: Transport, topics: RunTopics, partitions: int, *, timeout_s: float = 120.0
) -> tuple[dict[int, int], set[int]]:
    """Per partition: the source's own prompts already committed, and which partitions it closed.

    Only the source's numbered output counts (``pipeline.core.eos``): a stray record another
    producer wrote into the prompts topic is skipped here, never counted and never fatal.
    """
    counts = {p: 0 for p in range(partitions)}
    closed: set[int] = set()
    for record in read_to_end(transport, topics.prompts, range(partitions), timeout_s=timeout_s):
        p = record.partition
        try:
            message = decode(record.value or b"")
        except DecodeError:
            continue
        if p in closed or message.run_id != topics.run_id:
            continue
        if isinstance(message, Prompt) and message.seq == counts[p]:
            counts[p] += 1
        elif isinstance(message, EndOfStream) and message.stage == "source" and message.seq == counts[p]:
            closed.add(p)
    return counts, closed


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
            f"{self.run_id}.source", transaction_timeout_ms=self.transaction_timeout_ms
        )
        try:
            done, closed = committed_prompt_counts(self.transport, self.topics, self.partitions)
            stats = SourceStats(per_partition=dict(done))
            sent = {p: 0 for p in range(self.partitions)}
            committed = dict(done)
            try:
                trailing = self._send_all(producer, prompts, done, closed, sent, committed, stats, stop)
            except (DecodeError, DeadLetterLimitExceeded) as exc:  # bad input: close every partition failed
                producer.abort()
                self._close(producer, closed, committed, str(exc))
                stats.failed = str(exc)
                raise
            if trailing is None:  # stopped: back at the last committed chunk
                stats.stopped = True
                return stats
            if before_close is not None:
                before_close()
            producer.begin()
            if len(closed) < self.partitions:  # letters after the last prompt go with the markers
                for letter in trailing:
                    producer.send(self.topics.dlq, 0, encode(letter))
                    stats.dead_letters += 1
            self._close(producer, closed, sent, None, begun=True)
            return stats
        finally:
            producer.close()

    def _send_all(
        self,
        producer: TransactionalProducer,
        items: Iterable[Prompt | DeadLetter],
        done: dict[int, int],
        closed: set[int],
        sent: dict[int, int],
        committed: dict[int, int],
        stats: SourceStats,
        stop: threading.Event | None = None,
    ) -> list[DeadLetter] | None:
        """Send the items in chunk transactions; ``committed`` follows what each commit made
        durable (per partition), for the failed markers if the input turns out bad. Returns the
        dead letters after the last prompt (they commit with the end-of-stream markers), or None
        when ``stop`` ended the attempt (the open chunk is aborted)."""
        index = 0
        in_chunk = 0
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
            if p in closed or sent[p] < done[p]:  # committed by an earlier attempt, letters too
                sent[p] += 1
                stats.skipped += 1
                pending.clear()
                continue
            for letter in pending:
                producer.send(self.topics.dlq, 0, encode(letter))
                stats.dead_letters += 1
                in_chunk += 1
            pending.clear()
            numbered = item.model_copy(update={"seq": sent[p]})
            producer.send(self.topics.prompts, p, encode(numbered), key=item.prompt_id.encode())
            sent[p] += 1
            stats.published += 1
            stats.per_partition[p] = sent[p]
            in_chunk += 1
            if in_chunk >= self.chunk_size:
                producer.commit()
                committed.update({q: max(committed[q], n) for q, n in sent.items()})
                producer.begin()
                in_chunk = 0
        producer.commit()
        committed.update({q: max(committed[q], n) for q, n in sent.items()})
        return pending

    def _close(
        self,
        producer: TransactionalProducer,
        closed: set[int],
        counts: dict[int, int],
        fail_reason: str | None,
        *,
        begun: bool = False,
    ) -> None:
        """One transaction with an end-of-stream marker on every open partition."""
        if not begun:
            producer.begin()
        for p in range(self.partitions):
            if p in closed:
                continue
            marker = EndOfStream(
                run_id=self.run_id,
                stage="source",
                partition=p,
                count=counts[p],
                seq=counts[p],
                status="failed" if fail_reason else "complete",
                reason=fail_reason or "",
                producer_id="source",
            )
            producer.send(self.topics.prompts, p, encode(marker))
        producer.commit()
