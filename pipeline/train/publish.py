"""Rank 0's metrics, curves and tracker files when ``train.output_dir`` is an object store URL.

An object can't be appended to, so rank 0 writes ``metrics.jsonl``, ``eval.jsonl``, the curves
and the tracker event files into a local mirror directory, as on a local output directory, and
copies the mirror to ``<output_dir>/`` after every checkpoint and at the end of the run. A resumed
run first fetches the published ``metrics.jsonl``/``eval.jsonl``, so its rows continue them. The
published copy lags the local one by at most one checkpoint interval.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import fsspec

__all__ = ("OutputMirror",)

logger = logging.getLogger(__name__)

_CONTINUED = ("metrics.jsonl", "eval.jsonl")  # appended by a resumed run: fetched before it starts


class OutputMirror:
    """A local directory published to an fsspec URL (``put`` of every file: one PUT each)."""

    def __init__(self, local_dir: str | Path, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        self.local = Path(local_dir)
        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.url_to_fs(self.url, **dict(storage_options or {}))
        self._pushed: dict[Path, tuple[int, int]] = {}  # file -> (size, mtime_ns) last copied

    def pull(self) -> None:
        """Fetch the files a resumed run appends to, unless the mirror already holds newer ones."""
        self.local.mkdir(parents=True, exist_ok=True)
        for name in _CONTINUED:
            target = self.local / name
            try:
                data = self.fs.cat_file(f"{self.root}/{name}")
            except FileNotFoundError:
                continue
            if not target.exists() or target.stat().st_size < len(data):
                target.write_bytes(data)

    def push(self) -> int:
        """Copy the mirror's new or changed files to the URL; returns how many. Never fails the run."""
        copied = 0
        try:
            for dirpath, _, files in os.walk(self.local):
                for name in files:
                    path = Path(dirpath) / name
                    stat = path.stat()
                    if self._pushed.get(path) == (stat.st_size, stat.st_mtime_ns):
                        continue  # unchanged since the last checkpoint: one PUT per change, not per push
                    self.fs.put_file(str(path), f"{self.root}/{path.relative_to(self.local).as_posix()}")
                    self._pushed[path] = (stat.st_size, stat.st_mtime_ns)
                    copied += 1
        except OSError:
            logger.warning("could not publish %s to %s", self.local, self.url, exc_info=True)
        return copied
