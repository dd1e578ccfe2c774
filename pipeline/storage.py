"""The data plane: one safetensors file per sample on any fsspec filesystem (the claim check).

``put`` makes the file complete and visible *before* it returns (temp + fsync + atomic rename on
local disks; one PUT on object stores), so a ref produced afterwards never points at a partial
file. ``get`` trusts nothing: the uri must stay inside the run's storage root, and the bytes must
match the ref's size, checksum and tensor header before a single tensor is built. Paths are
deterministic (``features/<partition>/<sample_id>.safetensors``), so a retry overwrites the same
object instead of leaving orphans. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import re
import struct
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import crc32c
import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.errors import ConfinementError, IntegrityError
from pipeline.messages import SampleRef, TensorSpec

if TYPE_CHECKING:
    import torch

__all__ = ("FeatureStore", "StoredFeature", "checksum_of", "parse_header")

logger = logging.getLogger(__name__)

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_MAX_HEADER = 16 * 1024 * 1024


def checksum_of(data: bytes | memoryview) -> str:
    """CRC-32C: hardware accelerated (GB/s), enough to catch torn or swapped files."""
    return f"crc32c:{crc32c.crc32c(data):08x}"


def parse_header(data: bytes | memoryview) -> dict[str, TensorSpec]:
    """Tensor specs from a safetensors header, raising ``IntegrityError`` on any defect."""
    if len(data) < 8:
        raise IntegrityError(f"file of {len(data)} bytes is too short for a safetensors header")
    (size,) = struct.unpack("<Q", bytes(data[:8]))
    if size > min(_MAX_HEADER, len(data) - 8):
        raise IntegrityError(f"safetensors header length {size} exceeds the file")
    try:
        header = json.loads(bytes(data[8 : 8 + size]))
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
        self.fs, root = fsspec.url_to_fs(root_url, **dict(storage_options or {}))
        self._local = isinstance(self.fs, LocalFileSystem)
        self.run_root = posixpath.join(root.rstrip("/") or "/", run_id)

    # --- paths ---------------------------------------------------------------------------

    @staticmethod
    def uri_for(partition: int, sample_id: str) -> str:
        if not _SAFE_NAME.match(sample_id):
            raise ValueError(f"sample id {sample_id!r} is not a safe file name")
        return f"features/{int(partition)}/{sample_id}.safetensors"

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
        """Serialize and store one sample; returns what its ref must say."""
        from safetensors.torch import save  # noqa: PLC0415 - keep torch off the import path

        # One metadata entry: safetensors writes several in hash-map order, and the same sample
        # must serialise to the same bytes on every attempt.
        data = save(
            {name: t.contiguous() for name, t in tensors.items()},
            metadata={"specstream": f"{self.run_id}/{sample_id}"},
        )
        return self.put_bytes(self.uri_for(partition, sample_id), data)

    def put_bytes(self, uri: str, data: bytes) -> StoredFeature:
        specs = parse_header(data)
        path = self.resolve(uri)
        if self._local:
            self._write_local(path, data)
        else:
            self.fs.pipe_file(path, data)  # one PUT: atomic on object stores
        return StoredFeature(uri, len(data), checksum_of(data), specs)

    def _write_local(self, path: str, data: bytes) -> None:
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                if self.durable:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        if self.durable:
            fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(fd)  # the rename itself must survive a crash
            finally:
                os.close(fd)

    # --- read ----------------------------------------------------------------------------

    def read_verified(self, ref: SampleRef) -> bytes:
        """The file's bytes after checking size, checksum and header against the ref."""
        if ref.run_id != self.run_id:
            raise ConfinementError(f"ref of run {ref.run_id!r} read from run {self.run_id!r}")
        path = self.resolve(ref.uri)
        try:
            data = self.fs.cat_file(path)
        except FileNotFoundError:
            raise IntegrityError(f"feature file {ref.uri} is missing") from None
        if len(data) != ref.nbytes:
            raise IntegrityError(f"{ref.uri} has {len(data)} bytes, its ref says {ref.nbytes}")
        got = checksum_of(data)
        if got != ref.checksum:
            raise IntegrityError(f"{ref.uri} checksum {got} does not match the ref's {ref.checksum}")
        specs = parse_header(data)
        if specs != ref.tensors:
            raise IntegrityError(f"{ref.uri} tensors {_brief(specs)} differ from the ref's {_brief(ref.tensors)}")
        return data

    def get(self, ref: SampleRef) -> dict[str, torch.Tensor]:
        """Verified tensors of one sample."""
        from safetensors.torch import load  # noqa: PLC0415

        data = self.read_verified(ref)
        try:
            return load(data)
        except Exception as exc:  # safetensors raises its own SafetensorError
            raise IntegrityError(f"{ref.uri} does not parse as safetensors: {exc}") from None

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
        base = posixpath.join(self.run_root, "features")
        pattern = f"{base}/{partition if partition is not None else '*'}/*.safetensors"
        found = self.fs.glob(pattern)
        out = []
        for path in found:
            rel = posixpath.relpath(_strip_protocol(path), self.run_root)
            if not posixpath.basename(rel).startswith("."):
                out.append(rel)
        return sorted(out)

    def sweep_temp_files(self) -> int:
        """Remove temp files a crashed writer left behind; returns how many."""
        base = posixpath.join(self.run_root, "features")
        removed = 0
        for path in self.fs.glob(f"{base}/*/.*.tmp"):
            self.fs.rm_file(path)
            removed += 1
        return removed


def _strip_protocol(path: str) -> str:
    return path.split("://", 1)[-1] if "://" in path else path


def _brief(specs: Mapping[str, TensorSpec]) -> str:
    return "{" + ", ".join(f"{k}:{v.dtype}{v.shape}" for k, v in sorted(specs.items())) + "}"
