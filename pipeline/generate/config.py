"""A generator worker's settings, checked before anything starts (a watermark that could deadlock
is refused here, not discovered as a stalled run)."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.core.deadletter import DeadLetterLimits
from pipeline.core.errors import ConfigError
from pipeline.core.feature_encoding import FeatureDtype
from pipeline.generate.backpressure import TrainerWindow, Watermarks, check_watermarks

__all__ = ("GeneratorConfig",)


@dataclass
class GeneratorConfig:
    """One worker's settings. ``partitions=None``: join the generators' consumer group.

    ``backpressure`` needs ``trainer`` (the trainer's step window) so that a watermark that
    could deadlock is refused at start. ``queue_depth`` batches may be captured ahead of the
    one being written and committed. ``exit_when_done``: in group mode, leave once every prompt
    partition of the run has ended (fixed partitions always end with their own).
    """

    run_id: str
    worker_id: str
    partitions: list[int] | None = None
    batch_size: int = 8
    epoch: int = 0
    poll_timeout_s: float = 0.5
    transaction_timeout_ms: int = 60_000
    session_timeout_ms: int = 45_000
    backpressure: Watermarks | None = None
    trainer: TrainerWindow | None = None
    queue_depth: int = 2
    drain_timeout_s: float = 30.0
    exit_when_done: bool = True
    done_check_interval_s: float = 1.0
    dead_letters: DeadLetterLimits = DeadLetterLimits()
    max_prompt_tokens: int | None = None  # longer prompts are refused before the forward
    wait_for_source_s: float = 600.0  # at start, how long to wait for the run's prompts topic
    eval_run_id: str | None = None  # the eval sub-run captured first (``pipeline.generate.eval_capture``)
    regen_run_id: str | None = None  # served after the run's own prompts (``pipeline.generate.regen_capture``)
    heartbeat_interval_s: float | None = None  # publish a heartbeat this often (None: none)
    storage_dtype: FeatureDtype = "as_captured"  # how the hidden states are stored (storage.dtype)
    trainer_groups: tuple[str, ...] = ()  # backpressure follows the slowest of these (none: the one trainer)
    idle_report_s: float = 30.0  # group mode: owning no prompt partition this long is reported

    def validate(self) -> None:
        """Refuse a bad batch size or a watermark that could deadlock, before anything starts."""
        if self.batch_size < 1:
            raise ConfigError("generate.batch_size", f"must be at least 1, got {self.batch_size}")
        if self.backpressure is not None:
            if self.trainer is None:
                raise ConfigError(
                    "backpressure.trainer",
                    "a watermark needs the trainer window (world size, batch size, grad accum, "
                    "prefetch) to be checked against",
                )
            check_watermarks(self.backpressure, self.trainer)
