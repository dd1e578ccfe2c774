"""``specstream train``: one trainer rank per process; torchrun starts one per GPU.

    torchrun --nproc-per-node N --no-python specstream train --config run.yaml

Rank and world size come from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``),
and ``train.world_size`` must match it: the config's global batch is the one trained, or the
trainer stops before it writes anything. Rank 0 decides the learning-rate schedule for every
rank and attempt, and reports.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline.app.config import RunConfig
from pipeline.app.config_groups import group_config
from pipeline.app.manifest import await_run
from pipeline.app.preflight import check_broker, check_local
from pipeline.app.runtime import build_online_run
from pipeline.app.settings import trainer_settings
from pipeline.app.start_banner import trainer_banner
from pipeline.app.sweep import sweep_at_end
from pipeline.core.errors import ConfigError
from pipeline.core.progress import read_source_counters
from pipeline.core.topics import RunTopics, Transport
from pipeline.app.outputs import checkpoints
from pipeline.train.distributed import init_distributed
from pipeline.train.runner import run_trainer
from pipeline.train.result import TrainResult

if TYPE_CHECKING:
    from pipeline.app.metrics import LiveProcess

__all__ = ("TrainJobResult", "launched_world_size", "check_world_size", "schedule_steps", "train_rank")

LAUNCH = "torchrun --nproc-per-node {n} --no-python specstream train --config FILE"


@dataclass(frozen=True)
class TrainJobResult:
    """One trainer rank's result and what the command prints about it."""

    result: TrainResult
    is_main: bool


def launched_world_size() -> int | None:
    """torchrun's ``WORLD_SIZE``, or None when this process was not started by torchrun."""
    raw = os.environ.get("WORLD_SIZE")
    if raw in (None, ""):
        return None
    try:
        return int(raw)
    except ValueError:
        raise ConfigError("WORLD_SIZE", f"{raw!r} is not an integer", "launch with torchrun, or unset it") from None


def check_world_size(cfg: RunConfig, launched: int | None) -> None:
    """``train.world_size`` must be the number of ranks that were started: the global batch depends on it."""
    wanted = cfg.train.world_size
    if launched is None and wanted > 1:
        raise ConfigError(
            "train.world_size",
            f"is {wanted}, but this process was not started by torchrun (no WORLD_SIZE)",
            f"launch `{LAUNCH.format(n=wanted)}`, or set train.world_size: 1",
        )
    if launched is not None and launched != wanted:
        raise ConfigError(
            "train.world_size",
            f"is {wanted}, but torchrun started {launched} ranks (WORLD_SIZE={launched}); the global batch "
            f"would be {launched * cfg.train.batch_size * cfg.train.grad_accum} instead of {cfg.global_batch}",
            f"set train.world_size: {launched}, or start {wanted} ranks in all (`--nproc-per-node` x nodes)",
        )


def schedule_steps(transport: Transport, cfg: RunConfig, warn: Callable[[str], object]) -> int | None:
    """The cosine schedule's length: max_steps; else, when resuming, the one the checkpoint was
    trained with (a schedule is part of what a resume must match); else one pass over the
    prompts per epoch once the source has closed every partition; else None (constant rate)."""
    if cfg.train.lr_schedule == "constant":
        return None
    if cfg.train.max_steps:
        return int(cfg.train.max_steps)
    manager = checkpoints(cfg)
    latest = manager.latest()
    if latest is not None:
        total = manager.read_meta(latest).get("config", {}).get("lr_schedule", {}).get("total_steps")
        return int(total) if total is not None else None
    source = read_source_counters(transport, RunTopics(cfg.run_id), cfg.data.partitions)  # O(partitions)
    if not all(c.ended for c in source.values()):
        warn("the source has not finished: constant learning rate (set train.max_steps for cosine)")
        return None
    return max(1, sum(c.prompts for c in source.values()) * cfg.train.epochs // cfg.global_batch)


def train_rank(
    run_cfg: RunConfig,
    stop: threading.Event,
    *,
    warn: Callable[[str], object],
    watch: LiveProcess | None = None,
    group: str | None = None,
) -> TrainJobResult:
    """Check, join the run, train this rank to the end of the stream, max_steps or a stop;
    ``watch`` (the metrics exporter's view) is given the transport and the trainer; ``group``:
    which of the run's ``train_groups`` this rank trains (required when it declares some)."""
    if group is None and run_cfg.train_groups:
        raise ConfigError("--group", f"the run declares trainer groups ({', '.join(run_cfg.train_groups)})",
                          "name the one this trainer trains: `specstream train --group NAME`")  # fmt: skip
    cfg = group_config(run_cfg, group)  # the run as this group trains it (its train, its output_dir)
    check_world_size(cfg, launched_world_size())
    check_local(cfg, ("train",))
    online = build_online_run(cfg)
    check_broker(online.transport)
    if watch is not None:
        watch.transport = online.transport
    is_main = os.environ.get("RANK", "0") in ("", "0")  # the process group starts after the wait
    if not await_run(  # started before the source: wait for the run's topics and vocabulary mapping
        online.transport, run_cfg, timeout_s=cfg.train.wait_for_source_s, key="train.wait_for_source_s", stop=stop,
        say=warn if is_main else (lambda _line: None), vocab=online.store,
    ):  # fmt: skip
        return TrainJobResult(TrainResult(step=0, samples_trained=0, reason="stopped"), is_main)
    dist = init_distributed(timeout_s=cfg.train.collective_timeout_s, device=cfg.train.device)
    try:
        # One schedule for every rank and every attempt: rank 0 decides, the others follow.
        steps = dist.broadcast_object(schedule_steps(online.transport, cfg, warn) if dist.is_main else None)
        if dist.is_main:  # what is about to happen, before the first step
            print(trainer_banner(cfg, online.transport, schedule_steps=steps, projected_storage=online.projected_storage),
                  file=sys.stderr, flush=True)  # fmt: skip
        result = run_trainer(
            trainer_settings(cfg, schedule_steps=steps, group=group, groups=tuple(run_cfg.train_groups)),
            transport=online.transport,
            storage_root=cfg.storage.root,
            model=online.model_spec(),
            stop=stop,
            dist=dist,
            storage_options=dict(cfg.storage.options),
            observe=watch.watch_trainer if watch is not None else None,
        )
    finally:
        dist.close()
    if dist.is_main and result.reason == "end_of_stream":  # every partition ended: nothing is in flight
        sweep_at_end(online.transport, online.store, lambda line: print(line, flush=True))  # beside the summary
    return TrainJobResult(result, dist.is_main)
