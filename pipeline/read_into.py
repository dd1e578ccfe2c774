"""Read a feature file straight into the caller's tensors: one copy from the page cache, CRC on the way.

:meth:`FeatureStore.get` maps a whole file (its tensors view the page cache) and the collate
then copies the hidden states into a fresh batch, and on CUDA once more to pin them.
:func:`read_into` reads each named tensor of a local (or POSIX-mounted shared) file directly
into a destination the caller owns, a row of a reused, possibly pinned, batch buffer, in chunks
small enough that the CRC-32C runs over each chunk while it is still in the CPU cache: every byte
is copied once, by the kernel, and no batch is allocated per step.

It keeps every check of ``get``: the uri must stay inside the run's root, the size must match the
ref before anything is read, the checksum must match over the whole file, and the header must
match the ref's tensor specs. Whatever it does not handle (remote stores, a destination whose dtype
or shape differs from the stored tensor, an unusual file layout, a file it cannot open or whose size
or header is wrong) it hands to ``get``, so the result and the error are exactly ``get``'s; only a
checksum mismatch over the bytes it read is its own error, in ``get``'s words.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from typing import BinaryIO

import crc32c
import numpy as np
import torch
from fsspec.implementations.local import LocalFileSystem

from pipeline.core.errors import IntegrityError, PayloadError
from pipeline.core.messages import SampleRef
from pipeline.storage import FeatureStore, parse_header, tensors_from_buffer

__all__ = ("CHUNK_BYTES", "FIRST_READ_BYTES", "HINT_MIN_BYTES", "is_local", "read_into", "will_read")

#: Read (and checksum) this much at a time: it stays in L2 between the copy and the CRC.
CHUNK_BYTES = 1 << 20
#: The first read, from offset 0: the length, the header and the first data. After a small first
#: read (the 8-byte length, then the header; 16 or 64 KiB too) the chunked reads that follow
#: swung between a third of a cold disk's rate and all of it from pass to pass; a whole chunk
#: first held them at 0.9-1.0x of one-call reads (bench_read_path.py --cold).
FIRST_READ_BYTES = 1 << 20
#: Files smaller than this are not worth a hint: the kernel's readahead covers them in one go.
HINT_MIN_BYTES = 1 << 20
_MAX_HEADER = 16 * 1024 * 1024


def is_local(store: FeatureStore) -> bool:
    """A store whose files are plain POSIX files (local disk or a shared mount)."""
    return isinstance(store.fs, LocalFileSystem)


def read_into(
    store: FeatureStore, ref: SampleRef, dest: Mapping[str, torch.Tensor] | None
) -> dict[str, torch.Tensor]:
    """The verified tensors of ``ref``; those named in ``dest`` are ``dest``'s own tensors, filled.

    A ``dest`` tensor must be contiguous with the stored dtype and shape, else that tensor is
    decoded as ``get`` would. Raises what ``get`` raises; ``dest`` holds garbage after a failure.
    """
    if not dest or not is_local(store) or not store.holds(ref.run_id):
        return store.get(ref)
    try:
        with open(store.resolve(ref.uri), "rb", buffering=0) as f:
            if (
                os.fstat(f.fileno()).st_size != ref.nbytes
            ):  # before allocating: a ref cannot make us read a huge file
                return store.get(ref)
            out = _read(f, ref, dest)
    except OSError:  # missing, a directory, unreadable: get says which, in its words
        out = None
    return store.get(ref) if out is None else out


def will_read(store: FeatureStore, ref: SampleRef) -> None:
    """Ask the kernel to start reading ``ref``'s file into the page cache, and return at once.

    Issued for the next sample while this one is read and checked, it keeps a cold disk busy across
    the gap between two files: on an erratic virtual disk chunked reads ran at 1.3-1.4 GB/s with it
    and 0.6-1.0 without; on a steady one it changes nothing (bench_read_path.py --cold, "hinted").
    Only a hint: nothing is read or checked here, and a ref that ``read_into`` would refuse
    (outside the run, not a regular file) is ignored.
    """
    advise = getattr(os, "posix_fadvise", None)
    if advise is None or ref.nbytes < HINT_MIN_BYTES or not is_local(store) or not store.holds(ref.run_id):
        return
    try:
        fd = os.open(store.resolve(ref.uri), os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not block us
    except (OSError, PayloadError):  # missing, or a uri read_into refuses: it will say why
        return
    try:
        advise(fd, 0, ref.nbytes, os.POSIX_FADV_WILLNEED)
    except OSError:
        pass
    finally:
        os.close(fd)


def _read(f: BinaryIO, ref: SampleRef, dest: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """Fill ``dest`` and return the tensors, or None where ``get`` must decide (a header defect)."""
    nbytes = ref.nbytes
    if nbytes < 8:
        return None
    # Untouched pages of an np.empty are never faulted in: the ranges read into ``dest`` cost no memory.
    buffer = np.empty(nbytes, dtype=np.uint8)
    done = min(max(FIRST_READ_BYTES, 8), nbytes)  # bytes of the file already in ``buffer``
    crc = _fill(f, memoryview(buffer)[:done], 0, ref)
    (size,) = struct.unpack("<Q", buffer[:8].tobytes())
    if size > min(_MAX_HEADER, nbytes - 8):
        return None
    base = 8 + size
    if base > done:
        crc = _fill(f, memoryview(buffer)[done:base], crc, ref)
        done = base
    try:
        if parse_header(buffer[:base]) != ref.tensors:
            return None
        offsets = {
            k: v["data_offsets"]
            for k, v in json.loads(buffer[8:base].tobytes()).items()
            if k != "__metadata__"
        }
        views = tensors_from_buffer(buffer)  # reads only the header: checks offsets, dtypes and shapes
    except (IntegrityError, ValueError, KeyError, TypeError, AttributeError):
        return None
    order = sorted(offsets, key=lambda k: (offsets[k][0], offsets[k][1]))
    position = 0
    for name in order:  # the data must tile the file in order: then one sequential pass reads it all
        start, end = offsets[name]
        if start != position:
            return None
        position = end
    if base + position != nbytes:
        return None
    out: dict[str, torch.Tensor] = {}
    for name in order:
        start, end = base + offsets[name][0], base + offsets[name][1]  # in the file
        target = dest.get(name)
        view = views[name]
        if target is None or not _fits(target, view):
            target = view
            sink = memoryview(buffer)[start:end]
        else:
            sink = (
                memoryview(target.reshape(-1).view(torch.uint8).numpy()) if end > start else memoryview(b"")
            )
            ahead = max(0, min(end, done) - start)  # bytes the first read already brought (checksummed)
            sink[:ahead] = memoryview(buffer)[start : start + ahead]
        crc = _fill(f, sink[max(0, done - start) :], crc, ref)
        out[name] = target
    got = f"crc32c:{crc:08x}"
    if got != ref.checksum:
        raise IntegrityError(f"{ref.uri} checksum {got} does not match the ref's {ref.checksum}")
    return out


def _fits(target: torch.Tensor, view: torch.Tensor) -> bool:
    return (
        target.device.type == "cpu"
        and target.dtype == view.dtype
        and target.shape == view.shape
        and target.is_contiguous()
    )


def _fill(f: BinaryIO, view: memoryview, crc: int, ref: SampleRef) -> int:
    """Read exactly ``len(view)`` bytes into ``view`` chunk by chunk, extending the CRC over each."""
    while view:
        part = view[:CHUNK_BYTES]
        got = f.readinto(part)
        if not got:
            raise IntegrityError(f"{ref.uri} ended before the {ref.nbytes} bytes its ref says")
        crc = crc32c.crc32c(part[:got], crc)
        view = view[got:]
    return crc
