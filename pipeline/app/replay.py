"""Replay: train again from the retained samples topic and features, and check against the ledger.

The samples topic keeps every ref (retention.ms=-1) and, with ``storage.retention: retain``, the
features stay on storage. A trainer reading them again from the first offset sees the same samples
in the same order (``SampleStream`` merges partitions deterministically), so with the same config
it forms the same batches as the live run; with deterministic algorithms on CPU its losses are
bit-identical to the ones the live run recorded in the ledger, step by step. The replay writes
into its own output directory and writes nothing to the run's ledger or trainer group.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, replace
from pathlib import Path

from pipeline.app.config import RunConfig
from pipeline.app.outputs import checkpoints
from pipeline.app.preflight import check_local
from pipeline.app.runtime import build_online_run
from pipeline.app.settings import trainer_settings
from pipeline.app.train_job import check_world_size, launched_world_size
from pipeline.core.errors import ConfigError, OptionError, RunMismatchError
from pipeline.ledger import effective_history, read_ledger
from pipeline.train.distributed import init_distributed
from pipeline.train.metrics import read_metrics
from pipeline.train.runner import run_trainer, single_rank

__all__ = ("ReplayReport", "check_output_dir", "replay_run")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplayReport:
    """How a replay compared with the live run's ledger, step by step."""

    steps: int
    identical: int
    first_difference: str | None
    output_dir: str
    is_main: bool = True  # under torchrun, only rank 0 compares: the others print nothing

    def line(self) -> str:
        if self.first_difference is None:
            return f"{self.identical} of {self.steps} replayed steps bit-identical to the ledger"
        return f"{self.identical} of {self.steps} steps identical; first difference: {self.first_difference}"


def replay_run(config: RunConfig, output_dir: str, *, stop: threading.Event | None = None) -> ReplayReport:
    """Train again from the retained samples into ``output_dir``; compare each step's loss with the ledger.

    A run trained by several ranks replays under torchrun with as many ranks (each rank reads its
    partitions as the live rank did); rank 0 compares and its report is the one that counts.
    """
    check_world_size(config, launched_world_size())
    if os.environ.get("RANK", "0") in ("", "0"):  # the ranks share --out: rank 0 checks it before any writes
        check_output_dir(Path(output_dir))
    check_local(config, ("train",))
    if config.storage.retention != "retain":
        raise ConfigError(
            "storage.retention",
            "is delete: the live run deleted its features after training on them",
            "replay needs a run trained with retention: retain",
        )
    manager = checkpoints(config)
    live = manager.latest()
    if live is None:
        raise ConfigError(
            "train.output_dir",
            f"holds no checkpoint of the live run under {config.train.output_dir}/checkpoints",
            "replay a run that has trained, with the config it trained with",
        )
    schedule = manager.read_meta(live).get("config", {}).get("lr_schedule", {})
    online = build_online_run(config)
    history = effective_history(read_ledger(online.transport, config.run_id))
    if not history:
        raise RunMismatchError(
            f"run {config.run_id} has checkpoints under {config.train.output_dir} but no ledger records on this "
            "broker: replay on the broker the run trained on"
        )
    settings = replace(
        trainer_settings(config, schedule_steps=schedule.get("total_steps")),
        schedule=schedule.get("kind", "constant"),  # exactly the live run's schedule
        schedule_steps=schedule.get("total_steps"),
        checkpoint_dir=str(Path(output_dir) / "checkpoints"),
        metrics_path=str(Path(output_dir) / "metrics.jsonl"),  # trackers write beside it
        eval_metrics_path=str(Path(output_dir) / "eval.jsonl"),  # never into the live run's
        plot_path=str(Path(output_dir) / "curves.png"),
        publish_url=None,  # a replay publishes nothing into the live run's output_dir
        max_steps=history[-1].step,
        resume="never",
        retention="retain",
    )
    dist = (
        init_distributed(timeout_s=config.train.collective_timeout_s, device=config.train.device)
        if config.train.world_size > 1
        else single_rank(config.train.device)  # the live run's device: the same kernels, the same bits
    )
    try:
        run_trainer(
            settings,
            transport=online.transport,
            storage_root=config.storage.root,
            model=online.model_spec(),
            stop=stop,
            dist=dist,
            storage_options=dict(config.storage.options),
            record=False,
        )
    finally:
        dist.close()
    if not dist.is_main:  # rank 0 holds the metrics of every step
        return ReplayReport(len(history), len(history), None, output_dir, is_main=False)
    # every step from the replay's own metrics file (the result holds only the latest rows)
    replayed = {row["step"]: row["loss"] for row in read_metrics(settings.metrics_path)}
    identical, first = 0, None
    for step in history:
        got = replayed.get(step.step)
        if got == step.metrics.loss:
            identical += 1
        elif first is None:
            first = f"step {step.step}: ledger loss {step.metrics.loss!r}, replay {got!r}"
    return ReplayReport(len(history), identical, first, output_dir)


def check_output_dir(out: Path) -> None:
    """A replay writes into a directory of its own: an earlier replay's (or anything else) is kept."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        what = "is a file" if not out.is_dir() else f"already holds {', '.join(sorted(p.name for p in out.iterdir())[:4])}"
        raise OptionError("--out", f"{out} {what}", f"pass --out <another directory>, or remove {out} first")
