"""``specstream status``: where a run stands, per partition, read from Kafka alone.

Produced and dropped counts come from the generators' committed offset metadata (exact, written
in the same transactions as the refs); consumed counts and the step come from the newest ledger
record; samples/s from the ledger's recent records; the DLQ count from the DLQ topic. Nothing here
writes anything.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.core.errors import RunMismatchError
from pipeline.core.messages import DeadLetter, LedgerStep, decode
from pipeline.core.progress import PartitionCounters
from pipeline.core.topics import RunTopics, Transport, read_to_end

__all__ = ("PartitionStatus", "RunStatus", "run_status", "render_status")


@dataclass(frozen=True)
class PartitionStatus:
    """One partition: produced, dropped and consumed counts and whether it ended."""

    partition: int
    produced: int
    dropped: int
    generator_ended: bool
    consumed: int

    @property
    def backlog(self) -> int:
        return max(0, self.produced - self.consumed)


@dataclass(frozen=True)
class RunStatus:
    """Where a run stands, read from Kafka alone."""

    run_id: str
    partitions: list[PartitionStatus]
    step: int | None
    samples_per_s: float | None
    dead_letters: int

    @property
    def produced(self) -> int:
        return sum(p.produced for p in self.partitions)

    @property
    def consumed(self) -> int:
        return sum(p.consumed for p in self.partitions)


def _read_all(transport: Transport, topic: str, partition: int, start: int, timeout_s: float) -> list[bytes]:
    return [r.value or b"" for r in read_to_end(transport, topic, [partition], start={partition: start}, timeout_s=timeout_s)]


def _recent_steps(transport: Transport, topics: RunTopics, lookback: int, timeout_s: float) -> list[LedgerStep]:
    with transport.admin() as admin:
        end = admin.end_offsets(topics.ledger, [0])[0]
    steps = []
    for value in _read_all(transport, topics.ledger, 0, max(0, end - lookback), timeout_s):
        try:
            message = decode(value)
        except Exception:  # noqa: BLE001 - a bad ledger record is not status's problem
            continue
        if isinstance(message, LedgerStep):
            steps.append(message)
    return steps


def run_status(transport: Transport, run_id: str, *, timeout_s: float = 30.0) -> RunStatus:
    """Read the run's counters, ledger and DLQ (nothing is written)."""
    topics = RunTopics(run_id)
    with transport.admin() as admin:
        count = admin.partition_count(topics.samples)
        if count is None:
            raise RunMismatchError(
                f"run {run_id} has no topics on this broker (no {topics.samples}): check the run id, and that "
                "this is the broker the run uses"
            )
        commits = admin.group_offsets(topics.generator_group, topics.prompts)
    steps = _recent_steps(transport, topics, lookback=64, timeout_s=timeout_s)
    latest = steps[-1] if steps else None
    consumed: dict[int, int] = {}
    if latest is not None:
        for rank in latest.ranks:
            for position in rank.next_offsets:
                consumed[position.partition] = position.records
    rate = None
    if len(steps) >= 2 and steps[-1].created_at > steps[0].created_at:
        samples = sum(len(r.sample_ids) for s in steps[1:] for r in s.ranks)
        rate = samples / (steps[-1].created_at - steps[0].created_at)
    letters = sum(
        1 for v in _read_all(transport, topics.dlq, 0, 0, timeout_s) if _is_dead_letter(v)
    )
    partitions = []
    for p in range(count):
        c = PartitionCounters.from_metadata(commits[p].metadata) if p in commits else PartitionCounters()
        partitions.append(PartitionStatus(p, c.refs, c.dropped, c.ended, consumed.get(p, 0)))
    return RunStatus(run_id, partitions, latest.step if latest else None, rate, letters)


def _is_dead_letter(value: bytes) -> bool:
    try:
        return isinstance(decode(value), DeadLetter)
    except Exception:  # noqa: BLE001
        return False


def render_status(status: RunStatus) -> str:
    """A plain-text table (the CLI prints it through rich)."""
    lines = [
        f"run {status.run_id}: step {status.step if status.step is not None else '-'}, "
        f"{status.consumed} of {status.produced} produced samples trained"
        + (f", {status.samples_per_s:.1f} samples/s" if status.samples_per_s else ""),
        f"{'partition':>9} {'produced':>9} {'dropped':>8} {'consumed':>9} {'lag':>6}  end of stream",
    ]
    for p in status.partitions:
        lines.append(
            f"{p.partition:>9} {p.produced:>9} {p.dropped:>8} {p.consumed:>9} {p.backlog:>6}  "
            f"{'generators done' if p.generator_ended else 'open'}"
        )
    lines.append(f"dead letters: {status.dead_letters}")
    return "\n".join(lines)
