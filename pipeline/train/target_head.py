"""The frozen pieces of the target that the trainer needs: config, input embedding and lm_head.

The trainer never runs the target. It needs the target's input embedding (the draft's frozen
``embed_tokens``) and its ``lm_head`` (to turn the streamed final hidden states back into teacher
logits), plus the config to derive the draft's shape. Both weights are read straight from the
safetensors files of a local Hugging Face model directory, one tensor at a time, so a 70B target
costs two ``V x H`` matrices of memory, not the model. Pickled ``*.bin`` checkpoints are refused.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from pipeline.core.errors import ConfigError

__all__ = ("TargetArchitecture", "TargetHead", "read_target_config", "load_target_head", "rope_fields")

logger = logging.getLogger(__name__)

_EMBED_KEYS = (
    "model.embed_tokens.weight",
    "model.language_model.embed_tokens.weight",
    "language_model.model.embed_tokens.weight",
    "embed_tokens.weight",
)
_LM_HEAD_KEYS = ("lm_head.weight", "language_model.lm_head.weight")
_INDEX_FILE = "model.safetensors.index.json"
_SINGLE_FILE = "model.safetensors"


@dataclass(frozen=True)
class TargetArchitecture:
    """The target fields a draft is derived from (a normalised view of ``config.json``)."""

    hidden_size: int
    vocab_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    hidden_act: str
    initializer_range: float
    tie_word_embeddings: bool | None  # None: config.json does not say
    model_type: str
    torch_dtype: str | None
    bos_token_id: Any = None
    eos_token_id: Any = None
    pad_token_id: Any = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> TargetArchitecture:
        """Read a HF config dict (transformers 4 or 5 layout; VLM ``text_config`` unwrapped)."""
        text = config.get("text_config")
        cfg: Mapping[str, Any] = (
            text if isinstance(text, Mapping) and "hidden_size" not in config else config
        )
        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            vocab = int(cfg["vocab_size"])
            layers = int(cfg["num_hidden_layers"])
            intermediate = int(cfg["intermediate_size"])
        except KeyError as exc:
            raise ConfigError(
                "target_model_path", f"config.json has no {exc.args[0]!r}",
                "point at a decoder-only Hugging Face model directory",
            ) from None
        theta, scaling = rope_fields(cfg)
        head_dim = cfg.get("head_dim") or hidden // heads
        tie = config.get("tie_word_embeddings", cfg.get("tie_word_embeddings"))
        return cls(
            hidden_size=hidden,
            vocab_size=vocab,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            intermediate_size=intermediate,
            head_dim=int(head_dim),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            hidden_act=str(cfg.get("hidden_act", "silu")),
            initializer_range=float(cfg.get("initializer_range", 0.02)),
            tie_word_embeddings=None if tie is None else bool(tie),
            model_type=str(cfg.get("model_type", config.get("model_type", "llama"))),
            torch_dtype=cfg.get("torch_dtype", cfg.get("dtype", config.get("torch_dtype"))),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
            pad_token_id=cfg.get("pad_token_id"),
            raw=dict(config),
        )


def rope_fields(cfg: Mapping[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """``rope_theta`` and a ``rope_scaling`` dict (with ``rope_type``) or None for plain RoPE.

    transformers 4 writes ``rope_theta`` + ``rope_scaling``; transformers 5 writes one
    ``rope_parameters`` dict that holds both.
    """
    params = cfg.get("rope_parameters")
    scaling = cfg.get("rope_scaling")
    theta = cfg.get("rope_theta")
    if isinstance(params, Mapping):
        theta = params.get("rope_theta", theta)
        if scaling is None:
            scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if isinstance(scaling, Mapping):
        scaling = dict(scaling)
        kind = scaling.pop("type", None)
        scaling.setdefault("rope_type", kind or "default")
        if scaling["rope_type"] == "default":
            scaling = None
    else:
        scaling = None
    return float(theta if theta is not None else 10000.0), scaling


def read_target_config(model_dir: str | Path) -> TargetArchitecture:
    """The target's ``config.json`` as the fields a draft is derived from."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(
            "target_model_path", f"{path} does not exist",
            "pass a local Hugging Face model directory (download it beforehand)",
        )
    return TargetArchitecture.from_dict(json.loads(path.read_text()))


