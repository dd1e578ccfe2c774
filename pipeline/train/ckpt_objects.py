"""Checkpoints on an object store (any fsspec URL: ``s3://``, ``gs://``, ``memory://``): no rename needed.

An object store has no atomic directory rename, so a checkpoint becomes visible by a manifest
written last. One checkpoint ``step-<N>[-end]`` is:

- ``step-<N>/<token>/``: its files (``model.safetensors``, ``state.pt``, ``interval.json``,
  ``meta.json``) under a prefix unique to this save, which nothing reads until a manifest names it;
- ``step-<N>/MANIFEST.json``: one small object written after every file is stored, naming the
  token and each file's size and CRC-32C. A PUT is atomic, so the manifest is either the old one
  or the new one.

:meth:`ObjectCheckpoints.list` trusts a checkpoint only when its manifest parses and every file it
names is there with its size; every read checks the checksum. Half-written saves (a prefix without
a manifest, or a token no manifest names) are invisible and :meth:`ObjectCheckpoints.sweep_temp`
removes them. Trainer ranks on different machines share checkpoints through the bucket alone.
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import crc32c
import fsspec
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from pipeline.core.errors import StreamError
from pipeline.train.checkpoint import (
    _NAME,
    FEATURES_DELETED,
    INTERVAL_FILE,
    META_FILE,
    MODEL_FILE,
    STATE_FILE,
    CheckpointInfo,
    CheckpointManager,
)

__all__ = ("MANIFEST_FILE", "ObjectCheckpoints", "is_url", "open_checkpoints", "read_checkpoint_file")

logger = logging.getLogger(__name__)

MANIFEST_FILE = "MANIFEST.json"
MANIFEST_FORMAT = "specstream.checkpoint-manifest/1"


def is_url(location: str | Path) -> bool:
    """Whether a location is an fsspec URL of a non-local filesystem (``file://`` counts as local)."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def open_checkpoints(
    directory: str | Path, *, keep_last: int = 2, storage_options: Mapping[str, Any] | None = None
) -> CheckpointManager:
    """The checkpoint manager for a directory: POSIX renames on a path, manifests on a URL."""
    if is_url(directory):
        return ObjectCheckpoints(str(directory), keep_last=keep_last, storage_options=storage_options)
    return CheckpointManager(directory, keep_last=keep_last)


def read_checkpoint_file(checkpoint: str | Path, name: str, storage_options: Mapping[str, Any] | None = None) -> bytes:
    """One file of a checkpoint (a directory path or a ``step-<N>`` URL), checksum-verified on URLs."""
    if not is_url(checkpoint):
        return (Path(checkpoint) / name).read_bytes()
    parent, _, step = str(checkpoint).rstrip("/").rpartition("/")
    store = ObjectCheckpoints(parent, storage_options=storage_options)
    match = _NAME.match(step)
    if not match:
        raise StreamError(f"{checkpoint} is not a checkpoint (its name must be step-<N>)")
    return store.read(CheckpointInfo(int(match.group(1)), bool(match.group(2)), store.location(step)), name)  # type: ignore[arg-type]


def _crc(data: bytes) -> str:
    return f"crc32c:{crc32c.crc32c(data):08x}"


