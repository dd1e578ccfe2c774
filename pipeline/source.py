"""The source stage: prompts onto the prompts topic, round-robin, each partition closed by EOS.

Exactly once and restartable: prompt i always goes to partition ``i % P`` and every chunk is one
transaction, so after a crash the publisher counts the committed prompts per partition (the
source's transactional id fences the dead instance and aborts its open chunk) and continues
from there. A partition that already carries its end-of-stream marker is left alone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from pipeline.errors import StreamError
from pipeline.kafka import KafkaSettings, PartitionReader, RunTopics, TransactionalProducer
from pipeline.messages import DeadLetter, EndOfStream, Prompt, decode, encode

__all__ = ("PromptPublisher", "SourceStats", "committed_prompt_counts")

logger = logging.getLogger(__name__)


@dataclass
class SourceStats:
    published: int = 0
    skipped: int = 0  # already committed by an earlier attempt
    dead_letters: int = 0
    per_partition: dict[int, int] = field(default_factory=dict)


def committed_prompt_counts(
    settings: KafkaSettings, topics: RunTopics, partitions: int, *, timeout_s: float = 120.0
) -> tuple[dict[int, int], set[int]]:
    """Per partition: prompts already committed, and which partitions are already closed."""
    reader = PartitionReader(settings, topics.prompts, partitions=range(partitions), start="earliest")
    try:
        ends = reader.end_offsets()
        counts = {p: 0 for p in range(partitions)}
        closed: set[int] = set()
        deadline = time.monotonic() + timeout_s
        while any(reader.position(p) < ends[p] for p in ends):
            if time.monotonic() > deadline:
                raise StreamError(f"reading back {topics.prompts} took longer than {timeout_s:.0f} s")
            for record in reader.poll(0.5):
                message = decode(record.value or b"")
                if isinstance(message, Prompt):
                    counts[record.partition] += 1
                elif isinstance(message, EndOfStream):
                    closed.add(record.partition)
        return counts, closed
    finally:
        reader.close()


class PromptPublisher:
    """Publishes a run's prompts exactly once and closes every partition."""

    def __init__(
        self,
        settings: KafkaSettings,
        run_id: str,
        partitions: int,
        *,
        chunk_size: int = 256,
        transaction_timeout_ms: int = 60_000,
    ) -> None:
        self.settings = settings
        self.run_id = run_id
        self.topics = RunTopics(run_id)
        self.partitions = partitions
        self.chunk_size = chunk_size
        self.transaction_timeout_ms = transaction_timeout_ms

    def publish(
        self,
        prompts: Iterable[Prompt | DeadLetter],
        *,
        fail_reason: str | None = None,
    ) -> SourceStats:
        """Send every prompt (DeadLetters go to the DLQ, keeping the prompt numbering)."""
        producer = TransactionalProducer(
            self.settings, f"{self.run_id}.source", transaction_timeout_ms=self.transaction_timeout_ms
        )
        try:
            done, closed = committed_prompt_counts(self.settings, self.topics, self.partitions)
            stats = SourceStats(per_partition=dict(done))
            sent = {p: 0 for p in range(self.partitions)}
            index = 0
            in_chunk = 0
            producer.begin()
            for item in prompts:
                if isinstance(item, DeadLetter):
                    producer.send(self.topics.dlq, 0, encode(item))
                    stats.dead_letters += 1
                else:
                    p = index % self.partitions
                    index += 1
                    if p in closed or sent[p] < done[p]:
                        sent[p] += 1
                        stats.skipped += 1
                        continue
                    producer.send(self.topics.prompts, p, encode(item), key=item.prompt_id.encode())
                    sent[p] += 1
                    stats.published += 1
                    stats.per_partition[p] = sent[p]
                in_chunk += 1
                if in_chunk >= self.chunk_size:
                    producer.commit()
                    producer.begin()
                    in_chunk = 0
            for p in range(self.partitions):
                if p in closed:
                    continue
                status = "failed" if fail_reason else "complete"
                producer.send(
                    self.topics.prompts,
                    p,
                    encode(
                        EndOfStream(
                            run_id=self.run_id,
                            stage="source",
                            partition=p,
                            count=sent[p],
                            status=status,
                            reason=fail_reason or "",
                            producer_id="source",
                        )
                    ),
                )
            producer.commit()
            return stats
        finally:
            producer.close()
