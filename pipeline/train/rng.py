"""Random state: seed every RNG the trainer touches, and carry it through a checkpoint.

A resumed run must draw the same random numbers as an uninterrupted one (dropout, shuffles in
user code), so a checkpoint stores every rank's Python, torch, CUDA and numpy generator states.
"""

from __future__ import annotations

import os
import random
from typing import Any

import numpy
import torch

__all__ = ("seed_everything", "rng_state", "set_rng_state")


def seed_everything(seed: int, *, deterministic: bool) -> None:
    """Seed every RNG the trainer touches; optionally force deterministic kernels."""
    random.seed(seed)
    torch.manual_seed(seed)
    numpy.random.seed(seed % 2**32)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's generator states, as tensors and tuples a checkpoint can store."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    kind, keys, pos, has_gauss, cached = numpy.random.get_state(legacy=True)
    assert isinstance(keys, numpy.ndarray)
    state["numpy"] = (
        kind,
        torch.from_numpy(keys.astype("int64")),
        int(pos),
        int(has_gauss),
        float(cached),
    )
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore what :func:`rng_state` saved, so the resumed run draws the same numbers."""
    torch.set_rng_state(state["torch"].cpu())
    random.setstate(_tuples(state["python"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)
    if "numpy" in state:
        kind, keys, pos, has_gauss, cached = state["numpy"]
        numpy.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))


def _tuples(value: Any) -> Any:
    """``random.setstate`` wants tuples where a serializer may have produced lists."""
    if isinstance(value, (list, tuple)):
        return tuple(_tuples(v) for v in value)
    return value
