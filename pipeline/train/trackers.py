"""Rank 0's scalar trackers: TensorBoard event files and, when installed, Weights & Biases.

Operators follow a multi-day run in the tools they already use, so every optimizer step's
:class:`~pipeline.train.metrics.StepRecord` goes to them under SpecForge's names
(``train/ploss_{i}``, ``train/acc_{i}``, ``train/lr``...) with the optimizer step as x axis.
TensorBoard writes ``<tracker_root>/tensorboard/``; a resumed run's writer purges the points a
crashed attempt wrote after the checkpoint it resumes from (``purge_step``), as
:func:`~pipeline.train.metrics.read_metrics` drops those rows. Anyone else with scalars to show
(evaluation) logs them through :meth:`Trackers.log_scalars` under a prefix of their own.

A tracker is a view, never the record (metrics JSONL and the ledger are): an error in one logs a
warning and switches that tracker off; it never fails a run. The writers are asynchronous and
flush on their own clock, never per step.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from pipeline.train.config import TrainerSettings
from pipeline.train.metrics import StepRecord

__all__ = ("Trackers", "step_scalars", "TENSORBOARD_DIR")

logger = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"
_FLUSH_S = 30  # event files reach the disk at least this often (and at close)
_QUEUE = 1000  # events buffered before a write blocks the loop


def step_scalars(record: StepRecord) -> dict[str, float]:
    """One step's scalars under SpecForge's names (``train/`` prefix), per TTT step where indexed."""
    values = {
        "loss": record.loss,
        "lr": record.lr,
        "grad_norm": record.grad_norm,
        "acceptance_length": record.acceptance_length,
        "samples_per_s": record.samples_per_s,
        "tokens_per_s": record.tokens_per_s,
        "data_wait_frac": record.data_wait_frac,
        "data_wait_frac_total": record.data_wait_frac_total,
        "prepare_frac": record.prepare_frac,
        "step_s": record.step_s,
        "samples": float(record.samples),
        "tokens": float(record.tokens),
    }
    for name, series in (("ploss", record.ploss), ("acc", record.acc), ("acceptance_rate", record.acceptance_rate)):
        values.update({f"{name}_{i}": v for i, v in enumerate(series)})
    return {f"train/{k}": float(v) for k, v in values.items()}


class _Sink(Protocol):
    name: str

    def log(self, values: Mapping[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class _TensorBoard:
    name = "tensorboard"

    def __init__(self, directory: Path, *, purge_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter  # lazy: start-up, tensorboard and protobuf load on rank 0 only
        from tensorboard.compat.proto.summary_pb2 import Summary  # lazy: tensorboard is optional (report_to)

        self.writer = SummaryWriter(
            log_dir=str(directory), purge_step=purge_step, max_queue=_QUEUE, flush_secs=_FLUSH_S
        )
        self._summary = Summary

    def log(self, values: Mapping[str, float], step: int) -> None:
        # One event per step holding every scalar: add_scalar writes an event per value, about
        # 7 times the cost (33 scalars: 2 ms a step against 0.3 ms). TensorBoard reads both alike;
        # SummaryWriter's file writer is the one it opened with purge_step.
        summary = self._summary(value=[self._summary.Value(tag=t, simple_value=v) for t, v in values.items()])
        self.writer._get_file_writer().add_summary(summary, step)

    def close(self) -> None:
        self.writer.close()


class _WandB:
    name = "wandb"

    def __init__(self, directory: Path, *, run_id: str, config: dict[str, Any]) -> None:
        import wandb  # lazy: wandb is optional (report_to: [wandb] checks it at start)

        directory.mkdir(parents=True, exist_ok=True)
        # One wandb run per attempt, grouped by the run id: a resumed attempt's steps never
        # collide with a crashed one's (wandb refuses steps below its last). WANDB_MODE=offline
        # (read here and by wandb itself) writes under <tracker_root>/wandb for `wandb sync`.
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "specstream"),
            name=run_id,
            group=run_id,
            dir=str(directory),
            config=config,
            mode=os.environ.get("WANDB_MODE") or None,
        )

    def log(self, values: Mapping[str, float], step: int) -> None:
        self.run.log(dict(values), step=step)

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """The trackers ``report_to`` names, each switched off (with a warning) at its first error."""

    def __init__(self, sinks: list[_Sink] | None = None) -> None:
        self.sinks: list[_Sink] = list(sinks or [])

    @classmethod
    def open(cls, config: TrainerSettings, *, initial_step: int) -> Trackers:
        """Rank 0's trackers for a run that continues after ``initial_step`` (0: a fresh run)."""
        root = config.tracker_root
        if root is None or not config.report_to:
            return cls()
        sinks: list[_Sink] = []
        for name in config.report_to:
            try:
                if name == "tensorboard":
                    # Points of a crashed attempt from the first step this run writes on are dropped.
                    sinks.append(_TensorBoard(Path(root) / TENSORBOARD_DIR, purge_step=initial_step + 1))
                elif name == "wandb":
                    sinks.append(_WandB(Path(root), run_id=config.run_id, config=config.resume_fields()))
            except Exception:  # a tracker is a view: the run goes on without it
                logger.warning("tracker %s could not start; training continues without it", name, exc_info=True)
        return cls(sinks)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sinks]

    def log_step(self, record: StepRecord) -> None:
        """One optimizer step's ``train/...`` scalars at x = its step."""
        if self.sinks:
            self._each("log", step_scalars(record), record.step)

    def log_scalars(self, prefix: str, values: Mapping[str, float], step: int) -> None:
        """Other scalars (``eval``...) as ``<prefix>/<name>`` at an optimizer step."""
        if self.sinks:
            self._each("log", {f"{prefix}/{k}": float(v) for k, v in values.items()}, step)

    def close(self) -> None:
        """Flush and close every tracker (their last points reach the disk here)."""
        self._each("close")
        self.sinks = []

    def _each(self, method: str, *args: Any) -> None:
        for sink in list(self.sinks):
            try:
                getattr(sink, method)(*args)
            except Exception:  # a tracker is a view: the run goes on without it
                logger.warning("tracker %s failed in %s; switched off for this run", sink.name, method, exc_info=True)
                self.sinks.remove(sink)
