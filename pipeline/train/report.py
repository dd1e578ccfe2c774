"""What each optimizer step reports: every rank's progress, and rank 0's metrics, bar and ledger.

Every rank describes its step (the samples it folded in, its next offsets); rank 0 gathers
those with the ranks' timings and turns them into one metrics row, one progress-bar tick, the
trackers' scalars (TensorBoard, wandb) and one ledger record, the step's audit trail and the
generators' measure of trainer progress.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from pipeline.core.messages import LedgerStep, PartitionOffset, RankProgress, StepMetrics, now
from pipeline.core.progress import StreamState
from pipeline.train.config import TrainerSettings
from pipeline.train.dataset import SampleInfo
from pipeline.train.metrics import MetricsLog, ProgressBar, RankTiming, StepRecord, ThroughputTotals
from pipeline.train.resume import LedgerSink
from pipeline.train.trackers import Trackers

__all__ = ("RECENT_STEPS", "StepReporter", "rank_progress")

#: Step rows kept in memory (the live metrics endpoint and the result read the latest); every
#: row is in the metrics JSONL. A run of millions of steps must not hold one object per step.
RECENT_STEPS = 10_000

#: An evaluator's callback, ``(step, figures)`` (``pipeline.train.evaluate.OnEval``).
OnEval = Callable[[int, dict[str, float]], None]

logger = logging.getLogger(__name__)


def rank_progress(rank: int, samples: list[SampleInfo], state: StreamState) -> dict[str, Any]:
    """One rank's share of a step's ledger record: its sample ids and where its stream stands."""
    offsets = [
        PartitionOffset(
            partition=p,
            offset=state.positions[p],
            records=state.consumed(p),
        )
        for p in sorted(state.positions)
    ]
    epochs = [s.epoch for s in samples] if any(s.epoch for s in samples) else None
    return RankProgress(
        rank=rank, sample_ids=[s.sample_id for s in samples], next_offsets=offsets, epochs=epochs
    ).model_dump()


class StepReporter:
    """Rank 0's record of every step: metrics JSONL, progress bar, trackers and ledger (silent on others).

    ``trackers.log_scalars(prefix, values, step)`` takes other scalars too; evaluations arrive
    through :meth:`eval_callback`.
    """

    def __init__(
        self, config: TrainerSettings, *, is_main: bool, ledger: LedgerSink | None, initial_step: int
    ) -> None:
        self.config = config
        self.ledger = ledger
        self.totals = ThroughputTotals()  # every rank's timings
        self.records: deque[StepRecord] = deque(maxlen=RECENT_STEPS)
        self.metrics = MetricsLog(config.metrics_path if is_main else None)
        self.progress = ProgressBar(
            enabled=config.progress and is_main, total=config.max_steps or config.total_schedule_steps,
            initial=initial_step,
        )
        self.trackers = Trackers.open(config, initial_step=initial_step) if is_main else Trackers()

    def report(
        self,
        step: int,
        gathered: list[tuple[dict[str, Any], RankTiming]],
        summary: dict[str, Any],
        lr: float,
        grad_norm: float,
    ) -> None:
        """Turn the ranks' gathered progress and timings into the step's row, tick and record."""
        timings = [t for _, t in gathered]
        self.totals.add(timings)
        record = StepRecord.build(
            step=step,
            summary=summary,
            lr=lr,
            timings=timings,
            totals=self.totals,
            grad_norm=grad_norm,
            now=time.time(),
        )
        self.records.append(record)
        self.metrics.write(record)
        self.trackers.log_step(record)
        self.progress.update(record)
        if self.ledger is not None:
            ranks = [RankProgress.model_validate(p) for p, _ in gathered]
            self.ledger.write(
                LedgerStep(
                    run_id=self.config.run_id,
                    step=step,
                    epoch=max((e for r in ranks for e in r.sample_epochs(0)), default=0),  # the epoch it ends in
                    ranks=ranks,
                    metrics=StepMetrics(loss=record.loss, ploss=record.ploss, acc=record.acc),
                    lr=lr,
                    created_at=now(),
                )
            )
        logger.debug("step %d loss %.4f acc0 %.3f", step, record.loss, record.acc[0] if record.acc else 0)

    def eval_callback(self, then: OnEval | None = None) -> OnEval:
        """An evaluator's ``on_eval`` that logs its figures as ``eval/...`` scalars, then calls ``then``."""

        def on_eval(step: int, figures: dict[str, float]) -> None:
            self.trackers.log_scalars("eval", figures, step)
            if then is not None:
                then(step, figures)

        return on_eval

    def close(self) -> None:
        """Close the bar, then the metrics file and the trackers."""
        self.progress.close()
        self.metrics.close()
        self.trackers.close()
