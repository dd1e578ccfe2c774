"""The trainer loop's settings, which of them a resume must match, and the learning-rate schedule.

``TrainerSettings`` is a plain frozen dataclass without defaults for anything a run configures:
``pipeline.app.settings.trainer_settings`` derives it from the one ``RunConfig`` (where every
default lives), so the loop, the CLI and the single-process runtime cannot disagree.
:meth:`TrainerSettings.resume_fields` names the settings that change what a step computes (batch
shape, optimizer, schedule, seed, TTT, precision): a checkpoint written under other values is
refused. Settings that do not (paths, ``max_steps``, ``save_interval``, retention, prefetch depth,
timeouts) may change between attempts.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline.core.deadletter import DeadLetterLimits
from pipeline.core.errors import ConfigError
from pipeline.train.retention import RetentionPolicy

__all__ = ("TrainerSettings", "LRSchedule", "Resume", "TRACKERS")

Resume = Literal["auto", "never", "required"]
#: The scalar trackers ``report_to`` may name (rank 0 writes them beside the metrics file).
TRACKERS = ("tensorboard", "wandb")


@dataclass(frozen=True, kw_only=True)
class TrainerSettings:
    """Everything the trainer loop needs; model and data sources are passed separately."""

    run_id: str
    checkpoint_dir: str
    batch_size: int  # samples per micro-batch per rank
    grad_accum: int  # micro-batches per optimizer step
    lr: float
    betas: tuple[float, float]
    weight_decay: float
    warmup_ratio: float
    schedule: Literal["cosine", "constant"]
    schedule_steps: int | None  # length of the LR schedule; None: max_steps
    max_steps: int | None  # stop after this many optimizer steps (None: end of stream)
    grad_clip: float
    ttt_steps: int
    loss_decay: float
    max_length: int | None
    seed: int
    bf16: bool  # bf16 autocast on CUDA
    deterministic: bool
    save_interval: int  # checkpoint every N optimizer steps (0: only at the end / on stop)
    keep_last: int
    retention: RetentionPolicy
    resume: Resume | str  # or the path of one checkpoint directory
    prefetch: int  # micro-batches collated ahead
    idle_timeout_s: float  # a partition silent this long is an error
    drain_timeout_s: float | None  # bound on reading the tail after the last step
    collective_timeout_s: float
    metrics_path: str | None
    plot_path: str | None
    min_trained_fraction: float  # a run that reached its end and trained a smaller share fails
    epochs: int = 1  # the online pass, then epochs - 1 passes over the retained features
    progress: bool = False  # a progress bar on stderr (rank 0)
    dead_letters: DeadLetterLimits = DeadLetterLimits()  # when bad refs stop the trainer
    eval_run_id: str | None = None  # the held-out set's sub-run (None: no evaluation)
    eval_interval: int = 50  # rank 0 evaluates every N steps and at the end
    eval_metrics_path: str | None = None  # eval.jsonl, one row per evaluation
    heartbeat_interval_s: float | None = None  # each rank's heartbeat (None: none; not a resume field)
    report_to: tuple[str, ...] = ()  # scalar trackers on rank 0 (TRACKERS), under tracker_root
    output_options: Mapping[str, Any] = field(default_factory=dict)  # fsspec options of an output_dir URL
    publish_url: str | None = None  # output_dir on an object store: rank 0 copies its metrics there
    group: str | None = None  # this trainer's group of the run's ``train_groups`` (None: the run's only trainer)
    retention_groups: tuple[str, ...] = ()  # every declared group: retention ``delete`` waits for all of them
    keep_share: int | None = None  # storage.max_bytes: bytes of each partition kept for later epochs (None: all)
    regen_window: int = 1  # under a budget: regenerated samples a rank asks for ahead of its training
    transaction_timeout_ms: int = 60_000  # the regeneration publisher's transactions

    @property
    def tracker_root(self) -> str | None:
        """Where trackers write: beside the metrics file, so that whoever moves the metrics
        (replay writes into a directory of its own) moves the event files with them."""
        return str(Path(self.metrics_path).parent) if self.metrics_path else None

    def __post_init__(self) -> None:
        positive = {
            "batch_size": self.batch_size,
            "grad_accum": self.grad_accum,
            "ttt_steps": self.ttt_steps,
            "keep_last": self.keep_last,
            "prefetch": self.prefetch,
            "epochs": self.epochs,
        }
        for key, value in positive.items():
            if value < 1:
                raise ConfigError(key, f"must be at least 1, got {value}")
        if self.save_interval < 0:
            raise ConfigError("save_interval", "must be >= 0 (0 saves only at the end and on stop)")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError("max_steps", "must be at least 1 (or unset: train to the end of stream)")
        if not self.lr > 0:
            raise ConfigError("lr", f"must be positive, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError("warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        if self.retention not in ("delete", "retain"):
            raise ConfigError("retention", f"{self.retention!r}", "use 'delete' or 'retain'")
        if self.schedule not in ("cosine", "constant"):
            raise ConfigError("schedule", f"{self.schedule!r}", "use 'cosine' or 'constant'")
        self._check_report_to()
        if self.schedule == "cosine" and self.total_schedule_steps is None:
            raise ConfigError(
                "schedule_steps",
                "a cosine schedule needs its length before data arrives",
                "set schedule_steps (or max_steps), or use schedule: constant",
            )

    def _check_report_to(self) -> None:
        """Refuse at start what rank 0 could not log to (a missing optional tracker)."""
        for name in self.report_to:
            if name not in TRACKERS:
                raise ConfigError("train.report_to", f"unknown tracker {name!r}", f"use {' or '.join(TRACKERS)}")
        if "wandb" in self.report_to and importlib.util.find_spec("wandb") is None:
            raise ConfigError(
                "train.report_to",
                "names wandb, which is not installed",
                "pip install wandb (WANDB_MODE=offline works without an account), or remove wandb from it",
            )

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step on one rank (multiply by the world size for the job)."""
        return self.batch_size * self.grad_accum

    @property
    def total_schedule_steps(self) -> int | None:
        return self.schedule_steps if self.schedule_steps is not None else self.max_steps

    def resume_fields(self) -> dict[str, Any]:
        """The settings a checkpoint must have been written under to be resumed by this run."""
        return {
            "run_id": self.run_id,
            "batch_size": self.batch_size,
            "grad_accum": self.grad_accum,
            "lr": self.lr,
            "betas": list(self.betas),
            "weight_decay": self.weight_decay,
            "lr_schedule": LRSchedule.from_config(self).describe(),
            "grad_clip": self.grad_clip,
            "ttt_steps": self.ttt_steps,
            "loss_decay": self.loss_decay,
            "max_length": self.max_length,
            "seed": self.seed,
            # One epoch keeps the field checkpoints had before epochs existed, so they still resume.
            **({"epochs": self.epochs} if self.epochs != 1 else {"epoch": 0}),
            "bf16": self.bf16,
            # Which samples a budget keeps is decided in the stream: another share is another run.
            **({"keep_share": self.keep_share} if self.keep_share is not None else {}),
        }


class LRSchedule:
    """Linear warmup, then cosine to zero (or constant): a picklable ``LambdaLR`` factor."""

    def __init__(self, kind: str, warmup_steps: int, total_steps: int | None) -> None:
        self.kind = kind
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps

    @classmethod
    def from_config(cls, config: TrainerSettings) -> LRSchedule:
        total = config.total_schedule_steps
        warmup = math.ceil(config.warmup_ratio * total) if total else 0
        return cls(config.schedule, warmup, total)

    def describe(self) -> dict[str, Any]:
        """What determines the factors (a constant schedule does not depend on its length)."""
        out: dict[str, Any] = {"kind": self.kind, "warmup_steps": self.warmup_steps}
        if self.kind == "cosine":
            out["total_steps"] = self.total_steps
        return out

    def __call__(self, step: int) -> float:
        if self.warmup_steps and step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant" or not self.total_steps:
            return 1.0
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
