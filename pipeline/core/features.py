"""The EAGLE3 feature payload: tensor names, aux-layer defaults and the capture contract.

One sample is four tensors without a batch dimension, stored *unshifted* (the trainer applies
the single left shift of training-time test):

- ``input_ids``           (L,)      int64
- ``loss_mask``           (L,)      uint8, 1 on assistant tokens
- ``aux_hidden_states``   (L, 3*H)  pre-norm residual stream of ``aux_layer_ids``, ascending
- ``final_hidden_states`` (L, H)    after the target's final norm (the lm_head input)

No logits are stored: the trainer re-applies the target's frozen lm_head.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from pipeline.core.errors import CaptureContractError
from pipeline.core.feature_encoding import check_encoding
from pipeline.core.messages import SampleRef, TargetInfo

if TYPE_CHECKING:
    import torch

__all__ = (
    "INPUT_IDS",
    "LOSS_MASK",
    "AUX_HIDDEN",
    "FINAL_HIDDEN",
    "FEATURE_NAMES",
    "default_aux_layer_ids",
    "check_capture",
    "check_ref",
)

INPUT_IDS = "input_ids"
LOSS_MASK = "loss_mask"
AUX_HIDDEN = "aux_hidden_states"
FINAL_HIDDEN = "final_hidden_states"
FEATURE_NAMES = (INPUT_IDS, LOSS_MASK, AUX_HIDDEN, FINAL_HIDDEN)


def default_aux_layer_ids(num_layers: int) -> list[int]:
    """EAGLE3's ``[1, N//2-1, N-4]``; refuses targets where that formula collapses."""
    ids = [1, num_layers // 2 - 1, num_layers - 4]
    if len(set(ids)) != 3 or min(ids) < 0 or ids != sorted(ids):
        raise CaptureContractError(
            f"the default aux layers {ids} are not three distinct ascending layers for a "
            f"{num_layers}-layer target: set aux_layer_ids explicitly (e.g. [0, 1, 2])"
        )
    return ids


def check_capture(
    tensors: Mapping[str, torch.Tensor], target: TargetInfo, prompt_length: int
) -> None:
    """Fail loudly when a capture breaks the contract the trainer relies on."""
    missing = [name for name in FEATURE_NAMES if name not in tensors]
    if missing:
        raise CaptureContractError(f"capture is missing tensors {missing}")
    hidden = target.hidden_size
    expected = {
        INPUT_IDS: (prompt_length,),
        LOSS_MASK: (prompt_length,),
        AUX_HIDDEN: (prompt_length, 3 * hidden),
        FINAL_HIDDEN: (prompt_length, hidden),
    }
    for name, shape in expected.items():
        got = tuple(tensors[name].shape)
        if got != shape:
            raise CaptureContractError(
                f"{name} has shape {got}, expected {shape} "
                f"(prompt length {prompt_length}, hidden size {hidden})"
            )


def check_ref(ref: SampleRef) -> None:
    """Refuse a ref whose declared tensors are not one EAGLE3 sample of its own target and length,
    before any byte is read (storage then checks that the file's header matches the ref)."""
    length, hidden = ref.num_tokens, ref.target.hidden_size
    scales = check_encoding(ref.tensors, (AUX_HIDDEN, FINAL_HIDDEN), ref.target.dtype, length)  # storage.dtype
    names = sorted(ref.tensors)
    if names != sorted((*FEATURE_NAMES, *scales)):
        raise CaptureContractError(f"the ref declares tensors {names}, a sample has {sorted((*FEATURE_NAMES, *scales))}")
    expected = {
        INPUT_IDS: [length],
        LOSS_MASK: [length],
        AUX_HIDDEN: [length, 3 * hidden],
        FINAL_HIDDEN: [length, hidden],
    }
    for name, shape in expected.items():
        if ref.tensors[name].shape != shape:
            raise CaptureContractError(
                f"{name} is declared {ref.tensors[name].shape}, a sample of {length} tokens with hidden "
                f"size {hidden} has {shape}"
            )
