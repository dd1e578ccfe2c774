"""One polled batch of prompt records -> the plan of one transaction (refs, dead letters, markers).

The worker's main thread decodes the records it polled, runs the target's capture over the
prompts, and decides in record order what the batch's transaction will hold: a sample (file then
ref) for every prompt whose capture keeps the contract, a dead letter for a bad record or a
refused capture, a forwarded end-of-stream marker for a closed partition, and the consumed
offsets with each partition's running counts as their metadata.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from pipeline.core.deadletter import DeadLetterLimits, DeadLetterPolicy, dead_letter
from pipeline.core.errors import CaptureContractError, DecodeError, ForeignRecord
from pipeline.core.features import check_capture
from pipeline.core.messages import EndOfStream, Prompt, decode, encode, sample_id_for
from pipeline.core.progress import PartitionCounters
from pipeline.core.topics import Committed, Record, RunTopics
from pipeline.generate.backend import Capture, TargetBackend
from pipeline.generate.writer import PlannedBatch, Publish, Sample

__all__ = ("Decoded", "decode_prompts", "BatchPlanner")

logger = logging.getLogger(__name__)

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

    def __init__(
        self,
        backend: TargetBackend,
        *,
        run_id: str,
        epoch: int,
        dead_letters: DeadLetterLimits = DeadLetterLimits(),
        max_prompt_tokens: int | None = None,
    ) -> None:
        self.backend = backend
        self.max_prompt_tokens = max_prompt_tokens
        self.policy = DeadLetterPolicy("generate", dead_letters)
        self._captured_any = False  # a contract broken on the first batch stops at start
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
        except CaptureContractError as exc:
            if len(prompts) == 1:
                return {id(prompts[0]): exc}  # a dead letter, like any other refused prompt
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
        counters: dict[int, PartitionCounters],
        *,
        epoch: int,
        group: object,
    ) -> PlannedBatch:
        """Decide, in record order, what the batch's transaction will hold (``counters`` advance).

        Only the source's own numbered output counts (``pipeline.core.eos``): every other record
        is dead-lettered as foreign and leaves the counts alone. Own prompts are checked (token
        ids inside the target's vocabulary) before any forward, then captured in one call.
        """
        admitted = self._admit(decoded, counters)
        refused = {id(item): why for _, item, why in admitted if isinstance(item, Prompt) and why}
        features = self.capture([m for _, m, _ in admitted if isinstance(m, Prompt) and id(m) not in refused])
        info = self.backend.info
        batch = PlannedBatch(epoch=epoch, group=group, items=[], offsets={})
        last_offset: dict[int, int] = {}
        nbytes = 0
        for record, item, _ in admitted:
            p = record.partition
            last_offset[p] = record.offset
            c = counters[p]
            if isinstance(item, ForeignRecord):
                batch.items.append(self._letter(record, item))
                counters[p] = replace(c, foreign=c.foreign + 1)
                self.policy.record(valid=False, reason=str(item))
            elif isinstance(item, EndOfStream):
                batch.items.append(self._forward_eos(item, p, c))
                counters[p] = replace(c, ended=True)
                batch.ended.append(p)
            elif isinstance(item, Prompt):
                sample_id = sample_id_for(self.run_id, item.epoch or self.epoch, item.prompt_id)
                tensors = features.get(id(item))  # None: refused before the capture
                try:
                    if tensors is None:
                        raise CaptureContractError(refused[id(item)])
                    if isinstance(tensors, Exception):
                        raise tensors
                    check_capture(tensors, info, len(item.input_ids))
                except CaptureContractError as exc:
                    if id(item) not in refused and not self._captured_any:
                        raise CaptureContractError(
                            f"the target breaks the capture contract on its first prompts: {exc}; check "
                            "target.aux_layer_ids and the backend before generating anything"
                        ) from exc
                    batch.items.append(self._letter(record, exc, sample_id))
                    counters[p] = replace(c, dropped=c.dropped + 1)
                    batch.dropped[p] = batch.dropped.get(p, 0) + 1
                    self.policy.record(valid=False, reason=str(exc))
                    continue
                self._captured_any = True
                self.policy.record(valid=True)
                batch.items.append(Sample(p, item, sample_id, tensors, seq=c.refs))
                counters[p] = replace(c, refs=c.refs + 1)
                batch.refs[p] = batch.refs.get(p, 0) + 1
                batch.tokens += len(item.input_ids)
                nbytes += sum(t.numel() * t.element_size() for t in tensors.values())
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

    def _admit(
        self, decoded: list[Decoded], counters: dict[int, PartitionCounters]
    ) -> list[tuple[Record, Prompt | EndOfStream | ForeignRecord, str]]:
        """Sort each record into the source's own next prompt or marker, or a foreign record.

        A gap in the source's numbers is counted as missing on the spot (those prompts were
        lost upstream); an own prompt the target must not run (token ids outside its vocabulary,
        more tokens than ``max_prompt_tokens``) carries the reason, so it is refused without a
        forward. ``counters`` advance by the gaps only.
        """
        expected = {p: c.next_prompt for p, c in counters.items()}
        out: list[tuple[Record, Prompt | EndOfStream | ForeignRecord, str]] = []
        for record, item in decoded:
            p = record.partition
            c = counters[p]
            if isinstance(item, Exception):
                out.append((record, ForeignRecord(str(item)), ""))
                continue
            if c.ended or (isinstance(item, EndOfStream) and item.stage != "source"):
                out.append((record, ForeignRecord("a record after the end of the source's output"), ""))
                continue
            if item.seq is None or item.seq < expected[p] or (
                isinstance(item, EndOfStream) and item.seq != item.count
            ):
                out.append((record, ForeignRecord(self._not_own(item, expected[p])), ""))
                continue
            gap = item.seq - expected[p]
            if gap:
                logger.error("partition %d: the source's prompts %d..%d never arrived", p, expected[p], item.seq - 1)
                counters[p] = c = replace(c, missing=c.missing + gap)
            expected[p] = item.seq + 1
            out.append((record, item, self._refusal(item) if isinstance(item, Prompt) else ""))
        return out

    @staticmethod
    def _not_own(item: Prompt | EndOfStream, expected: int) -> str:
        kind = "prompt" if isinstance(item, Prompt) else "end-of-stream marker"
        if item.seq is None:
            return f"a {kind} without a sequence number is not the source's output"
        if item.seq < expected:
            return f"{kind} number {item.seq} was already taken (the source's next is {expected})"
        return f"an {kind} whose number {item.seq} is not its count {getattr(item, 'count', '')}"

    def _refusal(self, prompt: Prompt) -> str:
        """Why the target must not run this prompt, or ``""``: checked before any forward."""
        vocab = self.backend.info.vocab_size
        if max(prompt.input_ids) >= vocab:
            return f"token id {max(prompt.input_ids)} is outside the target's vocabulary of {vocab} (refused before the forward)"
        if self.max_prompt_tokens is not None and len(prompt.input_ids) > self.max_prompt_tokens:
            return (
                f"{len(prompt.input_ids)} tokens, above data.max_length {self.max_prompt_tokens} "
                "(refused before the forward)"
            )
        return ""

    def _letter(self, record: Record, error: Exception, sample_id: str | None = None) -> Publish:
        return Publish(self.topics.dlq, 0, encode(dead_letter(self.run_id, record, error, sample_id)))

    def _forward_eos(self, marker: EndOfStream, partition: int, c: PartitionCounters) -> Publish:
        """Close the samples partition with the generators' own count as its number; prompts lost
        upstream (a gap in the source's numbers) close it as failed."""
        status, reason = marker.status, marker.reason
        if status == "complete" and c.missing:
            status = "failed"
            reason = f"{c.missing} of the source's {marker.count} prompts of partition {partition} never arrived"
        out = EndOfStream(
            run_id=self.run_id,
            stage="generate",
            partition=partition,
            count=c.refs,
            dropped=c.dropped,
            status=status,
            reason=reason,
            producer_id="generate",
            seq=c.refs,
        )
        return Publish(self.topics.samples, partition, encode(out))
