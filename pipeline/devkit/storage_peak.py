"""The peak bytes a run keeps on storage, sampled while it runs (benchmarks and tests).

Sizes are summed over every file under a directory (temp files being written included), so
what is measured is what the storage holds, not what refs claim.
"""

from __future__ import annotations

import os
import threading
from typing import Self

__all__ = ("StoragePeak", "tree_bytes")


def tree_bytes(root: str | os.PathLike[str]) -> int:
    """Every byte of every file under ``root`` now (0 when it does not exist)."""
    total = 0
    for directory, _dirs, files in os.walk(root):
        for name in files:
            try:
                total += os.stat(os.path.join(directory, name)).st_size
            except FileNotFoundError:  # deleted by retention between listing and stat
                pass
    return total


class StoragePeak:
    """The largest total size of the feature files under a root, sampled every ``every_s``."""

    def __init__(self, root: str, every_s: float = 0.2) -> None:
        self.root, self.every_s, self.peak = root, every_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def size(self) -> int:
        return tree_bytes(self.root)

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self.peak = max(self.peak, self.size())

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.peak = max(self.peak, self.size())