def _weight_files(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it."""
    index = model_dir / _INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        return {name: model_dir / file for name, file in weight_map.items()}
    files = [model_dir / _SINGLE_FILE] if (model_dir / _SINGLE_FILE).is_file() else sorted(
        model_dir.glob("*.safetensors")
    )
    if not files:
        raise ConfigError(
            "target_model_path",
            f"no safetensors weights in {model_dir} (pickled *.bin checkpoints are refused)",
            "convert the checkpoint to safetensors",
        )
    names: dict[str, Path] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                names[name] = file
    return names


def _find(names: Mapping[str, Path], candidates: tuple[str, ...], suffix: str) -> str | None:
    for name in candidates:
        if name in names:
            return name
    matches = [n for n in names if n.endswith(suffix)]
    return matches[0] if len(matches) == 1 else None


def _read_tensor(names: Mapping[str, Path], name: str) -> torch.Tensor:
    with safe_open(str(names[name]), framework="pt") as handle:
        return handle.get_tensor(name)


@dataclass(frozen=True)
class TargetHead:
    """Frozen target embedding ``[V, Ht]`` and lm_head ``[V, Ht]`` with the target config."""

    config: TargetArchitecture
    embed_tokens: torch.Tensor
    lm_head: torch.Tensor

    def logits(self, final_hidden_states: torch.Tensor) -> torch.Tensor:
        """fp32 logits over the full target vocabulary (the teacher before restriction)."""
        weight = self.lm_head.to(final_hidden_states.device)
        return torch.nn.functional.linear(final_hidden_states.to(weight.dtype), weight).float()

    def to(self, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None) -> TargetHead:
        return TargetHead(
            self.config,
            self.embed_tokens.to(device=device, dtype=dtype),
            self.lm_head.to(device=device, dtype=dtype),
        )


def load_target_head(
    model_dir: str | Path, *, dtype: torch.dtype | None = None
) -> TargetHead:
    """Load only the target's config, input embedding and lm_head (tied embeddings handled)."""
    model_dir = Path(model_dir)
    config = read_target_config(model_dir)
    names = _weight_files(model_dir)
    embed_name = _find(names, _EMBED_KEYS, "embed_tokens.weight")
    if embed_name is None:
        raise ConfigError(
            "target_model_path", f"no input embedding (embed_tokens.weight) in {model_dir}"
        )
    embed = _read_tensor(names, embed_name)
    head_name = _find(names, _LM_HEAD_KEYS, "lm_head.weight")
    if head_name is not None:
        head = _read_tensor(names, head_name)
    elif config.tie_word_embeddings is not False:
        # Absent lm_head with an unspecified flag can only load in HF as a tied model.
        head = embed
    else:
        raise ConfigError(
            "target_model_path",
            f"{model_dir} has no lm_head.weight and tie_word_embeddings is false",
        )
    expected = (config.vocab_size, config.hidden_size)
    for label, tensor in (("embed_tokens", embed), ("lm_head", head)):
        if tuple(tensor.shape) != expected:
            raise ConfigError(
                "target_model_path",
                f"{label} has shape {tuple(tensor.shape)}, config says {expected}",
            )
    if dtype is not None:
        embed, head = embed.to(dtype), head.to(dtype)
    logger.info(
        "loaded target head from %s: V=%d Ht=%d tied=%s", model_dir, config.vocab_size,
        config.hidden_size, head_name is None,
    )
    return TargetHead(config=config, embed_tokens=embed, lm_head=head)
