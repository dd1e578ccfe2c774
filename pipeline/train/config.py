"""The trainer's settings, which of them a resume must match, and the learning-rate schedule.

``TrainConfig`` is a plain frozen dataclass so the CLI (argparse now, typer + YAML later) and the
single-process runtime build it the same way. :meth:`TrainConfig.resume_fields` names the
settings that change what a step computes (batch shape, optimizer, schedule, seed, TTT): a
checkpoint written under other values is refused. Settings that do not (paths, ``max_steps``,
``save_interval``, retention, prefetch depth, timeouts) may change between attempts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from pipeline.core.errors import ConfigError
from pipeline.train.retention import RetentionPolicy

__all__ = ("TrainConfig", "LRSchedule", "Resume")

Resume = Literal["auto", "never", "required"]


@dataclass(frozen=True)
class TrainConfig:
    """Everything the trainer loop needs; model and data sources are passed separately."""

    run_id: str
    checkpoint_dir: str
    batch_size: int = 1  # samples per micro-batch per rank
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    warmup_ratio: float = 0.015
    schedule: Literal["cosine", "constant"] = "cosine"
    schedule_steps: int | None = None  # length of the LR schedule; default max_steps
    max_steps: int | None = None  # stop after this many optimizer steps (None: end of stream)
    grad_clip: float = 0.5
    ttt_steps: int = 7
    loss_decay: float = 0.8
    max_length: int | None = 2048
    seed: int = 0
    epoch: int = 0
    amp: bool = False  # bf16 autocast on CUDA
    deterministic: bool = False
    save_interval: int = 100  # checkpoint every N optimizer steps (0: only at the end / on stop)
    keep_last: int = 2
    retention: RetentionPolicy = "delete"
    resume: Resume | str = "auto"  # or the path of one checkpoint directory
    prefetch: int = 4  # micro-batches collated ahead
    idle_timeout_s: float = 600.0  # a partition silent this long is an error
    drain_timeout_s: float | None = None  # bound on reading the tail after the last step
    collective_timeout_s: float = 600.0
    metrics_path: str | None = None
    plot_path: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        positive = {
            "batch_size": self.batch_size,
            "grad_accum": self.grad_accum,
            "ttt_steps": self.ttt_steps,
            "keep_last": self.keep_last,
            "prefetch": self.prefetch,
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
        if self.schedule == "cosine" and self.total_schedule_steps is None:
            raise ConfigError(
                "schedule_steps",
                "a cosine schedule needs its length before data arrives",
                "set schedule_steps (or max_steps), or use schedule: constant",
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
            "epoch": self.epoch,
            "amp": self.amp,
        }


class LRSchedule:
    """Linear warmup, then cosine to zero (or constant): a picklable ``LambdaLR`` factor."""

    def __init__(self, kind: str, warmup_steps: int, total_steps: int | None) -> None:
        self.kind = kind
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps

    @classmethod
    def from_config(cls, config: TrainConfig) -> LRSchedule:
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
