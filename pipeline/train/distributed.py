"""Data parallelism for the trainer: one code path for one rank and for many.

Rank and world size come from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``).
With one rank nothing is initialised and every collective below is a no-op, so the single-process
runtime and the tests run the exact code that a multi-GPU job runs. With several ranks the
default group is NCCL on GPUs (gradients, metrics) and gloo on CPU; control traffic (the step
vote, ledger and checkpoint gathers: a few small Python objects) always goes over a gloo group,
so it never touches the GPU stream. Every group has a timeout: a rank that dies or stalls makes
the others fail with an error instead of hanging for ever.

The lockstep rule (DESIGN 4.3) lives in :meth:`DistContext.agree`: each rank votes, one
``all_reduce(MIN)`` of one int decides for everyone, and the most severe vote wins.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from enum import IntEnum
from typing import Any

import torch
import torch.distributed as dist

from pipeline.core.errors import ConfigError

__all__ = ("Vote", "DistContext", "init_distributed", "decide")

logger = logging.getLogger(__name__)


class Vote(IntEnum):
    """A rank's answer to "is there another full global step?"; lower is more severe."""

    FAILED = 0  # this rank hit an error: everyone stops, this rank re-raises it
    STOP = 1  # a stop was requested (signal, cooperative stop): checkpoint and exit
    ENDED = 2  # this rank's stream ended without a full step: drain, report the tail
    READY = 3  # this rank holds batch_size * grad_accum samples for the next step


def decide(votes: Iterable[Vote | int]) -> Vote:
    """What an ``all_reduce(MIN)`` of the votes yields: the most severe one wins."""
    return Vote(min(int(v) for v in votes))


@dataclass
class DistContext:
    """Who this process is in the data-parallel job, and the collectives the trainer uses."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    control_group: Any = None
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    # --- control plane (gloo) ------------------------------------------------------------

    def agree(self, vote: Vote) -> Vote:
        """One ``all_reduce(MIN)`` of one int: every rank leaves with the same decision."""
        if not self.distributed:
            return Vote(vote)
        flag = torch.tensor([int(vote)], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.control_group)
        return Vote(int(flag.item()))

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (small, picklable) in rank order."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.control_group)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        if not self.distributed:
            return obj
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src, group=self.control_group)
        return box[0]

    # --- data plane (default group: NCCL or gloo) ------------------------------------------

    def all_reduce_mean_(self, tensors: Iterable[torch.Tensor]) -> None:
        """Average gradients in place, one tensor at a time in a fixed order (deterministic)."""
        if not self.distributed:
            return
        for tensor in tensors:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            tensor.div_(self.world_size)

    def broadcast_(self, tensors: Iterable[torch.Tensor], src: int = 0) -> None:
        """Overwrite every rank's tensors with rank ``src``'s, in place, in a fixed order."""
        if not self.distributed:
            return
        for tensor in tensors:
            dist.broadcast(tensor, src=src)

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(name, f"{raw!r} is not an integer", "launch with torchrun or unset it") from None


def init_distributed(*, timeout_s: float = 600.0, device: str | None = None) -> DistContext:
    """Read torchrun's environment and initialise the process groups when there are several ranks.

    :param timeout_s: how long any collective may wait for the slowest rank before it fails
    :param device: ``"cpu"``, ``"cuda"`` or None (CUDA when available)
    """
    rank = _env_int("RANK", 0)
    world = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < world:
        raise ConfigError("RANK", f"rank {rank} outside world size {world}")
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError("device", "CUDA was asked for but is not available", "use --device cpu")
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    if world == 1:
        return DistContext(rank=0, world_size=1, local_rank=local_rank, device=dev)
    timeout = timedelta(seconds=timeout_s)
    backend = "nccl" if use_cuda else "gloo"
    owns = False
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"backend": backend, "timeout": timeout, "rank": rank, "world_size": world}
        if use_cuda:
            kwargs["device_id"] = dev
        dist.init_process_group(**kwargs)
        owns = True
    control = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else None
    logger.info("rank %d of %d on %s (%s, collective timeout %.0f s)", rank, world, dev, backend, timeout_s)
    return DistContext(
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        device=dev,
        backend=backend,
        control_group=control,
        owns_group=owns,
    )
