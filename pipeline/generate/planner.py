"""One polled batch of prompt records -> the plan of one transaction (refs, dead letters, markers).

The worker's main thread decodes the records it polled, runs the target's capture over the
prompts, and decides in record order what the batch's transaction will hold: a sample (file then
ref) for every prompt whose capture keeps the contract, a dead letter for a bad record or a
refused capture, a forwarded end-of-stream marker for a closed partition, and the consumed
offsets with each partition's running counts as their metadata.
"""

from __future__ import annotations

from dataclasses import replace

from pipeline.core.deadletter import dead_letter
from pipeline.core.errors import CaptureContractError, DecodeError
from pipeline.core.features import check_capture
from pipeline.core.messages import EndOfStream, Prompt, decode, encode, sample_id_for
from pipeline.core.progress import PartitionCounters
from pipeline.core.topics import Committed, Record, RunTopics
from pipeline.generate.backend import Capture, TargetBackend
from pipeline.generate.writer import PlannedBatch, Publish, Sample

__all__ = ("Decoded", "decode_prompts", "BatchPlanner")

#: A polled record and what it decoded to (or why it did not).
Decoded = tuple[Record, "Prompt | EndOfStream | Exception"]


def decode_prompts(records: list[Record], run_id: str) -> list[Decoded]:
    """Decode every record strictly; a foreign or undecodable one keeps its error for the DLQ."""
    decoded: list[Decoded] = []
    for record in records:
        try:
            message = decode(record.value or b"")
            if message.run_id != run_id:
                raise DecodeError(f"record of run {message.run_id!r} in run {run_id!r}")
            if not isinstance(message, (Prompt, EndOfStream)):
                raise DecodeError(f"a {type(message).__name__} does not belong on the prompts topic")
            decoded.append((record, message))
        except DecodeError as exc:
            decoded.append((record, exc))
    return decoded


class BatchPlanner:
    """Captures a batch's prompts and plans its transaction, tracking the bytes a sample takes."""

    def __init__(self, backend: TargetBackend, *, run_id: str, epoch: int) -> None:
        self.backend = backend
        self.run_id = run_id
        self.epoch = epoch
        self.topics = RunTopics(run_id)
        self.bytes_per_sample = 0.0  # moving average, for the bytes watermarks

    def capture(self, prompts: list[Prompt]) -> dict[int, Capture | Exception]:
        """Features per prompt (by identity); a prompt the backend refuses gets its error."""
        if not prompts:
            return {}
        capture = self.backend.capture
        try:
            out = capture([(p.input_ids, p.loss_mask) for p in prompts])
            return dict(zip((id(p) for p in prompts), out, strict=True))
        except CaptureContractError:
            if len(prompts) == 1:
                raise
        # One bad prompt must not sink the batch: capture one by one to find it.
        result: dict[int, Capture | Exception] = {}
        for p in prompts:
            try:
                result[id(p)] = capture([(p.input_ids, p.loss_mask)])[0]
            except CaptureContractError as exc:
                result[id(p)] = exc
        return result

    def plan(
        self,
        decoded: list[Decoded],
        features: dict[int, Capture | Exception],
        counters: dict[int, PartitionCounters],
        *,
        epoch: int,
        group: object,
    ) -> PlannedBatch:
        """Decide, in record order, what the batch's transaction will hold (``counters`` advance)."""
        info = self.backend.info
        batch = PlannedBatch(epoch=epoch, group=group, items=[], offsets={})
        last_offset: dict[int, int] = {}
        nbytes = 0
        for record, item in decoded:
            p = record.partition
            last_offset[p] = record.offset
            c = counters[p]
            if isinstance(item, Prompt):
                sample_id = sample_id_for(self.run_id, self.epoch, item.prompt_id)
                tensors = features[id(item)]
                try:
                    if isinstance(tensors, Exception):
                        raise tensors
                    check_capture(tensors, info, len(item.input_ids))
                except CaptureContractError as exc:
                    batch.items.append(self._letter(record, exc, sample_id))
                    counters[p] = replace(c, dropped=c.dropped + 1)
                    batch.dropped[p] = batch.dropped.get(p, 0) + 1
                    continue
                batch.items.append(Sample(p, item, sample_id, tensors))
                counters[p] = replace(c, refs=c.refs + 1)
                batch.refs[p] = batch.refs.get(p, 0) + 1
                batch.tokens += len(item.input_ids)
                nbytes += sum(t.numel() * t.element_size() for t in tensors.values())
            elif isinstance(item, EndOfStream):
                batch.items.append(self._forward_eos(item, p, c))
                counters[p] = replace(c, ended=True)
                batch.ended.append(p)
            else:
                batch.items.append(self._letter(record, item))
                counters[p] = replace(c, dropped=c.dropped + 1)
                batch.dropped[p] = batch.dropped.get(p, 0) + 1
        batch.offsets = {
            (self.topics.prompts, p): Committed(o + 1, counters[p].to_metadata()) for p, o in last_offset.items()
        }
        batch.counters = {p: counters[p] for p in last_offset}
        if batch.samples:
            per_sample = nbytes / batch.samples
            self.bytes_per_sample = (
                per_sample if not self.bytes_per_sample else 0.9 * self.bytes_per_sample + 0.1 * per_sample
            )
        return batch

    def _letter(self, record: Record, error: Exception, sample_id: str | None = None) -> Publish:
        return Publish(self.topics.dlq, 0, encode(dead_letter(self.run_id, record, error, sample_id)))

    def _forward_eos(self, marker: EndOfStream, partition: int, c: PartitionCounters) -> Publish:
        """Close the samples partition; a count that does not add up closes it as failed."""
        seen = c.refs + c.dropped
        status, reason = marker.status, marker.reason
        if status == "complete" and seen != marker.count:
            status = "failed"
            reason = f"source wrote {marker.count} prompts to partition {partition}, generators saw {seen}"
        out = EndOfStream(
            run_id=self.run_id,
            stage="generate",
            partition=partition,
            count=c.refs,
            dropped=c.dropped,
            status=status,
            reason=reason,
            producer_id="generate",
        )
        return Publish(self.topics.samples, partition, encode(out))
