"""The target-backend contract: what a generator worker needs from a target model.

A backend runs the frozen target LLM over tokenized prompts and returns, per prompt, the four
EAGLE3 feature tensors of :mod:`pipeline.core.features` (no batch dimension, on the CPU, unshifted).
Backends differ only in how they run the model (Hugging Face eager on CPU/GPU, SGLang on GPU);
the checks and the assembly of the payload are shared and live here, so every backend fails in
the same words when a capture breaks the contract.
"""

from __future__ import annotations

import hashlib
import struct
import threading
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Protocol, runtime_checkable

import torch

from pipeline.core.errors import CaptureContractError, ConfigError
from pipeline.core.features import (
    AUX_HIDDEN,
    FINAL_HIDDEN,
    INPUT_IDS,
    LOSS_MASK,
    check_capture,
    default_aux_layer_ids,
)
from pipeline.core.messages import TargetInfo

__all__ = (
    "PromptTokens",
    "Capture",
    "TargetBackend",
    "BaseTarget",
    "SharedTarget",
    "resolve_aux_layer_ids",
    "normalize_prompts",
    "assemble_features",
    "weights_fingerprint",
    "dtype_name",
)

#: One prompt as the backends take it: ``(input_ids, loss_mask)``, equal lengths, mask in {0, 1}.
PromptTokens = tuple[Sequence[int], Sequence[int]]
#: One captured sample: tensor name -> tensor (see :data:`pipeline.core.features.FEATURE_NAMES`).
Capture = dict[str, torch.Tensor]


@runtime_checkable
class TargetBackend(Protocol):
    """A frozen target model that turns prompts into EAGLE3 features.

    ``capture`` returns one dict per prompt, in the order given, each holding
    ``input_ids`` (L,) int64, ``loss_mask`` (L,) uint8, ``aux_hidden_states`` (L, 3H) and
    ``final_hidden_states`` (L, H) in the backend's dtype, all on the CPU and contiguous.
    A backend raises :class:`~pipeline.core.errors.CaptureContractError` rather than return a
    capture that breaks the contract.
    """

    @property
    def info(self) -> TargetInfo: ...

    def capture(self, prompts: Sequence[PromptTokens]) -> list[Capture]: ...

    def close(self) -> None: ...


class SharedTarget:
    """A worker's target shared with the sub-runs it serves (the eval set's capture runs beside
    its own, a regeneration after it): one capture at a time, whatever the backend (SGLang's
    engine, a user's own), and ``close`` leaves it loaded: its owner closes the backend."""

    def __init__(self, backend: TargetBackend) -> None:
        self._backend = backend
        self._lock = threading.Lock()

    @property
    def info(self) -> TargetInfo:
        return self._backend.info

    def capture(self, prompts: Sequence[PromptTokens]) -> list[Capture]:
        with self._lock:
            return self._backend.capture(prompts)

    def close(self) -> None:
        """The owner closes the target, not a sharer."""


class BaseTarget:
    """Shared plumbing for concrete backends: context manager and idempotent close."""

    _closed: bool = False

    @property
    def info(self) -> TargetInfo:  # pragma: no cover - abstract
        raise NotImplementedError

    def capture(self, prompts: Sequence[PromptTokens]) -> list[Capture]:  # pragma: no cover
        raise NotImplementedError

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._release()

    def _release(self) -> None:
        """Free the model; called once by :meth:`close`."""

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} is closed")

    def __enter__(self) -> BaseTarget:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def resolve_aux_layer_ids(aux_layer_ids: Sequence[int] | None, num_layers: int) -> list[int]:
    """Validate explicit aux layer ids (or derive the EAGLE3 default) for an N-layer target.

    Ids are 0-based *output-of-layer* indices (HF ``hidden_states[i + 1]``): exactly three,
    distinct, ascending, each in ``[0, N)``.
    """
    if aux_layer_ids is None:
        return default_aux_layer_ids(num_layers)
    ids = list(aux_layer_ids)
    if len(ids) != 3 or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise CaptureContractError(
            f"aux_layer_ids must be exactly three integer layer ids, got {aux_layer_ids!r}"
        )
    out_of_range = [i for i in ids if not 0 <= i < num_layers]
    if out_of_range:
        raise CaptureContractError(
            f"aux layer ids {out_of_range} do not exist: the target has {num_layers} decoder "
            f"layers, valid ids are 0..{num_layers - 1}"
        )
    if len(set(ids)) != 3:
        raise CaptureContractError(
            f"aux layer ids {ids} are not distinct: EAGLE3 needs three different layers"
        )
    if ids != sorted(ids):
        raise CaptureContractError(
            f"aux layer ids {ids} are not ascending: the features are concatenated in "
            f"ascending layer order, pass {sorted(ids)}"
        )
    return ids


