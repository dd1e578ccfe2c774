"""Where a run's outputs live: ``train.output_dir`` as a local path or an fsspec URL (``s3://``...).

On a URL, checkpoints go to the object store directly (published by a manifest, see
:mod:`pipeline.train.ckpt_objects`), rank 0's metrics, curves and tracker files are written to a
local mirror under ``$SPECSTREAM_HOME/outputs/<run_id>`` and copied to the URL at every checkpoint
and at the end, and the export is written to ``<output_dir>/export``. The URL is reached with
``storage.options`` when it has the feature store's protocol (one bucket's credentials and
endpoint), else with the environment's (``AWS_*``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.app.config import RunConfig
from pipeline.train.checkpoint import CheckpointInfo, CheckpointManager
from pipeline.train.ckpt_objects import is_url, open_checkpoints
from pipeline.transport.kafka_jars import home_dir

__all__ = ("checkpoints", "is_url", "local_outputs", "output_options", "output_path", "resume_checkpoint")


def _protocol(location: str) -> str:
    return location.split("://", 1)[0] if "://" in location else "file"


def output_options(cfg: RunConfig) -> dict[str, Any]:
    """fsspec options for ``train.output_dir``: ``storage.options`` when both share a protocol."""
    if is_url(cfg.train.output_dir) and _protocol(cfg.train.output_dir) == _protocol(cfg.storage.root):
        return dict(cfg.storage.options)
    return {}


def output_path(cfg: RunConfig, *parts: str) -> str:
    """``<output_dir>/<parts...>``, joined without mangling a URL's ``//``."""
    if is_url(cfg.train.output_dir):
        return "/".join([cfg.train.output_dir.rstrip("/"), *parts])
    return str(Path(cfg.train.output_dir).joinpath(*parts))


def local_outputs(cfg: RunConfig) -> Path:
    """Where rank 0 writes metrics and curves: output_dir itself, or a local mirror of a URL."""
    if not is_url(cfg.train.output_dir):
        return Path(cfg.train.output_dir)
    return home_dir() / "outputs" / cfg.run_id


def checkpoints(cfg: RunConfig) -> CheckpointManager:
    """The run's checkpoint manager (POSIX renames on a path, manifests on a URL)."""
    return open_checkpoints(
        output_path(cfg, "checkpoints"), keep_last=cfg.train.keep_last, storage_options=output_options(cfg)
    )


def resume_checkpoint(cfg: RunConfig) -> tuple[CheckpointManager, CheckpointInfo] | None:
    """The checkpoint the trainer would resume from under ``train.resume`` (None: a fresh start)."""
    if cfg.train.resume == "never":
        return None
    manager = checkpoints(cfg)
    if cfg.train.resume in ("auto", "required"):
        info = manager.latest()
    else:  # the path (or URL) of one checkpoint
        info = manager.find(cfg.train.resume)
    return None if info is None else (manager, info)
