"""The durable write: every byte hinted to writeback once, in order; the hint never decides anything."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import crc32c
import pytest

import pipeline.durable_write as durable_write
from pipeline.durable_write import start_writeback, write_atomically

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")


def spy_on_writeback(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """The ranges the writer hands to (the real) ``start_writeback``."""
    ranges: list[tuple[int, int]] = []

    def recording(fd: int, offset: int, length: int) -> bool:
        ranges.append((offset, length))
        return start_writeback(fd, offset, length)

    monkeypatch.setattr(durable_write, "start_writeback", recording)
    return ranges


def test_a_durable_write_hints_every_piece_once_in_file_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(durable_write, "WRITE_PIECE_BYTES", 5)
    ranges = spy_on_writeback(monkeypatch)
    chunks = [b"header-bytes", memoryview(bytes(range(23))), b"", b"tail"]
    crc = write_atomically(str(tmp_path / "d" / "f.bin"), chunks)
    data = (tmp_path / "d" / "f.bin").read_bytes()
    assert data == b"".join(bytes(c) for c in chunks) and crc == crc32c.crc32c(data)
    assert ranges[0][0] == 0 and all(length <= 5 for _, length in ranges)
    assert all(a + n == b for (a, n), (b, _) in zip(ranges, ranges[1:])), ranges  # contiguous, no overlap
    assert sum(length for _, length in ranges) == len(data)
    assert os.listdir(tmp_path / "d") == ["f.bin"], "no temp file left"


def test_a_scratch_write_asks_for_no_writeback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ranges = spy_on_writeback(monkeypatch)
    write_atomically(str(tmp_path / "f.bin"), [b"x" * 100], durable=False)
    assert ranges == [] and (tmp_path / "f.bin").read_bytes() == b"x" * 100


@linux_only
def test_the_kernel_takes_the_hint_for_a_file_and_a_refusal_changes_nothing(tmp_path: Path) -> None:
    with open(tmp_path / "f.bin", "wb", buffering=0) as f:
        f.write(b"y" * 8192)
        assert start_writeback(f.fileno(), 0, 8192) is True
        assert start_writeback(f.fileno(), 0, 0) is False  # nothing to write back
    read, write = os.pipe()
    try:
        assert start_writeback(write, 0, 10) is False  # a pipe has no pages to write back: ESPIPE, ignored
        os.write(write, b"still usable")
        assert os.read(read, 64) == b"still usable"
    finally:
        os.close(read)
        os.close(write)

