"""Export the draft as an SGLang-loadable EAGLE3 directory, and load such a directory back.

:func:`export_checkpoint` goes from a training checkpoint to such a directory: a checkpoint holds
only the draft's trainable weights, so the frozen embedding and the vocabulary mapping come from
the target and the run exactly as when training started, and the exported draft is the one that
was trained.

The directory is a HF ``config.json`` (``LlamaForCausalLMEagle3``) plus ``model.safetensors``
holding ``fc``, ``midlayer.*``, ``norm``, ``lm_head``, ``d2t`` and ``t2d`` under the trainer's own
names (the key map is the identity). ``embed_tokens`` is left out because SGLang substitutes the
target's embedding, except when the draft's width differs from the target's (then SGLang keeps
the draft's own, so it must ship). The weights are written before ``config.json``, so a directory
with a config is complete.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import fsspec
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from pipeline.core.errors import ConfigError, PayloadError, RunMismatchError
from pipeline.core.features import default_aux_layer_ids
from pipeline.train.checkpoint import MODEL_FILE
from pipeline.train.ckpt_objects import read_checkpoint_file
from pipeline.train.draft import DraftConfig, Eagle3Draft
from pipeline.train.model import ModelSpec, build_draft
from pipeline.train.target_head import TargetHead, load_target_head, read_target_config, rope_fields

__all__ = (
    "ARCHITECTURE",
    "export_config",
    "export_draft",
    "load_exported",
    "draft_from_checkpoint",
    "export_checkpoint",
)

logger = logging.getLogger(__name__)

ARCHITECTURE = "LlamaForCausalLMEagle3"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
_EMBED = "embed_tokens.weight"
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _join(directory: str | Path, name: str) -> str:
    return f"{str(directory).rstrip('/')}/{name}"


def export_config(config: DraftConfig, dtype: torch.dtype) -> dict[str, Any]:
    """The ``config.json`` SGLang (and HF ``LlamaConfig``) reads for an EAGLE3 draft."""
    rope_parameters: dict[str, Any] = {"rope_type": "default", **(config.rope_scaling or {}),
                                       "rope_theta": config.rope_theta}
    out: dict[str, Any] = {
        "architectures": [ARCHITECTURE],
        "model_type": "llama",
        "num_hidden_layers": 1,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.resolved_head_dim,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": config.rope_scaling,
        "rope_parameters": rope_parameters,
        "max_position_embeddings": config.max_position_embeddings,
        "hidden_act": config.hidden_act,
        "initializer_range": config.initializer_range,
        "attention_bias": False,
        "mlp_bias": False,
        "vocab_size": config.vocab_size,
        "draft_vocab_size": config.draft_vocab_size,
        "tie_word_embeddings": False,
        "torch_dtype": _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch.")),
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "eagle_config": {
            "eagle_aux_hidden_state_layer_ids": list(config.aux_layer_ids),
            "use_aux_hidden_state": True,
        },
    }
    if config.target_hidden_size is not None and config.target_hidden_size != config.hidden_size:
        out["target_hidden_size"] = config.target_hidden_size
    return out


def export_draft(draft: Eagle3Draft, directory: str | Path, *, dtype: torch.dtype | None = None,
                 storage_options: Mapping[str, Any] | None = None) -> str:
    """Write ``model.safetensors`` then ``config.json`` under ``directory`` (path or fsspec URL).

    ``dtype`` converts the floating-point weights (default: the draft's own); ``d2t`` stays
    int64 and ``t2d`` bool. Returns the directory as a string.
    """
    if not bool(draft.t2d.any()):
        raise ConfigError("vocab_mapping", "the draft has no vocab mapping (t2d is all false)")
    dtype = dtype or draft.fc.weight.dtype
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in draft.state_dict().items():
        if name == _EMBED and not draft.owns_embedding:
            continue
        tensor = tensor.detach().cpu()
        if tensor.is_floating_point():
            tensor = tensor.to(dtype)
        tensors[name] = tensor.contiguous()
    fs, root = fsspec.core.url_to_fs(str(directory), **dict(storage_options or {}))
    fs.makedirs(root, exist_ok=True)
    fs.pipe_file(_join(root, WEIGHTS_FILE), st_save(tensors, metadata={"format": "pt"}))
    config = export_config(draft.config, dtype)
    fs.pipe_file(_join(root, CONFIG_FILE), (json.dumps(config, indent=2) + "\n").encode())
    logger.info("exported EAGLE3 draft (%d tensors, %s) to %s", len(tensors), config["torch_dtype"],
                directory)
    return str(directory)


def _draft_config(config: dict[str, Any], target_dir: str | Path | None) -> DraftConfig:
    if config.get("architectures") != [ARCHITECTURE] or int(config.get("num_hidden_layers", 1)) != 1:
        raise ConfigError(
            "draft", f"not a one-layer {ARCHITECTURE} config: {config.get('architectures')}"
        )
    aux = (config.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    if aux is None:
        if target_dir is None:
            raise ConfigError("draft", "no eagle_aux_hidden_state_layer_ids and no target to derive them")
        aux = default_aux_layer_ids(read_target_config(target_dir).num_hidden_layers)
    theta, scaling = rope_fields(config)
    heads = int(config["num_attention_heads"])
    return DraftConfig(
        hidden_size=int(config["hidden_size"]),
        intermediate_size=int(config["intermediate_size"]),
        num_attention_heads=heads,
        num_key_value_heads=int(config.get("num_key_value_heads") or heads),
        vocab_size=int(config["vocab_size"]),
        draft_vocab_size=int(config.get("draft_vocab_size") or config["vocab_size"]),
        aux_layer_ids=tuple(aux),
        target_hidden_size=config.get("target_hidden_size"),
        head_dim=config.get("head_dim"),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
        hidden_act=str(config.get("hidden_act", "silu")),
        initializer_range=float(config.get("initializer_range", 0.02)),
        bos_token_id=config.get("bos_token_id"),
        eos_token_id=config.get("eos_token_id"),
        pad_token_id=config.get("pad_token_id"),
    )


def load_exported(directory: str | Path, target: str | Path | TargetHead | None = None
                  ) -> Eagle3Draft:
    """Rebuild an :class:`Eagle3Draft` from an exported directory (path or fsspec URL).

    The embedding comes from ``target`` (a model directory or a loaded :class:`TargetHead`)
    unless the directory ships its own. The model takes the dtype of the stored weights.
    """
    with fsspec.open(_join(directory, CONFIG_FILE), "r") as handle:
        raw = json.load(handle)
    target_dir = None if target is None or isinstance(target, TargetHead) else target
    config = _draft_config(raw, target_dir)
    with fsspec.open(_join(directory, WEIGHTS_FILE), "rb") as handle:
        tensors = st_load(handle.read())
    draft = Eagle3Draft(config)
    expected = set(draft.state_dict())
    if _EMBED not in tensors:
        expected.discard(_EMBED)
    if set(tensors) != expected:
        raise PayloadError(
            f"exported weights do not match the draft: missing {sorted(expected - set(tensors))}, "
            f"unexpected {sorted(set(tensors) - expected)}"
        )
    float_dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if len(float_dtypes) == 1:
        draft.to(float_dtypes.pop())
    draft.load_state_dict(tensors, strict=False)
    if _EMBED not in tensors:
        if target is None:
            raise ConfigError("target_model_path", "the export has no embed_tokens: pass the target")
        head = target if isinstance(target, TargetHead) else load_target_head(target)
        draft.load_target_embedding(head.embed_tokens.to(draft.embed_tokens.weight.dtype))
    draft.vocab_mapping()  # validates d2t/t2d consistency
    return draft


def draft_from_checkpoint(
    checkpoint: str | Path, spec: ModelSpec, storage_options: Mapping[str, Any] | None = None
) -> Eagle3Draft:
    """The trained draft: rebuilt from the target and vocab map, with the checkpoint's weights
    (a checkpoint directory, or a checkpoint's URL on an object store)."""
    draft, _, _ = build_draft(spec, seed=0, device=torch.device("cpu"))
    weights = st_load(read_checkpoint_file(checkpoint, MODEL_FILE, storage_options))
    trainable = {name for name, p in draft.named_parameters() if p.requires_grad}
    if set(weights) != trainable:
        missing, extra = sorted(trainable - set(weights)), sorted(set(weights) - trainable)
        raise RunMismatchError(
            f"checkpoint {checkpoint} does not fit this draft (missing {missing[:5]}, unexpected {extra[:5]}): "
            "export with the target model and vocabulary mapping the run was trained with"
        )
    draft.load_state_dict(weights, strict=False)
    return draft


def export_checkpoint(
    checkpoint: str | Path, spec: ModelSpec, out: str, *, dtype: torch.dtype | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> str:
    """Write ``config.json`` + ``model.safetensors`` for SGLang; returns the directory.

    ``storage_options``: fsspec options of the checkpoint's and ``out``'s URLs (train.output_dir's)."""
    draft = draft_from_checkpoint(checkpoint, spec, storage_options)
    return export_draft(draft, out, dtype=dtype, storage_options=storage_options)
