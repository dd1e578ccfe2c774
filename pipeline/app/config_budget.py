"""``storage.max_bytes``: the feature storage budget, and what it leaves for later epochs.

A run holds two kinds of feature files: *transient* ones (produced and not yet trained, plus the
checkpoint intervals that exact resume keeps: DESIGN 4.4; under regeneration, what a rank holds
and the window it asks for ahead) and, with ``train.epochs`` > 1, *kept*
ones that later epochs read again. The budget bounds both together. The transient part is
bounded by the config alone, at the longest sample ``data.max_length`` allows: ``(keep_last x
save_interval x global batch + the generators' peak backlog)`` samples. The rest is split evenly
over the partitions; each partition keeps its first samples that fit its share (first fit, in
the stream's own order, so a resume and every later listing decide alike) and the others are
captured again for each later epoch (:mod:`pipeline.train.regenerate`). So the bytes on storage
never exceed the budget, and an epoch never lacks a sample.

``0`` keeps nothing past its pass: every later epoch runs the target again (the online baseline),
and storage holds only the transient files. Unset: every feature is kept for every epoch.

Kept apart from :mod:`pipeline.app.config` (at its size cap); it takes the config object without
importing its class, so the two modules do not import each other.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.app.config_groups import widest_train
from pipeline.core.errors import ConfigError
from pipeline.core.feature_encoding import bytes_per_token
from pipeline.generate.backpressure import TrainerWindow, Watermarks, peak_backlog

if TYPE_CHECKING:
    from pipeline.app.config import RunConfig

__all__ = ("BUDGET_HELP", "FeatureBudget", "check_budget", "feature_budget", "regenerates", "peak_samples", "target_width")

BUDGET_HELP = (
    "feature storage budget in bytes, transient files included: the run keeps for later epochs what fits "
    "and captures the rest again each epoch; 0: keep nothing (every epoch runs the target); unset: keep all. "
    "Needs `retention: delete`"
)

#: A safetensors file's header and scales beyond its tensors' bytes, at most (tiny next to a sample).
HEADER_BYTES = 4096


@dataclass(frozen=True)
class FeatureBudget:
    """How ``storage.max_bytes`` divides: the transient reserve, then each partition's share."""

    max_bytes: int
    sample_bytes: int  # the longest sample's file (data.max_length tokens)
    transient_samples: int  # files held in flight or for resume, at most
    partitions: int
    window: int  # regenerated samples a rank asks for ahead of its training

    @property
    def reserve(self) -> int:
        return self.sample_bytes * self.transient_samples

    @property
    def keep_share(self) -> int:
        """Bytes of each partition's samples kept for later epochs."""
        return max(0, self.max_bytes - self.reserve) // self.partitions

    def describe(self) -> str:
        return (
            f"storage budget {self.max_bytes:,} bytes: {self.reserve:,} reserved in flight ({self.transient_samples} "
            f"samples x {self.sample_bytes:,}), {self.keep_share:,} kept per partition for later epochs"
        )


def check_budget(cfg: RunConfig) -> RunConfig:
    """Refuse, at load, a budget the run could not keep (the config alone decides)."""
    if cfg.storage.max_bytes is None:
        return cfg
    if cfg.storage.retention != "delete":
        raise ConfigError("storage.max_bytes", "needs storage.retention: delete (retain keeps every file)",
                          "set storage.retention: delete, or unset storage.max_bytes")  # fmt: skip
    if not cfg.train.save_interval:
        raise ConfigError("storage.max_bytes", "needs train.save_interval > 0: features go only after a checkpoint",
                          "set train.save_interval (e.g. 50)")  # fmt: skip
    if cfg.train_groups:
        raise ConfigError("storage.max_bytes", "is not supported with train_groups yet",
                          "unset one of them (groups with epochs keep every feature until the last group's last epoch)")  # fmt: skip
    return cfg


