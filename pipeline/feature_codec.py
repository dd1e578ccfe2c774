"""Compact hidden states (``storage.dtype``): encoded by the generator's writer, decoded on read.

``fp8_e4m3`` scales each row (one token of one hidden tensor) by its own ``amax / 448`` before the
cast, so every row uses the format's whole range and its relative error stays under 2^-4 whatever
the other rows hold. One scale per tensor is as good on the tiny target's captures (worst row 3.8 %
against 3.4 %), but one loud activation (real LLMs put thousands of times the typical magnitude on
their first token) pushes every quiet row towards fp8's subnormals: with one at 10,000x the RMS the
worst row reaches 7.2 % per tensor, still 3.4 % per row (``benchmarks/bench_feature_dtype.py``).
The scales cost 4 bytes per row: 8 bytes per token, 0.05 % of an 8B sample stored as fp8. Decoding returns the capture's dtype (``TargetInfo.dtype``), so the
trainer sees what it always saw; the rules a ref must follow are in
:mod:`pipeline.core.feature_encoding`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from pipeline.core.errors import CaptureContractError, IntegrityError
from pipeline.core.feature_encoding import CAPTURED_DTYPE, STORED_DTYPE, FeatureDtype, scale_name
from pipeline.core.features import AUX_HIDDEN, FINAL_HIDDEN
from pipeline.core.messages import SampleRef

__all__ = ("encode_features", "decode_features", "check_scales", "FP8_MAX", "HIDDEN_NAMES")

HIDDEN_NAMES = (AUX_HIDDEN, FINAL_HIDDEN)
FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448


def encode_features(tensors: Mapping[str, torch.Tensor], dtype: FeatureDtype) -> dict[str, torch.Tensor]:
    """The tensors to store for one captured sample (``as_captured``: the same tensors)."""
    out = dict(tensors)
    if dtype == "as_captured":
        return out
    if dtype not in STORED_DTYPE:
        raise ValueError(f"storage dtype {dtype!r} is not one of as_captured, {', '.join(STORED_DTYPE)}")
    for name in HIDDEN_NAMES:
        if dtype == "bf16":
            out[name] = tensors[name].to(torch.bfloat16)
        else:
            out[name], out[scale_name(name)] = _fp8_rows(name, tensors[name])
    return out


def _fp8_rows(name: str, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows = hidden.float()
    amax = rows.abs().amax(dim=1)
    if not bool(torch.isfinite(amax).all()):
        raise CaptureContractError(f"{name} holds non-finite values, which fp8_e4m3 storage cannot represent")
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    quantized = (rows / scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
    return quantized, scale.contiguous()


def check_scales(ref: SampleRef, tensors: Mapping[str, torch.Tensor]) -> None:
    """Refuse scales no writer stores (non-finite, zero or negative): ``IntegrityError``."""
    for name in HIDDEN_NAMES:
        scale = tensors.get(scale_name(name))
        if scale is not None and not bool((torch.isfinite(scale) & (scale > 0)).all()):
            raise IntegrityError(f"{ref.uri}: {scale_name(name)} holds a non-finite or non-positive scale")


def decode_features(ref: SampleRef, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The sample as captured: hidden states back in ``ref.target.dtype``, scales dropped.

    Stored as captured (every ref before ``storage.dtype`` existed): the same tensors, no copy.
    """
    captured = _captured(ref)
    out = {name: t for name, t in tensors.items() if not name.endswith(".scale")}
    if all(tensors[name].dtype == captured for name in HIDDEN_NAMES if name in tensors):
        return out
    check_scales(ref, tensors)
    for name in HIDDEN_NAMES:
        stored = tensors[name]
        if stored.dtype == FP8:
            out[name] = (stored.float() * tensors[scale_name(name)][:, None]).to(captured)
        elif stored.dtype != captured:
            out[name] = stored.to(captured)
    return out


def _captured(ref: SampleRef) -> torch.dtype:
    """The capture's dtype; a target reporting another name decodes compact states to float32."""
    name = ref.target.dtype
    return getattr(torch, name) if name in CAPTURED_DTYPE else torch.float32
