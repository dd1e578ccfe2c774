"""What a training run reports at its end: the completeness accounting and the result."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.core.errors import StreamError
from pipeline.train.metrics import StepRecord

__all__ = ("RunCompleteness", "TrainResult")


@dataclass(frozen=True)
class RunCompleteness:
    """The end-of-stream accounting over all ranks (DESIGN 4.2).

    ``prompts`` are the source's prompts as the generators closed them: the refs they numbered
    plus the prompts they dead-lettered. Each one is trained, in the tail, dead-lettered upstream
    or missing (a numbered ref that never arrived or failed its checks); foreign records and
    duplicates never count. ``source_letters`` are the input lines that never became a prompt
    (malformed, too long): they are dead letters too. Anything missing, a run that trained
    nothing (of its prompts or of its input lines), or one whose trained and tail samples fall
    short of ``min_trained_fraction`` of its prompts (the rest dead-lettered), fails.
    """

    prompts: int
    trained: int
    tail: int
    missing: int
    duplicates: int
    dropped: int  # the source's prompts the generators dead-lettered (e.g. capture refused)
    foreign: int  # records on the samples topic that were no generator's output
    partitions_ended: int
    partitions: int
    source_letters: int = 0  # input lines the source dead-lettered (they never became prompts)
    epochs: int = 1  # passes over the prompts: ``trained`` and ``tail`` count sample passes

    @property
    def passes(self) -> int:
        """Sample passes the run is to train: every prompt once per epoch."""
        return self.prompts * self.epochs

    @property
    def dead_letters(self) -> int:
        return self.source_letters + self.dropped + self.foreign

    def line(self) -> str:
        """The run's summary line, for people and scripts."""
        trained = (
            f"{self.trained} of {self.prompts} prompts trained"
            if self.epochs == 1
            else f"{self.trained} of {self.passes} sample passes trained ({self.prompts} prompts x {self.epochs} epochs)"
        )
        return (
            f"{trained}, {self.missing} missing, "
            f"{self.duplicates} duplicates dropped, {self.tail} tail samples not stepped, "
            f"{self.dead_letters} dead letters ({self.source_letters} input lines, {self.dropped} prompts, "
            f"{self.foreign} foreign records)"
        )

    def check(self, min_trained_fraction: float = 0.0) -> None:
        """Fail a run that lost prompts, trained nothing, trained too small a share of its prompts
        (the tail that cannot fill a global step counts as trained: the batch shape bounds it, it
        is not lost), or whose partitions did not all end."""
        if self.partitions_ended != self.partitions:
            raise StreamError(
                f"{self.partitions - self.partitions_ended} partitions did not end: {self.line()}"
            )
        if self.missing:
            raise StreamError(f"incomplete run: {self.line()}; see `specstream audit` and the DLQ")
        if (self.prompts or self.source_letters) and not self.trained:
            raise StreamError(f"the run trained nothing: {self.line()}; see the DLQ for why")
        usable = self.trained + self.tail
        if self.prompts and usable / self.passes < min_trained_fraction - 1e-12:
            raise StreamError(
                f"the run trained {usable} of its {self.passes} {'prompts' if self.epochs == 1 else 'sample passes'} "
                f"({usable / self.passes:.1%}, the "
                f"{self.tail} tail samples included), below train.min_trained_fraction {min_trained_fraction:g}: "
                f"{self.line()}; see `specstream audit` and the DLQ for why; nothing was exported, the final "
                "checkpoint is kept (`specstream export` writes a draft from it if you accept the run)"
            )

    @classmethod
    def combine(cls, ranks: list[dict[str, int]], *, epochs: int = 1) -> RunCompleteness:
        """Add up every rank's end-of-stream counts into the run's accounting."""

        def total(key: str) -> int:
            return sum(int(r[key]) for r in ranks)

        return cls(
            prompts=total("expected") + total("dropped_upstream"),
            trained=total("trained"),
            tail=total("tail"),
            missing=total("missing"),
            duplicates=total("duplicates"),
            dropped=total("dropped_upstream"),
            foreign=total("foreign"),
            partitions_ended=total("partitions_ended"),
            partitions=total("partitions"),
            source_letters=sum(int(r.get("source_letters", 0)) for r in ranks),
            epochs=epochs,
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
    metrics: list[StepRecord] = field(default_factory=list)  # the latest steps' rows (all: metrics.jsonl)
    eval: dict[str, float] | None = None  # the final evaluation on the held-out set (rank 0)
    eval_step: int | None = None  # the step it was taken at
