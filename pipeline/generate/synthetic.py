"""A stand-in target that needs no model: deterministic random features in the EAGLE3 layout.

For the data-plane demo, the benchmarks and the fault tests, where what matters is the bytes
moving exactly once, not what they mean. Features are a pure function of the prompt's tokens, so
a regenerated sample (after a crash) is bit-identical to the first attempt.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from pipeline.core.features import AUX_HIDDEN, FINAL_HIDDEN, INPUT_IDS, LOSS_MASK
from pipeline.core.messages import TargetInfo
from pipeline.generate.backend import Capture, PromptTokens

__all__ = ("SyntheticTarget",)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class SyntheticTarget:
    """Implements the target-backend interface with seeded random hidden states."""

    def __init__(
        self,
        *,
        hidden_size: int = 64,
        vocab_size: int = 512,
        num_layers: int = 4,
        dtype: str = "float32",
        seed: int = 0,
    ) -> None:
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        self.seed = seed
        self._dtype = _DTYPES[dtype]
        self.info = TargetInfo(
            model_id="synthetic",
            revision=f"seed-{seed}",
            num_layers=num_layers,
            aux_layer_ids=[0, 1, 2] if num_layers < 8 else [1, num_layers // 2 - 1, num_layers - 4],
            hidden_size=hidden_size,
            vocab_size=vocab_size,
            dtype=dtype,
        )

    def capture(self, prompts: Sequence[PromptTokens]) -> list[Capture]:
        """Deterministic features per prompt: the same prompt always gets the same tensors."""
        return [self._one(ids, mask) for ids, mask in prompts]

    def _one(self, input_ids: Sequence[int], loss_mask: Sequence[int]) -> Capture:
        digest = hashlib.blake2b(repr((self.seed, input_ids)).encode(), digest_size=8).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
        length, hidden = len(input_ids), self.info.hidden_size
        return {
            INPUT_IDS: torch.tensor(input_ids, dtype=torch.int64),
            LOSS_MASK: torch.tensor(loss_mask, dtype=torch.uint8),
            AUX_HIDDEN: torch.randn(length, 3 * hidden, generator=gen).to(self._dtype),
            FINAL_HIDDEN: torch.randn(length, hidden, generator=gen).to(self._dtype),
        }

    def close(self) -> None:
        """Nothing to free (the protocol's close)."""
