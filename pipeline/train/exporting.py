"""From a training checkpoint to a servable EAGLE3 draft directory (SGLang's layout).

A checkpoint holds only the draft's trainable weights; the frozen embedding and the vocabulary
mapping come from the target and the run, exactly as when training started, so the exported
draft is the one that was trained.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from pipeline.core.errors import RunMismatchError
from pipeline.train.checkpoint import MODEL_FILE
from pipeline.train.export import export_draft
from pipeline.train.runner import ModelSpec, build_draft

__all__ = ("export_checkpoint", "draft_from_checkpoint")


def draft_from_checkpoint(checkpoint: str | Path, spec: ModelSpec) -> torch.nn.Module:
    draft, _, _ = build_draft(spec, seed=0, device=torch.device("cpu"))
    weights = load_file(str(Path(checkpoint) / MODEL_FILE))
    trainable = {name for name, p in draft.named_parameters() if p.requires_grad}
    if set(weights) != trainable:
        missing, extra = sorted(trainable - set(weights)), sorted(set(weights) - trainable)
        raise RunMismatchError(
            f"checkpoint {checkpoint} does not fit this draft (missing {missing[:5]}, unexpected {extra[:5]}): "
            "export with the target model and vocabulary mapping the run was trained with"
        )
    draft.load_state_dict(weights, strict=False)
    return draft


def export_checkpoint(checkpoint: str | Path, spec: ModelSpec, out: str, *, dtype: torch.dtype | None = None) -> str:
    """Write ``config.json`` + ``model.safetensors`` for SGLang; returns the directory."""
    return export_draft(draft_from_checkpoint(checkpoint, spec), out, dtype=dtype)  # type: ignore[arg-type]
