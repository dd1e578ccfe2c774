"""Checks before a stage writes anything: each failure a user can fix is one ``ConfigError``.

A stage runs ``check_local`` before it starts or reaches a broker (model directory, data, storage,
devices), then ``check_broker`` once its transport exists; only after both passed does it claim
the run (topics, manifest) or write a file.
"""

from __future__ import annotations

import tempfile
from collections.abc import Collection
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.app.config import RunConfig
from pipeline.core.errors import ConfigError
from pipeline.core.topics import Transport

__all__ = ("STAGES", "check_local", "check_broker", "preflight")

STAGES = ("source", "generate", "train")


def check_local(config: RunConfig, stages: Collection[str] = STAGES) -> None:
    """The model directory, the data (source), the storage root, the trainer's device."""
    target = config.target
    if target.backend in ("hf", "sglang"):
        model = Path(str(target.model))
        if not (model / "config.json").is_file():
            raise ConfigError(
                "target.model",
                f"{model} is not a model directory (no config.json there)",
                "point it at a local Hugging Face model directory (downloaded beforehand: nothing is "
                "fetched at run time)",
            )
    if "source" in stages:
        fs, path = fsspec.url_to_fs(config.data.path)
        if not fs.exists(path):
            raise ConfigError("data.path", f"{config.data.path} does not exist", "point it at a JSONL file of conversations")
    fs, root = fsspec.url_to_fs(config.storage.root, **dict(config.storage.options))
    if isinstance(fs, LocalFileSystem):
        _check_writable(Path(root), config.storage.root)
    if "train" in stages and (config.train.device or "").startswith("cuda"):
        import torch  # lazy: start-up, only the trainer's check needs torch; source/generate start faster

        if not torch.cuda.is_available():
            raise ConfigError(
                "train.device", f"is {config.train.device} but CUDA is not available here", "use cpu, or null"
            )


def check_broker(transport: Transport) -> None:
    """An unreachable broker fails here, with its address, before anything is written."""
    with transport.admin() as admin:
        admin.topics()


def preflight(config: RunConfig, transport: Transport, *, stages: Collection[str] = STAGES) -> None:
    """``check_local`` then ``check_broker``."""
    check_local(config, stages)
    check_broker(transport)


def _check_writable(root: Path, shown: str) -> None:
    """Create and remove a temp dir in the nearest existing ancestor: leaves nothing behind, and
    unlike ``os.access`` it also tells the truth for root and for read-only mounts."""
    probe = root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        if not probe.is_dir():
            raise NotADirectoryError(f"{probe} is a file")
        Path(tempfile.mkdtemp(prefix=".specstream-probe-", dir=probe)).rmdir()
    except OSError as exc:
        raise ConfigError(
            "storage.root",
            f"{shown} cannot be written ({exc})",
            "choose a directory you can write, or fix its permissions",
        ) from None