def normalize_prompts(prompts: Sequence[PromptTokens], vocab_size: int) -> list[tuple[list[int], list[int]]]:
    """Check every prompt before the model sees it; return plain lists."""
    out: list[tuple[list[int], list[int]]] = []
    for index, prompt in enumerate(prompts):
        try:
            input_ids, loss_mask = prompt
        except (TypeError, ValueError):
            raise CaptureContractError(f"prompt {index} is not an (input_ids, loss_mask) pair") from None
        ids = [int(t) for t in input_ids]
        mask = [int(m) for m in loss_mask]
        if not ids:
            raise CaptureContractError(f"prompt {index} is empty")
        if len(ids) != len(mask):
            raise CaptureContractError(f"prompt {index} has {len(ids)} tokens but a loss mask of {len(mask)}")
        if min(ids) < 0 or max(ids) >= vocab_size:
            bad = next(t for t in ids if not 0 <= t < vocab_size)
            raise CaptureContractError(
                f"prompt {index} holds token id {bad} outside the target vocabulary "
                f"[0, {vocab_size}): was it tokenized for another model?"
            )
        if any(m not in (0, 1) for m in mask):
            raise CaptureContractError(f"prompt {index} has a loss mask value outside {{0, 1}}")
        out.append((ids, mask))
    return out


def assemble_features(
    input_ids: Sequence[int],
    loss_mask: Sequence[int],
    aux: torch.Tensor | Sequence[torch.Tensor],
    final: torch.Tensor,
    *,
    hidden_size: int,
    info: TargetInfo | None = None,
) -> Capture:
    """Build one sample's payload from its captured hidden states, checking every shape.

    ``aux`` is either the three (L, H) layer outputs in ascending layer order or their (L, 3H)
    concatenation; ``final`` is (L, H) after the final norm. The result is on the CPU and
    contiguous, with its own storage (never a view into a batch tensor).
    """
    length = len(input_ids)
    if isinstance(aux, torch.Tensor):
        aux_cat = aux
    else:
        parts = list(aux)
        if len(parts) != 3:
            raise CaptureContractError(f"expected 3 aux hidden states, got {len(parts)}")
        for i, part in enumerate(parts):
            if part.dim() != 2 or part.shape[-1] != hidden_size:
                raise CaptureContractError(
                    f"aux hidden state {i} has shape {tuple(part.shape)}, expected "
                    f"({length}, {hidden_size}): the layer width is not the model's hidden size"
                )
        aux_cat = torch.cat(parts, dim=-1)
    if aux_cat.dim() != 2 or aux_cat.shape[-1] != 3 * hidden_size:
        raise CaptureContractError(
            f"aux hidden states have shape {tuple(aux_cat.shape)}, expected "
            f"({length}, {3 * hidden_size}) = (L, 3 x hidden {hidden_size})"
        )
    if final.dim() != 2 or final.shape[-1] != hidden_size:
        raise CaptureContractError(
            f"final hidden states have shape {tuple(final.shape)}, expected "
            f"({length}, {hidden_size}) = (L, hidden)"
        )
    for name, tensor in ((AUX_HIDDEN, aux_cat), (FINAL_HIDDEN, final)):
        if tensor.shape[0] != length:
            raise CaptureContractError(
                f"{name} covers {tensor.shape[0]} positions but the prompt has {length} tokens"
            )
    tensors: Capture = {
        INPUT_IDS: torch.tensor(list(input_ids), dtype=torch.int64),
        LOSS_MASK: torch.tensor(list(loss_mask), dtype=torch.uint8),
        AUX_HIDDEN: _owned_cpu(aux_cat),
        FINAL_HIDDEN: _owned_cpu(final),
    }
    if info is not None:
        check_capture(tensors, info, length)
    return tensors


def _owned_cpu(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy that owns its storage (safe to keep after the batch is freed)."""
    if tensor.device.type != "cpu":
        return tensor.detach().to("cpu").contiguous()
    return tensor.detach().clone(memory_format=torch.contiguous_format)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


_SAMPLE_CHUNKS = 8
_CHUNK_BYTES = 4096


def weights_fingerprint(model_dir: str | Path) -> str:
    """A cheap, stable fingerprint of a local checkpoint (not a hash of gigabytes).

    Hashes ``config.json`` and, for every ``*.safetensors`` shard (sorted by name): its name,
    size, JSON header, and a few 4 KiB samples spread over the data region. The header alone
    pins names, dtypes and shapes, which two fine-tunes of one architecture share; the data
    samples tell those apart at the cost of ``8 x 4 KiB`` of reads per shard.
    """
    root = Path(model_dir)
    digest = hashlib.sha256()
    config = root / "config.json"
    if config.is_file():
        digest.update(b"config.json\0")
        digest.update(config.read_bytes())
    shards = sorted(root.glob("*.safetensors"))
    if not shards:
        raise ConfigError(
            "target.model",
            f"no *.safetensors weights in {root}",
            "convert the checkpoint to safetensors (pickled .bin weights are never loaded)",
        )
    for shard in shards:
        size = shard.stat().st_size
        digest.update(f"{shard.name}\0{size}\0".encode())
        with shard.open("rb") as fh:
            (header_len,) = struct.unpack("<Q", fh.read(8))
            digest.update(fh.read(header_len))
            data_start = 8 + header_len
            span = max(size - data_start - _CHUNK_BYTES, 0)
            for k in range(_SAMPLE_CHUNKS):
                fh.seek(data_start + span * k // max(_SAMPLE_CHUNKS - 1, 1))
                digest.update(fh.read(_CHUNK_BYTES))
    return f"sha256:{digest.hexdigest()[:32]}"

