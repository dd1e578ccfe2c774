"""What a training run reports at its end: the completeness accounting and the result."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.core.errors import StreamError
from pipeline.train.metrics import StepRecord

__all__ = ("RunCompleteness", "TrainResult")


@dataclass(frozen=True)
class RunCompleteness:
    """The end-of-stream accounting over all ranks (DESIGN 4.2)."""

    prompts: int  # distinct prompts: refs on the samples topic (less duplicates) + dropped upstream
    trained: int
    tail: int
    duplicates: int
    dead_letters: int  # rejected by the trainer + dropped upstream
    partitions_ended: int
    partitions: int

    @property
    def missing(self) -> int:
        """Prompts neither trained, nor in the tail, nor dead-lettered: must be zero."""
        return self.prompts - self.trained - self.tail - self.dead_letters

    def line(self) -> str:
        """The run's summary line, for people and scripts."""
        return (
            f"{self.trained} of {self.prompts} prompts trained, {self.missing} missing, "
            f"{self.duplicates} duplicates dropped, {self.tail} tail samples not stepped, "
            f"{self.dead_letters} dead letters"
        )

    def check(self) -> None:
        """Fail a run that lost prompts or whose partitions did not all end."""
        if self.partitions_ended != self.partitions:
            raise StreamError(
                f"{self.partitions - self.partitions_ended} partitions did not end: {self.line()}"
            )
        if self.missing != 0:
            raise StreamError(f"incomplete run: {self.line()}")

    @classmethod
    def combine(cls, ranks: list[dict[str, int]]) -> RunCompleteness:
        """Add up every rank's end-of-stream counts into the run's accounting."""

        def total(key: str) -> int:
            return sum(int(r[key]) for r in ranks)

        return cls(
            prompts=total("expected") - total("duplicates") + total("dropped_upstream"),
            trained=total("trained"),
            tail=total("tail"),
            duplicates=total("duplicates"),
            dead_letters=total("rejected") + total("dropped_upstream"),
            partitions_ended=total("partitions_ended"),
            partitions=total("partitions"),
        )


@dataclass
class TrainResult:
    """How a rank's training ended, for the runner's exit code and the benchmarks."""

    step: int
    samples_trained: int  # over all ranks, this run and the attempts it resumed
    reason: str  # "end_of_stream", "max_steps", "stopped"
    completeness: RunCompleteness | None = None
    checkpoint: str | None = None
    data_wait_frac: float = 0.0  # this rank's share of step time spent waiting for data
    metrics: list[StepRecord] = field(default_factory=list)
