"""The data plane: one safetensors file per sample on any fsspec filesystem (the claim check).

``put`` makes the file complete and visible *before* it returns (temp + fsync + atomic rename on
local disks; one PUT on object stores), so a ref produced afterwards never points at a partial
file. ``get`` trusts nothing: the uri must stay inside the run's storage root, and the bytes must
match the ref's size, checksum and tensor header before a single tensor is built. Every attempt
at a sample writes its own object (``features/<partition>/<sample_id>.<attempt>.safetensors``), so
a fenced or late writer can never change the bytes a committed ref describes; the objects of
aborted attempts are orphans that :meth:`FeatureStore.sweep_orphans` removes by the committed refs.
Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import os
import posixpath
import re
import struct
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import crc32c
import fsspec
import numpy as np
import torch
from fsspec.implementations.local import LocalFileSystem

from pipeline.core.errors import ConfinementError, IntegrityError
from pipeline.core.messages import SampleRef, TensorSpec
from pipeline.core.topics import REGEN_SUFFIX
from pipeline.durable_write import write_atomically

__all__ = ("FeatureStore", "StoredFeature", "SafetensorsLayout", "checksum_of", "parse_header", "tensors_from_buffer")

logger = logging.getLogger(__name__)

Listed = tuple[int, float | None]  # a stored file's size and modification time (None: not reported)
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_MAX_HEADER = 16 * 1024 * 1024


def checksum_of(data: bytes | memoryview) -> str:
    """CRC-32C: hardware accelerated (GB/s), enough to catch torn or swapped files."""
    return f"crc32c:{crc32c.crc32c(data):08x}"


def parse_header(data: bytes | memoryview | np.ndarray) -> dict[str, TensorSpec]:
    """Tensor specs from a safetensors header, raising ``IntegrityError`` on any defect."""
    if len(data) < 8:
        raise IntegrityError(f"file of {len(data)} bytes is too short for a safetensors header")
    (size,) = struct.unpack("<Q", bytes(data[:8]))
    if size > min(_MAX_HEADER, len(data) - 8):
        raise IntegrityError(f"safetensors header length {size} exceeds the file")
    try:
        header = json.loads(bytes(data[8 : 8 + size]))
        if not isinstance(header, dict):
            raise TypeError("the header is not a JSON object")
        specs = {
            name: TensorSpec(dtype=entry["dtype"], shape=list(entry["shape"]))
            for name, entry in header.items()
            if name != "__metadata__"
        }
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise IntegrityError(f"unreadable safetensors header: {exc}") from None
    return specs


@dataclass(frozen=True)
class StoredFeature:
    """What a producer needs to write the ref of a file it just stored."""

    uri: str
    nbytes: int
    checksum: str
    tensors: dict[str, TensorSpec]


class FeatureStore:
    """Feature files of one run under ``<root_url>/<run_id>/``.

    :param root_url: any fsspec URL or local path (``/mnt/nfs/x``, ``s3://bucket/x``, ``memory://x``)
    :param durable: fsync data and directory on local filesystems (turn off only for scratch)
    """

    def __init__(
        self,
        root_url: str,
        run_id: str,
        *,
        durable: bool = True,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        if not _SAFE_NAME.match(run_id):
            raise ValueError(f"run id {run_id!r} is not a safe path component")
        self.root_url = root_url
        self.run_id = run_id
        self.durable = durable
        self.storage_options = dict(storage_options or {})  # a sibling store (the eval sub-run's) reuses them
        self.fs, root = fsspec.url_to_fs(root_url, **dict(storage_options or {}))
        self._local = isinstance(self.fs, LocalFileSystem)
        self.run_root = posixpath.join(root.rstrip("/") or "/", run_id)

    # --- paths ---------------------------------------------------------------------------

    @staticmethod
    def uri_for(partition: int, sample_id: str, attempt: str | None = None) -> str:
        """Where one attempt at a sample lives; a new attempt token unless one is given."""
        if not _SAFE_NAME.match(sample_id):
            raise ValueError(f"sample id {sample_id!r} is not a safe file name")
        attempt = attempt or uuid.uuid4().hex[:12]
        return f"features/{int(partition)}/{sample_id}.{attempt}.safetensors"

    def resolve(self, uri: str) -> str:
        """The absolute path of a ref's uri, refusing anything that leaves the run root."""
        if (
            not uri
            or "\\" in uri
            or "\x00" in uri
            or "://" in uri
            or uri.startswith("/")
            or re.match(r"^[A-Za-z]:", uri)
        ):
            raise ConfinementError(f"uri {uri[:200]!r} is not a relative path inside the run")
        parts = uri.split("/")
        if any(part in ("", ".", "..") for part in parts):
            raise ConfinementError(f"uri {uri[:200]!r} escapes the run's storage root")
        path = posixpath.normpath(posixpath.join(self.run_root, uri))
        if not path.startswith(self.run_root.rstrip("/") + "/"):
            raise ConfinementError(f"uri {uri[:200]!r} resolves outside {self.run_root}")
        return path

    # --- write ---------------------------------------------------------------------------

    def put(self, partition: int, sample_id: str, tensors: Mapping[str, torch.Tensor]) -> StoredFeature:
        """Serialize and store one sample; returns what its ref must say.

        The safetensors layout is written directly from the tensors' memory (no serialised copy
        of the whole sample), with the checksum computed on the way.
        """
        uri = self.uri_for(partition, sample_id)  # attempt-unique: never replaces a committed file
        path = self.resolve(uri)
        layout = SafetensorsLayout.of(tensors, metadata={"specstream": f"{self.run_id}/{sample_id}"})
        if self._local:
            checksum = f"crc32c:{write_atomically(path, layout.chunks(), durable=self.durable):08x}"
        else:
            data = b"".join(layout.chunks())
            checksum = checksum_of(data)
            self.fs.pipe_file(path, data)  # one PUT: atomic on object stores
        return StoredFeature(uri, layout.nbytes, checksum, layout.specs)

    def put_bytes(self, uri: str, data: bytes) -> StoredFeature:
        """Store an already serialised safetensors file (replay tools, tests)."""
        specs = parse_header(data)
        path = self.resolve(uri)
        if self._local:
            write_atomically(path, [data], durable=self.durable)
        else:
            self.fs.pipe_file(path, data)
        return StoredFeature(uri, len(data), checksum_of(data), specs)

    # --- read ----------------------------------------------------------------------------

    def holds(self, run_id: str) -> bool:
        """Whether refs of ``run_id`` name files here: the run's own, and its regeneration
        sub-run's (a storage budget's later captures go to the run's own store)."""
        return run_id in (self.run_id, f"{self.run_id}{REGEN_SUFFIX}")

    def read_verified(self, ref: SampleRef) -> np.ndarray:
        """The file's bytes after checking size, checksum and header against the ref."""
        if not self.holds(ref.run_id):
            raise ConfinementError(f"ref of run {ref.run_id!r} read from run {self.run_id!r}")
        path = self.resolve(ref.uri)
        try:
            size = self._size(path)
            if size != ref.nbytes:  # before allocating: a ref cannot make us read a huge file
                raise IntegrityError(f"{ref.uri} has {size} bytes, its ref says {ref.nbytes}")
            data = self._read(path, ref.nbytes)
        except FileNotFoundError:
            raise IntegrityError(f"feature file {ref.uri} is missing") from None
        except IsADirectoryError:
            raise IntegrityError(f"{ref.uri} is a directory, not a feature file") from None
        except OSError as exc:
            raise IntegrityError(f"{ref.uri} cannot be read: {exc.strerror or exc}") from None
        if len(data) != ref.nbytes:
            raise IntegrityError(f"{ref.uri} has {len(data)} bytes, its ref says {ref.nbytes}")
        got = checksum_of(data)
        if got != ref.checksum:
            raise IntegrityError(f"{ref.uri} checksum {got} does not match the ref's {ref.checksum}")
        specs = parse_header(data)
        if specs != ref.tensors:
            raise IntegrityError(f"{ref.uri} tensors {_brief(specs)} differ from the ref's {_brief(ref.tensors)}")
        return data

    def _size(self, path: str) -> int:
        """The object's size; a directory is refused here, before anything is read."""
        if self._local:
            if os.path.isdir(path):
                raise IsADirectoryError(path)
            return os.path.getsize(path)
        info = self.fs.info(path)
        if info.get("type") == "directory":
            raise IsADirectoryError(path)
        return int(info["size"])

    def _read(self, path: str, expected: int) -> np.ndarray:
        """A writable buffer the tensors view. A local file is mapped copy-on-write (no copy; a
        tensor written to gets a private page): feature files are never written after their
        rename; one cut short by hand under a reader would fault (SIGBUS), not fail a check."""
        if self._local:
            if expected == 0:  # mmap refuses an empty file; the header check says what is wrong
                return np.empty(0, dtype=np.uint8)
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size != expected:  # changed since it was sized: a mapping past the end would fault
                    raise IntegrityError(f"{path} has {size} bytes, its ref says {expected}")
                mapped = mmap.mmap(
                    f.fileno(), size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE
                )
            return np.frombuffer(mapped, dtype=np.uint8)
        return np.frombuffer(bytearray(self.fs.cat_file(path)), dtype=np.uint8)

    def get(self, ref: SampleRef) -> dict[str, torch.Tensor]:
        """Verified tensors of one sample (views over one buffer: no second copy)."""
        return tensors_from_buffer(self.read_verified(ref))

    # --- housekeeping --------------------------------------------------------------------

    def exists(self, uri: str) -> bool:
        return bool(self.fs.exists(self.resolve(uri)))

    def delete(self, uri: str) -> None:
        """Idempotent: deleting a missing file is not an error."""
        try:
            self.fs.rm_file(self.resolve(uri))
        except FileNotFoundError:
            pass

    def list(self, partition: int | None = None) -> list[str]:
        """Uris of the stored features (temp files excluded), sorted."""
        return sorted(self.listing(partition))

    def listing(self, partition: int | None = None) -> dict[str, Listed]:
        """Every stored feature's uri with its size and modification time (None: not reported)."""
        which = "*" if partition is None else str(partition)
        pattern = posixpath.join(self.run_root, "features", which, "*.safetensors")
        self.fs.invalidate_cache()  # s3fs caches listings (per directory): see other writers' objects
        out = {}
        for path, info in self.fs.glob(pattern, detail=True).items():
            rel = posixpath.relpath(_strip_protocol(path), self.run_root)
            if not posixpath.basename(rel).startswith("."):
                out[rel] = (int(info.get("size") or 0), _modified(info))
        return out

    def orphans(
        self, committed: Iterable[str], *, min_age_s: float = 0.0, listing: Mapping[str, Listed] | None = None
    ) -> dict[str, int]:
        """Sizes of the feature files (of ``listing``, default all) no committed ref names, older
        than ``min_age_s`` (a file whose age the filesystem does not report counts as new)."""
        keep, now = set(committed), time.time()
        return {
            uri: size for uri, (size, modified) in sorted((self.listing() if listing is None else listing).items())
            if uri not in keep and (min_age_s <= 0 or (modified is not None and now - modified >= min_age_s))
        }  # fmt: skip

    def sweep_orphans(self, committed: Iterable[str], *, min_age_s: float = 0.0) -> list[str]:
        """Delete the feature files no committed ref names (aborted or fenced attempts).

        Without ``min_age_s``, call it only when no transaction can still commit a ref to one of
        them: after every partition has ended, or with the generators stopped. Returns the uris removed.
        """
        orphans = list(self.orphans(committed, min_age_s=min_age_s))
        for uri in orphans:
            self.delete(uri)
        return orphans

    def sweep_temp_files(self) -> int:
        """Remove temp files a crashed writer left behind; returns how many."""
        base = posixpath.join(self.run_root, "features")
        paths = self.fs.glob(f"{base}/*/.*.tmp")
        for path in paths:
            self.fs.rm_file(path)
        return len(paths)


def _modified(info: Mapping[str, Any]) -> float | None:
    """A listing entry's modification time as a Unix time (local, memory and S3 name it differently)."""
    for key in ("mtime", "created", "LastModified"):
        value = info.get(key)
        if isinstance(value, (int, float)) or hasattr(value, "timestamp"):
            return float(value if isinstance(value, (int, float)) else value.timestamp())
    return None


def _strip_protocol(path: str) -> str:
    return path.split("://", 1)[-1] if "://" in path else path


def _brief(specs: Mapping[str, TensorSpec]) -> str:
    return "{" + ", ".join(f"{k}:{v.dtype}{v.shape}" for k, v in sorted(specs.items())) + "}"


_TORCH_TO_ST = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
    "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL", "float8_e4m3fn": "F8_E4M3",
}  # fmt: skip