class ObjectCheckpoints(CheckpointManager):
    """A checkpoint root on an object store: save under a fresh prefix, publish by a manifest.

    :class:`CheckpointInfo.path` is the checkpoint's URL (``s3://bucket/out/checkpoints/step-<N>``).
    """

    def __init__(
        self, directory: str, *, keep_last: int = 2, storage_options: Mapping[str, Any] | None = None
    ) -> None:
        if keep_last < 1:
            raise ValueError("keep_last must be at least 1")
        self.url = directory.rstrip("/")
        self.directory = self.url  # type: ignore[assignment]  # messages name it; never used as a Path here
        self.keep_last = keep_last
        self.fs, root = fsspec.url_to_fs(self.url, **dict(storage_options or {}))
        self.root = root.rstrip("/")
        self._protocol = self.url.split("://", 1)[0]

    def location(self, name: str) -> str:  # type: ignore[override]
        return f"{self.url}/{name}"

    def _key(self, info: CheckpointInfo, *parts: str) -> str:
        return posixpath.join(self.root, info.name, *parts)

    # --- discovery -----------------------------------------------------------------------

    def _objects(self) -> dict[str, int]:
        """Every object under the root with its size, listed afresh (s3fs caches listings)."""
        self.fs.invalidate_cache()
        try:
            found = self.fs.find(self.root, detail=True)
        except FileNotFoundError:
            return {}
        return {_relative(path, self.root): int(entry.get("size") or 0) for path, entry in found.items()}

    def _manifest(self, name: str) -> dict[str, Any] | None:
        try:
            body = json.loads(self.fs.cat_file(posixpath.join(self.root, name, MANIFEST_FILE)))
        except (FileNotFoundError, ValueError):
            return None
        if not isinstance(body, dict) or body.get("format") != MANIFEST_FORMAT or not isinstance(body.get("files"), dict):
            return None
        return body

    def list(self) -> list[CheckpointInfo]:
        """Complete checkpoints (manifest present, every file it names there with its size), oldest first."""
        objects = self._objects()
        out = []
        for key in objects:
            name, _, rest = key.partition("/")
            match = _NAME.match(name)
            if not match or rest != MANIFEST_FILE:
                continue
            manifest = self._manifest(name)
            if manifest is None:
                continue
            token = manifest["token"]
            if all(objects.get(f"{name}/{token}/{f}") == e["size"] for f, e in manifest["files"].items()):
                out.append(CheckpointInfo(int(match.group(1)), bool(match.group(2)), self.location(name)))  # type: ignore[arg-type]
            else:
                logger.warning("checkpoint %s: its manifest names files that are missing or of another size", name)
        return sorted(out)

    def sweep_temp(self) -> int:
        """Remove every save no manifest publishes (crashed saves, replaced ones); returns how many."""
        objects = self._objects()
        doomed: set[str] = set()
        for key in objects:
            name, _, rest = key.partition("/")
            if not _NAME.match(name) or rest in (MANIFEST_FILE, FEATURES_DELETED):
                continue
            manifest = self._manifest(name)
            token = rest.partition("/")[0]
            if manifest is None or token != manifest["token"]:
                doomed.add(f"{name}/{token}")
        for prefix in sorted(doomed):
            self.fs.rm(posixpath.join(self.root, prefix), recursive=True)
        if doomed:
            logger.info("removed %d unpublished checkpoint saves under %s", len(doomed), self.url)
        return len(doomed)

    # --- save ----------------------------------------------------------------------------

    def _write(self, info: CheckpointInfo, model: Mapping[str, torch.Tensor], state: Mapping[str, Any],
               body: dict[str, Any], interval: list[str], before_publish: Callable[[Any], None] | None) -> CheckpointInfo:
        """Store the files under a fresh prefix, then the manifest (last, one PUT)."""
        token = uuid.uuid4().hex[:12]
        previous = self._manifest(info.name)
        buffer = io.BytesIO()
        torch.save(dict(state), buffer)
        files = {
            MODEL_FILE: st_save(dict(model)),
            STATE_FILE: buffer.getvalue(),
            INTERVAL_FILE: json.dumps(sorted(set(interval))).encode(),
            META_FILE: json.dumps(body, indent=1, sort_keys=True).encode(),
        }
        try:
            for file, data in files.items():
                self.fs.pipe_file(self._key(info, token, file), data)
            if before_publish is not None:
                before_publish(f"{info.path}/{token}")
            manifest = {
                "format": MANIFEST_FORMAT,
                "token": token,
                "files": {f: {"size": len(d), "checksum": _crc(d)} for f, d in files.items()},
            }
            self.fs.pipe_file(self._key(info, MANIFEST_FILE), json.dumps(manifest, indent=1).encode())
        except BaseException as exc:
            exc.add_note(f"writing checkpoint {info.path}")
            raise
        if previous is not None:  # a re-saved step (resumed from an older one): the old files go
            self.fs.rm(self._key(info, previous["token"]), recursive=True)
            self._rm_quietly(self._key(info, FEATURES_DELETED))
        logger.info("checkpoint %s written", info.path)
        return info

    # --- load ----------------------------------------------------------------------------

    def read(self, info: CheckpointInfo, file: str) -> bytes:
        """One file of a published checkpoint, after checking its size and checksum against the manifest."""
        manifest = self._manifest(info.name)
        if manifest is None or file not in manifest["files"]:
            raise StreamError(f"checkpoint {info.path} has no manifest naming {file}: it is incomplete")
        data = self.fs.cat_file(self._key(info, manifest["token"], file))
        want = manifest["files"][file]
        if len(data) != want["size"] or _crc(data) != want["checksum"]:
            raise StreamError(
                f"checkpoint {info.path}: {file} does not match its manifest ({len(data)} bytes, "
                f"{_crc(data)}; manifest {want['size']}, {want['checksum']}): resume from another checkpoint"
            )
        return data

    def read_meta(self, info: CheckpointInfo) -> dict[str, Any]:
        return self._check_format(info, json.loads(self.read(info, META_FILE)))

    def _files(self, info: CheckpointInfo, device: torch.device | str) -> tuple[dict[str, torch.Tensor], Any]:
        model = {k: v.to(device) for k, v in st_load(self.read(info, MODEL_FILE)).items()}
        state = torch.load(io.BytesIO(self.read(info, STATE_FILE)), map_location=device, weights_only=True)
        return model, state

    def interval(self, info: CheckpointInfo) -> list[str]:
        return list(json.loads(self.read(info, INTERVAL_FILE)))

    def features_deleted(self, info: CheckpointInfo) -> bool:
        return bool(self.fs.exists(self._key(info, FEATURES_DELETED)))

    def mark_features_deleted(self, info: CheckpointInfo) -> None:
        self.fs.pipe_file(self._key(info, FEATURES_DELETED), b"")

    def remove(self, info: CheckpointInfo) -> None:
        """The manifest goes first: a crash afterwards leaves an unpublished save that a sweep removes."""
        self._rm_quietly(self._key(info, MANIFEST_FILE))
        self.fs.rm(self._key(info), recursive=True)

    def _rm_quietly(self, key: str) -> None:
        try:
            self.fs.rm_file(key)
        except FileNotFoundError:
            pass


def _relative(path: str, root: str) -> str:
    path = path.split("://", 1)[-1]
    return posixpath.relpath(path, root)
