"""Training checkpoints that resume exactly: weights, optimizer, schedule, RNG and stream offsets.

One checkpoint is one directory ``step-<N>`` (``step-<N>-end`` for the one written at the end of
the stream) under the checkpoint root, holding:

- ``model.safetensors``: the draft's trainable weights (the frozen target embedding is not saved);
- ``state.pt``: optimizer, scheduler and every rank's RNG states, read back with
  ``torch.load(weights_only=True)`` only: nothing arbitrary is ever unpickled;
- ``meta.json``: step, the resume-relevant config and its hash, world size, and every rank's
  :class:`~pipeline.stream.StreamState` (next offset per partition, EOS counts, cursor);
- ``interval.json``: the feature files first consumed after the previous checkpoint, which the
  retention policy deletes once no retained checkpoint can need them.

Writes are atomic: everything goes into a hidden temp directory, each file and the directory are
fsynced, then one ``rename`` publishes it. A crash at any instant leaves either the old set of
checkpoints or the new one, never a half-written checkpoint that :meth:`CheckpointManager.latest`
would pick. This class serves local and shared POSIX filesystems (NFS, Lustre); on an object
store (``train.output_dir: s3://...``) :class:`pipeline.train.ckpt_objects.ObjectCheckpoints`
publishes each checkpoint by a manifest written last instead of a rename.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pipeline.core.errors import RunMismatchError, StreamError

__all__ = (
    "FORMAT",
    "CheckpointInfo",
    "LoadedCheckpoint",
    "CheckpointManager",
    "config_hash",
    "describe_mismatch",
)

logger = logging.getLogger(__name__)

FORMAT = "specstream.checkpoint/1"
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
META_FILE = "meta.json"
INTERVAL_FILE = "interval.json"
FEATURES_DELETED = "features-deleted"
_NAME = re.compile(r"^step-(\d{9})(-end)?$")


def config_hash(config: Mapping[str, Any]) -> str:
    """Stable hash of the resume-relevant config (canonical JSON)."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def describe_mismatch(saved: Mapping[str, Any], current: Mapping[str, Any]) -> str:
    """The settings that differ between a checkpoint and this run, named one by one."""
    keys = sorted(set(saved) | set(current))
    diffs = [
        f"{k}: checkpoint {saved.get(k)!r} != this run {current.get(k)!r}"
        for k in keys
        if saved.get(k) != current.get(k)
    ]
    return "; ".join(diffs) or "(same values, different hash: the config format changed)"


@dataclass(frozen=True, order=True)
class CheckpointInfo:
    """A complete checkpoint directory: its step and whether it was written at the stream's end."""

    step: int
    end: bool
    path: Path  # a URL string for checkpoints on an object store (pipeline.train.ckpt_objects)

    @property
    def name(self) -> str:
        return str(self.path).rstrip("/").rsplit("/", 1)[-1]


