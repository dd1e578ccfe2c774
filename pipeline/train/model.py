"""The draft a run trains, built the same way for training, resuming and export.

The draft is seeded, takes the target's frozen embedding and is sized by the run's vocabulary
mapping; the target's ``lm_head`` comes along for the teacher logits. Export rebuilds exactly this
draft and then loads the checkpoint's trainable weights into it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from pipeline.train.draft import Eagle3Draft
from pipeline.train.target_head import load_target_head
from pipeline.vocab import VocabMapping

__all__ = ("ModelSpec", "build_draft")


@dataclass(frozen=True)
class ModelSpec:
    """Where the draft comes from: the target's directory (embedding, lm_head) and the vocab map."""

    target_model_path: str
    vocab_mapping: str
    aux_layer_ids: tuple[int, int, int] | None = None
    head_dtype: str | None = None  # e.g. "bfloat16" to keep the target lm_head small on GPU
    vocab_options: Mapping[str, Any] = field(default_factory=dict)  # fsspec options (storage.options) of the mapping's URL


def build_draft(
    spec: ModelSpec, *, seed: int, device: torch.device
) -> tuple[Eagle3Draft, torch.Tensor, VocabMapping]:
    """Seeded draft with the target's frozen embedding; returns (draft, target lm_head, vocab map)."""
    dtype = getattr(torch, spec.head_dtype) if spec.head_dtype else None
    head = load_target_head(spec.target_model_path, dtype=dtype)
    vocab = VocabMapping.load(spec.vocab_mapping, spec.vocab_options)
    torch.manual_seed(seed)
    draft = Eagle3Draft.from_target(head, vocab, aux_layer_ids=spec.aux_layer_ids)
    return draft.to(device), head.lm_head, vocab