def regenerates(cfg: RunConfig) -> bool:
    """Whether later epochs may capture samples again (the regeneration sub-run exists): a
    storage budget and more than one epoch."""
    return cfg.storage.max_bytes is not None and cfg.train.epochs > 1


def peak_samples(cfg: RunConfig) -> tuple[int, int] | None:
    """The most feature files a run holds at once, as (kept for resume, produced but not yet
    stepped); None: unbounded (``retain``, or no checkpoint before the end)."""
    if cfg.storage.retention == "retain" or not cfg.train.save_interval:
        return None
    g, t = cfg.generate, widest_train(cfg)  # the group that holds the most in flight
    marks = Watermarks(high=g.high_watermark, low=g.low_watermark, high_bytes=g.high_watermark_bytes,
                       low_bytes=g.low_watermark_bytes)  # fmt: skip
    window = TrainerWindow(world_size=t.world_size, batch_size=t.batch_size, grad_accum=t.grad_accum,
                           prefetch=t.prefetch * t.batch_size)  # fmt: skip
    kept = t.keep_last * t.save_interval * t.world_size * t.batch_size * t.grad_accum
    return kept, peak_backlog(marks, window, cfg.data.partitions)


def target_width(cfg: RunConfig) -> tuple[int, int] | None:
    """The target's hidden size and captured bytes per element (None: unknown here)."""
    if cfg.target.backend == "synthetic":  # the runtime's synthetic target: hidden 64
        return 64, 2 if cfg.target.dtype in ("bfloat16", "float16") else 4
    config_file = Path(str(cfg.target.model)) / "config.json"
    if not config_file.is_file():
        return None
    target = json.loads(config_file.read_text())
    hidden = int(target.get("hidden_size") or target.get("text_config", {}).get("hidden_size", 0))
    dtype = cfg.target.dtype or target.get("torch_dtype") or target.get("dtype")
    return (hidden, 4 if dtype == "float32" else 2) if hidden else None


def feature_budget(cfg: RunConfig, width: tuple[int, int] | None = None) -> FeatureBudget | None:
    """The budget's division for this run (None: no budget); a budget below the transient
    reserve is refused with the minimum named. ``width``: the target's (hidden size, bytes per
    element), where its config is not at hand (default: read from ``target.model``)."""
    if cfg.storage.max_bytes is None:
        return None
    check_budget(cfg)
    width, peak = width or target_width(cfg), peak_samples(cfg)
    if width is None:
        raise ConfigError("storage.max_bytes", f"needs the target's hidden size: no config.json in {cfg.target.model}",
                          "point target.model at the model's directory, or unset storage.max_bytes")  # fmt: skip
    assert peak is not None  # check_budget: retention delete with a save interval
    sample = cfg.data.max_length * bytes_per_token(width[0], width[1], cfg.storage.dtype) + HEADER_BYTES
    kept, backlog = peak
    t = cfg.train
    # A rank holds what it prefetched and is stepping; it asks for regenerated samples only beyond
    # that, so its window plus what it holds stays within its share of the generators' backlog.
    holds = t.batch_size * t.grad_accum + t.prefetch * t.batch_size
    window = max(1, backlog // t.world_size - holds)
    transient = kept + max(backlog, t.world_size * (holds + window))
    budget = FeatureBudget(cfg.storage.max_bytes, sample, transient, cfg.data.partitions, window)
    if 0 < budget.max_bytes < budget.reserve:
        raise ConfigError(
            "storage.max_bytes",
            f"{budget.max_bytes:,} is below what the run holds in flight at most: {budget.transient_samples} samples "
            f"(keep_last x save_interval x global batch + the generators' peak backlog) x {sample:,} bytes "
            f"(data.max_length {cfg.data.max_length} tokens) = {budget.reserve:,}",
            f"raise it to at least {budget.reserve:,}, set 0 to keep nothing past its pass, or lower "
            "data.max_length, train.save_interval, train.keep_last or generate.high_watermark",
        )
    return budget
