"""The generator worker: prompts in, feature files and sample refs out, exactly once.

Consume-transform-produce in one Kafka transaction per batch:

1. poll a batch of prompt records (``read_committed``);
2. capture the target's hidden states for the prompts;
3. write each sample's safetensors file to its deterministic path (complete before its ref);
4. in the transaction: the refs (prompt partition p -> samples partition p), DLQ records for
   bad input, forwarded end-of-stream markers, and the consumed prompt offsets, whose metadata
   carries the partition's running counts (refs, dropped, ended);
5. commit.

A worker killed anywhere loses nothing: its open transaction aborts (or is fenced by its restart,
which reuses the transactional id), the prompts are re-read from the committed offset by
whoever owns the partition next, and the same deterministic paths are overwritten. The counts
travel with the offsets, so the end-of-stream marker is right whichever worker forwards it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from pipeline.errors import CaptureContractError, DecodeError
from pipeline.faults import crash_point
from pipeline.features import check_capture
from pipeline.kafka import Committed, KafkaSettings, PartitionReader, Record, RunTopics, TransactionalProducer
from pipeline.messages import (
    DeadLetter,
    EndOfStream,
    Prompt,
    SampleRef,
    decode,
    encode,
    now,
    sample_id_for,
)
from pipeline.storage import FeatureStore

__all__ = ("GeneratorConfig", "GeneratorWorker", "GeneratorStats", "PartitionCounters", "dead_letter")

logger = logging.getLogger(__name__)

_PAYLOAD_LIMIT = 64 * 1024


@dataclass(frozen=True)
class PartitionCounters:
    """Running counts of one samples partition, committed with the prompt offsets."""

    refs: int = 0
    dropped: int = 0
    ended: bool = False

    def to_metadata(self) -> str:
        return json.dumps({"refs": self.refs, "dropped": self.dropped, "ended": self.ended})

    @classmethod
    def from_metadata(cls, text: str) -> PartitionCounters:
        if not text:
            return cls()
        data = json.loads(text)
        return cls(int(data["refs"]), int(data["dropped"]), bool(data["ended"]))


@dataclass
class GeneratorConfig:
    run_id: str
    worker_id: str
    partitions: list[int] | None = None  # None: join the generators' consumer group
    batch_size: int = 8
    epoch: int = 0
    poll_timeout_s: float = 0.5
    transaction_timeout_ms: int = 60_000
    session_timeout_ms: int = 45_000


@dataclass
class GeneratorStats:
    batches: int = 0
    refs: int = 0
    dropped: int = 0
    ended_partitions: list[int] = field(default_factory=list)
    capture_s: float = 0.0
    write_s: float = 0.0
    commit_s: float = 0.0
    tokens: int = 0


def dead_letter(run_id: str, record: Record, error: Exception, sample_id: str | None = None) -> DeadLetter:
    payload = record.value or b""
    text = payload[:_PAYLOAD_LIMIT].decode("utf-8", errors="replace")
    return DeadLetter(
        run_id=run_id,
        source_topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        error=type(error).__name__,
        reason=str(error) or type(error).__name__,
        payload=text,
        payload_truncated=len(payload) > _PAYLOAD_LIMIT,
        sample_id=sample_id,
        created_at=now(),
    )


class GeneratorWorker:
    """One target replica: a member of the generators' group (or a fixed set of partitions)."""

    def __init__(
        self,
        settings: KafkaSettings,
        store: FeatureStore,
        backend: object,
        config: GeneratorConfig,
        *,
        should_pause: Callable[[], bool] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.backend = backend
        self.config = config
        self.topics = RunTopics(config.run_id)
        self.stats = GeneratorStats()
        self._should_pause = should_pause
        self._counters: dict[int, PartitionCounters] = {}
        self._reader: PartitionReader | None = None
        self._producer: TransactionalProducer | None = None

    @property
    def transactional_id(self) -> str:
        return f"{self.config.run_id}.generate.{self.config.worker_id}"

    # --- lifecycle -----------------------------------------------------------------------

    def run(self, stop: threading.Event | None = None) -> GeneratorStats:
        """Process until every owned partition has ended (fixed partitions) or ``stop`` is set."""
        stop = stop or threading.Event()
        cfg = self.config
        self._producer = TransactionalProducer(
            self.settings, self.transactional_id, transaction_timeout_ms=cfg.transaction_timeout_ms
        )
        self._reader = PartitionReader(
            self.settings,
            self.topics.prompts,
            partitions=cfg.partitions,
            group_id=self.topics.generator_group,
            start="committed",
            max_poll_records=cfg.batch_size,
            session_timeout_ms=cfg.session_timeout_ms,
            on_revoked=self._forget,
            client_id=self.transactional_id,
        )
        try:
            while not stop.is_set() and not self._finished():
                if self._should_pause is not None and self._pause_if_needed(stop):
                    continue
                records = self._reader.poll(cfg.poll_timeout_s, max_records=cfg.batch_size)
                if records:
                    self.process(records)
        finally:
            self.close()
        return self.stats

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close()  # aborts an open transaction: nothing half-published
            self._producer = None
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        close = getattr(self.backend, "close", None)
        if close is not None:
            close()

    def _finished(self) -> bool:
        owned = self.config.partitions
        if owned is None:
            return False
        if any(p not in self._counters for p in owned):
            self._load_counters(owned)
        return all(self._counters[p].ended for p in owned)

    def _pause_if_needed(self, stop: threading.Event) -> bool:
        """Backpressure: keep the prompt partitions paused while the samples backlog is high."""
        assert self._reader is not None and self._should_pause is not None
        if not self._should_pause():
            if self._reader.paused():
                self._reader.resume(self._reader.paused())
            return False
        assignment = self._reader.assignment()
        if assignment and not self._reader.paused():
            self._reader.pause(assignment)
        self._reader.poll(0.05)  # stays in the group (heartbeats, rebalances) while paused
        stop.wait(self.config.poll_timeout_s)
        return True

    def _forget(self, partitions: list[int]) -> None:
        """Revoked partitions: their counts now belong to the next owner's committed offsets."""
        for p in partitions:
            self._counters.pop(p, None)

    def _load_counters(self, partitions: list[int]) -> None:
        assert self._reader is not None
        committed = self._reader.committed(partitions)
        for p in partitions:
            c = committed.get(p)
            self._counters[p] = PartitionCounters.from_metadata(c.metadata) if c else PartitionCounters()

    # --- one batch -----------------------------------------------------------------------

    def process(self, records: list[Record]) -> None:
        """Capture, store and publish one polled batch in one transaction."""
        assert self._producer is not None and self._reader is not None
        cfg = self.config
        missing = sorted({r.partition for r in records} - set(self._counters))
        if missing:
            self._load_counters(missing)

        decoded: list[tuple[Record, Prompt | EndOfStream | Exception]] = []
        for record in records:
            try:
                message = decode(record.value or b"")
                if message.run_id != cfg.run_id:
                    raise DecodeError(f"record of run {message.run_id!r} in run {cfg.run_id!r}")
                if not isinstance(message, (Prompt, EndOfStream)):
                    raise DecodeError(f"a {type(message).__name__} does not belong on the prompts topic")
                decoded.append((record, message))
            except DecodeError as exc:
                decoded.append((record, exc))

        prompts = [m for _, m in decoded if isinstance(m, Prompt)]
        started = time.perf_counter()
        captured = self.backend.capture([(p.input_ids, p.loss_mask) for p in prompts]) if prompts else []  # type: ignore[attr-defined]
        self.stats.capture_s += time.perf_counter() - started
        features = dict(zip((id(p) for p in prompts), captured, strict=True))

        counters = dict(self._counters)
        last_offset: dict[int, int] = {}
        self._producer.begin()
        try:
            for record, item in decoded:
                p = record.partition
                last_offset[p] = record.offset
                c = counters[p]
                if isinstance(item, Prompt):
                    counters[p] = self._publish_sample(record, item, features[id(item)], c)
                elif isinstance(item, EndOfStream):
                    counters[p] = self._forward_eos(item, p, c)
                else:
                    self._producer.send(self.topics.dlq, 0, encode(dead_letter(cfg.run_id, record, item)))
                    counters[p] = replace(c, dropped=c.dropped + 1)
                crash_point("generate.after_send", self._producer_flush)
            offsets = {
                (self.topics.prompts, p): Committed(o + 1, counters[p].to_metadata())
                for p, o in last_offset.items()
            }
            crash_point("generate.before_commit", self._producer_flush)
            started = time.perf_counter()
            self._producer.commit(offsets, self._reader.group_metadata())
            self.stats.commit_s += time.perf_counter() - started
        except BaseException:
            self._producer.abort()
            raise
        for p in last_offset:
            before = self._counters.get(p, PartitionCounters())
            self.stats.refs += counters[p].refs - before.refs
            self.stats.dropped += counters[p].dropped - before.dropped
            if counters[p].ended and not before.ended:
                self.stats.ended_partitions.append(p)
        self._counters.update(counters)
        self.stats.batches += 1

    def _producer_flush(self) -> None:
        if self._producer is not None:
            self._producer._producer.flush(timeout=10)

    def _publish_sample(
        self, record: Record, prompt: Prompt, tensors: dict, c: PartitionCounters
    ) -> PartitionCounters:
        assert self._producer is not None
        cfg = self.config
        info = self.backend.info  # type: ignore[attr-defined]
        sample_id = sample_id_for(cfg.run_id, cfg.epoch, prompt.prompt_id)
        try:
            check_capture(tensors, info, len(prompt.input_ids))
        except CaptureContractError as exc:
            self._producer.send(self.topics.dlq, 0, encode(dead_letter(cfg.run_id, record, exc, sample_id)))
            return replace(c, dropped=c.dropped + 1)
        started = time.perf_counter()
        stored = self.store.put(record.partition, sample_id, tensors)
        self.stats.write_s += time.perf_counter() - started
        self.stats.tokens += len(prompt.input_ids)
        ref = SampleRef(
            run_id=cfg.run_id,
            sample_id=sample_id,
            prompt_id=prompt.prompt_id,
            epoch=cfg.epoch,
            producer_id=cfg.worker_id,
            uri=stored.uri,
            nbytes=stored.nbytes,
            checksum=stored.checksum,
            num_tokens=len(prompt.input_ids),
            tensors=stored.tensors,
            target=info,
            created_at=now(),
        )
        self._producer.send(self.topics.samples, record.partition, encode(ref), key=sample_id.encode())
        return replace(c, refs=c.refs + 1)

    def _forward_eos(self, marker: EndOfStream, partition: int, c: PartitionCounters) -> PartitionCounters:
        """Close the samples partition; a count that does not add up closes it as failed."""
        assert self._producer is not None
        seen = c.refs + c.dropped
        status, reason = marker.status, marker.reason
        if status == "complete" and seen != marker.count:
            status = "failed"
            reason = f"source wrote {marker.count} prompts to partition {partition}, generators saw {seen}"
        out = EndOfStream(
            run_id=self.config.run_id,
            stage="generate",
            partition=partition,
            count=c.refs,
            dropped=c.dropped,
            status=status,
            reason=reason,
            producer_id="generate",
        )
        self._producer.send(self.topics.samples, partition, encode(out))
        return replace(c, ended=True)
