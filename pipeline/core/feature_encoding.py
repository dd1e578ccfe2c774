"""How a sample's hidden states are stored (``storage.dtype``): the rules a ref must follow.

Hidden states dominate a sample's bytes (4 x hidden per token against 9 for ids and mask), so a
run may store them smaller than captured: ``bf16`` halves float32 captures, ``fp8_e4m3`` stores
one byte per value plus a float32 scale per row (per token) of each hidden tensor, as its own
tensor ``<name>.scale`` in the same safetensors file, so the checksum covers it. The stored dtype
is the tensor's own dtype in the ref (``TensorSpec.dtype``); the dtype to decode back to is the
capture's (``TargetInfo.dtype``). A ref without scales and with the captured dtype is what every
run stored before this setting existed, so old refs decode unchanged.

This module is pure (no torch): the encoder and decoder are in :mod:`pipeline.feature_codec`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

from pipeline.core.errors import CaptureContractError
from pipeline.core.messages import TensorSpec

__all__ = (
    "FeatureDtype",
    "FEATURE_DTYPE_HELP",
    "STORED_DTYPE",
    "CAPTURED_DTYPE",
    "SCALE_DTYPE",
    "scale_name",
    "check_encoding",
    "bytes_per_token",
)

FeatureDtype = Literal["as_captured", "bf16", "fp8_e4m3"]

FEATURE_DTYPE_HELP = (
    "how hidden states are stored: `as_captured`; `bf16` (half of float32); `fp8_e4m3` (a quarter, with a "
    "float32 scale per token, dequantized on read); the ref records it, readers decode any of them"
)

#: The safetensors dtype a setting stores the hidden states in (``as_captured``: the capture's own).
STORED_DTYPE: dict[str, str] = {"bf16": "BF16", "fp8_e4m3": "F8_E4M3"}
#: The safetensors dtype of each capture dtype a target reports (``TargetInfo.dtype``).
CAPTURED_DTYPE: dict[str, str] = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
SCALE_DTYPE = "F32"
_SCALED = "F8_E4M3"
_ELEMENT_BYTES = {"F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1}


def scale_name(name: str) -> str:
    """The scale tensor of a hidden-state tensor stored as fp8."""
    return f"{name}.scale"


def check_encoding(
    tensors: Mapping[str, TensorSpec], hidden: Sequence[str], captured: str, length: int
) -> list[str]:
    """Check how each hidden tensor is stored; returns the scale tensors the ref declares.

    A hidden tensor is stored in the capture's dtype, in BF16, or in F8_E4M3 with a ``[length]``
    float32 scale; nothing else. Raises ``CaptureContractError`` naming the tensor.
    """
    want = CAPTURED_DTYPE.get(captured)
    scales = []
    for name in hidden:
        spec = tensors.get(name)
        if spec is None:
            continue  # the names check reports it
        allowed = {"BF16", _SCALED} | ({want} if want else set())
        if want is not None and spec.dtype not in allowed:
            raise CaptureContractError(
                f"{name} is stored as {spec.dtype}: a capture in {captured} is stored as {want}, BF16 or F8_E4M3"
            )
        scale = tensors.get(scale_name(name))
        if spec.dtype == _SCALED:
            if scale is None or scale.dtype != SCALE_DTYPE or scale.shape != [length]:
                got = f"{scale.dtype}{scale.shape}" if scale is not None else "none"
                raise CaptureContractError(
                    f"{name} is stored as F8_E4M3 and needs {scale_name(name)} {SCALE_DTYPE}[{length}], the ref has {got}"
                )
            scales.append(scale_name(name))
        elif scale is not None:
            raise CaptureContractError(
                f"{scale_name(name)} is declared, but {name} is stored as {spec.dtype}, unscaled"
            )
    return scales


def bytes_per_token(hidden_size: int, captured_bytes: int, dtype: FeatureDtype) -> int:
    """Stored bytes per token: aux (3H) and final (H) hidden states, int64 id, uint8 mask, scales."""
    element = captured_bytes if dtype == "as_captured" else _ELEMENT_BYTES[STORED_DTYPE[dtype]]
    scales = 2 * 4 if dtype == "fp8_e4m3" else 0
    return 4 * hidden_size * element + 9 + scales
