"""The step ledger: one ``LedgerStep`` per optimizer step on the run's ledger topic.

Each record names the samples every rank folded into the step, every rank's next offset and
consumed-record count per partition, the losses and accuracies per TTT step and the learning
rate: enough to audit a run (no sample twice, none skipped), to replay its batches, and to
measure the trainer's progress for the generators' backpressure (DESIGN 4.5) without waiting
for a checkpoint-time offset commit.

A run that crashed and resumed from its last checkpoint writes the steps after that checkpoint
a second time. The later record of a step supersedes the earlier one *and every record after
it* from the dead attempt: :func:`effective_history` applies that rule.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from pipeline.core.errors import StreamError
from pipeline.core.messages import LedgerStep, decode, encode
from pipeline.core.topics import RunTopics, Transport, read_to_end

__all__ = ("LedgerWriter", "LedgerTail", "read_ledger", "effective_history", "latest_ledger_step")

logger = logging.getLogger(__name__)

_PARTITION = 0  # the ledger topic has one partition: a total order of steps


class LedgerWriter:
    """Rank 0's producer of ledger records (idempotent, asynchronous; flushed at checkpoints)."""

    def __init__(self, transport: Transport, run_id: str, group: str | None = None) -> None:
        self.topic = RunTopics(run_id, group).ledger
        self._producer = transport.plain_producer()

    def write(self, record: LedgerStep) -> None:
        self._producer.send(self.topic, encode(record), partition=_PARTITION, key=str(record.step).encode())

    def flush(self, timeout_s: float = 30.0) -> None:
        """Block until every record sent so far is on the broker (before a checkpoint publishes)."""
        self._producer.flush(timeout_s)

    def close(self) -> None:
        self._producer.close()


def _decode_step(value: bytes | None, run_id: str, where: str) -> LedgerStep | None:
    try:
        message = decode(value or b"")
    except Exception as exc:  # noqa: BLE001 - a foreign record on the ledger is reported, not fatal
        logger.warning("undecodable ledger record at %s: %s", where, exc)
        return None
    if not isinstance(message, LedgerStep) or message.run_id != run_id:
        logger.warning("ledger record at %s is not a ledger step of run %s", where, run_id)
        return None
    return message


def read_ledger(
    transport: Transport, run_id: str, *, timeout_s: float = 60.0, group: str | None = None
) -> list[LedgerStep]:
    """Every ledger record of the run (of trainer ``group``) in log order (dead attempts included)."""
    topic = RunTopics(run_id, group).ledger
    out: list[LedgerStep] = []
    for record in read_to_end(transport, topic, [_PARTITION], timeout_s=timeout_s):
        step = _decode_step(record.value, run_id, f"{topic}:{record.offset}")
        if step is not None:
            out.append(step)
    return out


def effective_history(records: Iterable[LedgerStep]) -> list[LedgerStep]:
    """The steps that count: a repeated step number discards that step and all later ones before it."""
    history: list[LedgerStep] = []
    for record in records:
        while history and history[-1].step >= record.step:
            history.pop()
        if history and record.step != history[-1].step + 1:
            raise StreamError(
                f"ledger jumps from step {history[-1].step} to {record.step}: records are missing"
            )
        history.append(record)
    return history


class LedgerTail:
    """Cheap repeated reads of the newest ledger record (backpressure polls this).

    Keeps one consumer open; each :meth:`latest` asks for the end offset and, only when it moved,
    reads the last record (``end - 1``), stepping back further if that one is not a ledger step.
    """

    def __init__(self, transport: Transport, run_id: str, *, lookback: int = 16, group: str | None = None) -> None:
        self.run_id = run_id
        self.topic = RunTopics(run_id, group).ledger
        self._lookback = lookback
        self._reader = transport.reader(self.topic, partitions=[_PARTITION], start="latest")
        self._end = -1
        self._latest: LedgerStep | None = None

    def latest(self, timeout_s: float = 10.0) -> LedgerStep | None:
        end = self._reader.end_offsets()[_PARTITION]
        if end == self._end:
            return self._latest
        start = max(0, end - self._lookback)
        self._reader.seek(_PARTITION, max(0, end - 1))
        found: LedgerStep | None = None
        first = max(0, end - 1)
        deadline = time.monotonic() + timeout_s
        while found is None and end > 0:
            while self._reader.position(_PARTITION) < end:
                if time.monotonic() > deadline:
                    raise StreamError(f"reading the end of {self.topic} took longer than {timeout_s:.0f} s")
                for record in self._reader.poll(0.2):
                    step = _decode_step(record.value, self.run_id, f"{self.topic}:{record.offset}")
                    if step is not None:
                        found = step
            if found is None:
                if first <= start:
                    break
                first = max(start, first - 4)
                self._reader.seek(_PARTITION, first)
        self._end, self._latest = end, found
        return found

    def close(self) -> None:
        self._reader.close()


def latest_ledger_step(
    transport: Transport, run_id: str, *, timeout_s: float = 10.0, group: str | None = None
) -> LedgerStep | None:
    """The newest ledger record of the run (of trainer ``group``), or None before its first step (one-shot)."""
    tail = LedgerTail(transport, run_id, group=group)
    try:
        return tail.latest(timeout_s)
    finally:
        tail.close()