@dataclass(frozen=True)
class SafetensorsLayout:
    """The safetensors file of some tensors, as a header plus zero-copy views of their memory."""

    header: bytes
    views: tuple[memoryview, ...]
    specs: dict[str, TensorSpec]

    @classmethod
    def of(cls, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> SafetensorsLayout:
        entries: dict[str, Any] = {}
        if metadata:
            entries["__metadata__"] = dict(metadata)
        views: list[memoryview] = []
        specs: dict[str, TensorSpec] = {}
        offset = 0
        for name in sorted(tensors):  # a fixed order: the same sample gives the same bytes
            t = tensors[name].detach().cpu().contiguous()
            dtype = _TORCH_TO_ST.get(str(t.dtype).removeprefix("torch."))
            if dtype is None:
                raise ValueError(f"tensor {name} has unsupported dtype {t.dtype}")
            raw = memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")
            entries[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + raw.nbytes]}
            specs[name] = TensorSpec(dtype=dtype, shape=list(t.shape))
            views.append(raw)
            offset += raw.nbytes
        header = json.dumps(entries, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # the format aligns the data to 8 bytes
        return cls(struct.pack("<Q", len(header)) + header, tuple(views), specs)

    @property
    def nbytes(self) -> int:
        return len(self.header) + sum(v.nbytes for v in self.views)

    def chunks(self) -> list[bytes | memoryview]:
        return [self.header, *self.views]


_ST_TO_TORCH = {v: k for k, v in _TORCH_TO_ST.items()}


def tensors_from_buffer(buffer: np.ndarray) -> dict[str, torch.Tensor]:
    """Tensors viewing a verified safetensors buffer (which they keep alive)."""
    try:
        return _views(buffer)
    except IntegrityError:
        raise
    except (ValueError, KeyError, TypeError, RuntimeError, struct.error) as exc:
        raise IntegrityError(f"unreadable safetensors data: {exc}") from None


def _views(buffer: np.ndarray) -> dict[str, torch.Tensor]:
    (size,) = struct.unpack("<Q", buffer[:8].tobytes())
    header = json.loads(buffer[8 : 8 + size].tobytes())
    whole = torch.from_numpy(buffer)
    base = 8 + size
    out: dict[str, torch.Tensor] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        start, end = entry["data_offsets"]
        if not 0 <= start <= end <= len(buffer) - base:
            raise IntegrityError(f"tensor {name}: offsets {start}..{end} outside the file")
        dtype = getattr(torch, _ST_TO_TORCH[entry["dtype"]])
        shape = entry["shape"]
        if end - start != math.prod(shape) * torch.empty((), dtype=dtype).element_size():
            raise IntegrityError(f"tensor {name}: {end - start} bytes do not fit shape {shape}")
        if end == start:
            out[name] = torch.empty(shape, dtype=dtype)
            continue
        out[name] = whole[base + start : base + end].view(dtype).reshape(shape)
    return out