@dataclass
class LoadedCheckpoint:
    """A checkpoint read back: its metadata, trainable weights and optimizer/scheduler/RNG state."""

    info: CheckpointInfo
    meta: dict[str, Any]
    model: dict[str, torch.Tensor]
    state: dict[str, Any]

    @property
    def step(self) -> int:
        return self.info.step


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems do not open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class CheckpointManager:
    """The checkpoint directory of a run: list, save atomically, load with checks, prune.

    :param keep_last: how many complete checkpoints :meth:`retained` keeps (at least 1)
    """

    def __init__(self, directory: str | Path, *, keep_last: int = 2) -> None:
        if keep_last < 1:
            raise ValueError("keep_last must be at least 1")
        self.directory = Path(directory)
        self.keep_last = keep_last

    # --- discovery -----------------------------------------------------------------------

    def list(self) -> list[CheckpointInfo]:
        """Complete checkpoints, oldest first (the ``-end`` one after a plain one of its step)."""
        if not self.directory.is_dir():
            return []
        out = []
        for entry in self.directory.iterdir():
            match = _NAME.match(entry.name)
            if match and entry.is_dir() and (entry / META_FILE).is_file():
                out.append(CheckpointInfo(int(match.group(1)), bool(match.group(2)), entry))
        return sorted(out)

    def latest(self) -> CheckpointInfo | None:
        found = self.list()
        return found[-1] if found else None

    def retained(self) -> list[CheckpointInfo]:
        return self.list()[-self.keep_last :]

    def sweep_temp(self) -> int:
        """Remove temp directories a crashed save left behind (call on one rank, at start)."""
        removed = 0
        if self.directory.is_dir():
            for entry in self.directory.iterdir():
                if entry.name.startswith(".tmp-") or entry.name.startswith(".trash-"):
                    shutil.rmtree(entry, ignore_errors=True)
                    removed += 1
        return removed

    # --- save ----------------------------------------------------------------------------

    def save(
        self,
        step: int,
        *,
        end: bool,
        model: Mapping[str, torch.Tensor],
        state: Mapping[str, Any],
        meta: Mapping[str, Any],
        interval: list[str],
        before_publish: Callable[[Any], None] | None = None,
    ) -> CheckpointInfo:
        """Write one checkpoint atomically and return it; ``before_publish`` is a test hook, called
        with the unpublished copy (a temp directory here, a prefix on an object store)."""
        body = {"format": FORMAT, "step": step, "end": end, "created_at": time.time(), **dict(meta)}
        name = f"step-{step:09d}" + ("-end" if end else "")
        weights = {k: v.detach().cpu().contiguous() for k, v in model.items()}
        return self._write(CheckpointInfo(step, end, self.location(name)), weights, state, body, interval, before_publish)

    def location(self, name: str) -> Path:
        """Where the checkpoint called ``name`` lives (its directory here)."""
        return self.directory / name

    def _write(self, info: CheckpointInfo, model: Mapping[str, torch.Tensor], state: Mapping[str, Any],
               body: dict[str, Any], interval: list[str], before_publish: Callable[[Any], None] | None) -> CheckpointInfo:
        """temp directory, fsync every file and the directory, one rename publishes it."""
        self.directory.mkdir(parents=True, exist_ok=True)
        final, name = info.path, info.name
        tmp = self.directory / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            save_file(dict(model), str(tmp / MODEL_FILE))
            with open(tmp / STATE_FILE, "wb") as handle:  # a Python file: a full disk's OSError stays in the chain
                torch.save(dict(state), handle)
            (tmp / INTERVAL_FILE).write_text(json.dumps(sorted(set(interval))))
            (tmp / META_FILE).write_text(json.dumps(body, indent=1, sort_keys=True))
            for file in (MODEL_FILE, STATE_FILE, INTERVAL_FILE, META_FILE):
                _fsync_file(tmp / file)
            _fsync_dir(tmp)
            if before_publish is not None:
                before_publish(tmp)
            if final.exists():  # re-saving a step (resumed from an older checkpoint): replace it
                trash = self.directory / f".trash-{name}-{uuid.uuid4().hex[:8]}"
                os.rename(final, trash)
                os.rename(tmp, final)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.rename(tmp, final)
            _fsync_dir(self.directory)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            exc.add_note(f"writing checkpoint {final}")  # torch's and safetensors' errors may not say where
            raise
        logger.info("checkpoint %s written", final)
        return info

    # --- load ----------------------------------------------------------------------------

    def read_meta(self, info: CheckpointInfo) -> dict[str, Any]:
        return self._check_format(info, json.loads((info.path / META_FILE).read_text()))

    @staticmethod
    def _check_format(info: CheckpointInfo, meta: dict[str, Any]) -> dict[str, Any]:
        if meta.get("format") != FORMAT:
            raise RunMismatchError(
                f"{info.path} is not a {FORMAT} checkpoint (format {meta.get('format')!r})"
            )
        return meta

    def load(
        self,
        info: CheckpointInfo,
        *,
        config: Mapping[str, Any],
        world_size: int,
        device: torch.device | str = "cpu",
    ) -> LoadedCheckpoint:
        """Read a checkpoint, refusing one from another config or world size with the difference."""
        meta = self.read_meta(info)
        want = config_hash(config)
        if int(meta.get("world_size", -1)) != world_size:
            raise RunMismatchError(
                f"checkpoint {info.path} was written by {meta.get('world_size')} trainer ranks, this run "
                f"has {world_size}: resume with the same world size (each rank's partitions and stream "
                "offsets are in the checkpoint), or start a new run"
            )
        if meta.get("config_hash") != want:
            raise RunMismatchError(
                f"checkpoint {info.path} belongs to another training config: "
                f"{describe_mismatch(meta.get('config', {}), config)}; resume with the original "
                "settings or start a new run (another run id or checkpoint directory)"
            )
        model, state = self._files(info, device)
        return LoadedCheckpoint(info, meta, model, state)

    def _files(self, info: CheckpointInfo, device: torch.device | str) -> tuple[dict[str, torch.Tensor], Any]:
        """The weights and the optimizer/scheduler/RNG state (``weights_only``: nothing arbitrary unpickled)."""
        model = load_file(str(info.path / MODEL_FILE), device=str(device))
        state = torch.load(info.path / STATE_FILE, map_location=device, weights_only=True)
        return model, state

    def find(self, location: str) -> CheckpointInfo | None:
        """The complete checkpoint at ``location`` (a path, or the URL ``str(info.path)`` gives)."""
        if "://" in location:
            return next((i for i in self.list() if str(i.path) == location.rstrip("/")), None)
        wanted = Path(location).resolve()
        return next((i for i in self.list() if Path(i.path).resolve() == wanted), None)

    def interval(self, info: CheckpointInfo) -> list[str]:
        path = info.path / INTERVAL_FILE
        if not path.is_file():
            raise StreamError(f"checkpoint {info.path} has no {INTERVAL_FILE}")
        return list(json.loads(path.read_text()))

    def features_deleted(self, info: CheckpointInfo) -> bool:
        return (info.path / FEATURES_DELETED).exists()

    def mark_features_deleted(self, info: CheckpointInfo) -> None:
        marker = info.path / FEATURES_DELETED
        marker.write_text("")
        _fsync_dir(info.path)

    def remove(self, info: CheckpointInfo) -> None:
        """Delete one checkpoint: renamed away first, so a crash never leaves a half-deleted one."""
        trash = self.directory / f".trash-{info.name}-{uuid.uuid4().hex[:8]}"
        os.rename(info.path, trash)
        shutil.rmtree(trash, ignore_errors=True)
