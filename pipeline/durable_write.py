"""Write a file on a local (or POSIX-mounted) filesystem so that it is whole or absent, and durable.

temp file -> pieces written (CRC-32C over each piece while it is in the CPU cache) -> fsync ->
atomic rename -> directory fsync. Nothing else ever sees the file's final name before every byte
of it is written (and, when durable, on disk), and a crash leaves at most a temp file that
``FeatureStore.sweep_temp_files`` removes.

While it writes, it asks the kernel after every piece to start writing that piece back
(Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``, which returns without waiting, as RocksDB's
``bytes_per_sync`` and PostgreSQL's ``backend_flush_after`` do): otherwise the copy into the page
cache and the disk take turns, the whole file waiting in the final ``fsync``. On this project's
2-core machine 16 puts of the 8B shape (537 MB) took 0.30 s instead of 0.48 (median of 12
alternating repeats); a plain writer gained as much (0.29 s against 0.45), so
``benchmarks/bench_dataplane.py`` gives its baseline the same hint. Only a hint: durability still
comes from ``fsync``, and where the call does not exist (not Linux) or the file refuses it,
nothing happens.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import uuid
from collections.abc import Callable, Iterable

import crc32c

__all__ = ("WRITE_PIECE_BYTES", "start_writeback", "write_atomically")

#: A put writes (and checksums, and hands to writeback) this much a call: faster than whole tensors,
#: and 1 MiB hints beat 4 and 16 MiB ones (durable writes 1.51x as fast as unhinted, against 1.36x and 1.14x).
WRITE_PIECE_BYTES = 1 << 20
_SYNC_FILE_RANGE_WRITE = 2  # start writeback of the range's dirty pages; do not wait for it
_UNRESOLVED = object()
_sync_file_range: Callable[[int, int, int, int], int] | None | object = _UNRESOLVED


def write_atomically(path: str, chunks: Iterable[bytes | memoryview], *, durable: bool = True) -> int:
    """Write ``chunks`` in order as the file ``path`` (temp + rename); returns their CRC-32C.

    ``durable``: fsync the data and the directory (off only for scratch data).
    """
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    crc = written = 0
    try:
        with open(tmp, "wb", buffering=0) as f:
            for chunk in chunks:
                data = memoryview(chunk).cast("B")
                for start in range(0, len(data), WRITE_PIECE_BYTES):
                    piece = view = data[start : start + WRITE_PIECE_BYTES]
                    crc = crc32c.crc32c(piece, crc)  # the piece stays in cache for the write
                    while view:
                        view = view[f.write(view) :]
                    if durable:  # the disk starts on this piece while the next one is copied
                        start_writeback(f.fileno(), written, len(piece))
                    written += len(piece)
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if isinstance(exc, OSError) and not exc.filename:
            exc.add_note(f"writing {path}")  # a full disk's write error names no file: say which
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if durable:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)  # the rename itself must survive a crash
        finally:
            os.close(fd)
    return crc


def start_writeback(fd: int, offset: int, length: int) -> bool:
    """Ask the kernel to start writing ``length`` bytes of ``fd`` from ``offset`` to disk, without
    waiting; True if it took the request (a refusal, such as a pipe's, is ignored: only a hint)."""
    function = _resolve()
    if function is None or length <= 0:
        return False
    return function(fd, offset, length, _SYNC_FILE_RANGE_WRITE) == 0


def _resolve() -> Callable[[int, int, int, int], int] | None:
    """libc's ``sync_file_range``, looked up once; None where there is none."""
    global _sync_file_range
    if _sync_file_range is _UNRESOLVED:
        _sync_file_range = None
        if sys.platform.startswith("linux"):
            try:
                function = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).sync_file_range
            except (OSError, AttributeError):
                function = None
            if function is not None:
                function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
                function.restype = ctypes.c_int
                _sync_file_range = function
    return _sync_file_range  # type: ignore[return-value]
