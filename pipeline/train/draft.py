"""The EAGLE3 draft model (``LlamaForCausalLMEagle3``): one decoder layer over [embedding | hidden].

Parameter names are exactly the ones SGLang's EAGLE3 loader reads (``fc``, ``midlayer.*``,
``norm``, ``lm_head``, ``d2t``, ``t2d``), so export is an identity map. The input embedding is a
frozen copy of the target's: serving substitutes the target's own, so training must use it too.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.errors import ConfigError, RunMismatchError
from pipeline.core.features import default_aux_layer_ids
from pipeline.train.attention import AttentionImpl, KVSteps, ttt_attention
from pipeline.train.target_head import TargetArchitecture, TargetHead, load_target_head
from pipeline.vocab import VocabMapping

__all__ = ("DraftConfig", "RMSNorm", "RotaryEmbedding", "Eagle3Attention", "Eagle3MLP",
           "Eagle3DecoderLayer", "Eagle3Draft", "apply_rope", "config_from_mapping")

logger = logging.getLogger(__name__)

_SUPPORTED_ROPE = ("default", "linear", "dynamic", "llama3")


@dataclass(frozen=True)
class DraftConfig:
    """Shape of the draft; ``vocab_size`` is the target's V, ``draft_vocab_size`` is Vd."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    draft_vocab_size: int
    aux_layer_ids: tuple[int, int, int]
    target_hidden_size: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = field(default=None, hash=False)
    max_position_embeddings: int = 2048
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    bos_token_id: Any = None
    eos_token_id: Any = None
    pad_token_id: Any = None

    def __post_init__(self) -> None:
        ids = tuple(int(i) for i in self.aux_layer_ids)
        if len(ids) != 3 or min(ids) < 0 or len(set(ids)) != 3 or list(ids) != sorted(ids):
            raise ConfigError(
                "aux_layer_ids", f"{list(ids)} must be 3 distinct ascending non-negative layer ids"
            )
        object.__setattr__(self, "aux_layer_ids", ids)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                "num_key_value_heads",
                f"{self.num_attention_heads} heads are not a multiple of "
                f"{self.num_key_value_heads} kv heads",
            )
        if self.hidden_act != "silu":
            raise ConfigError("hidden_act", f"{self.hidden_act!r}: the EAGLE3 draft is SwiGLU (silu)")
        kind = (self.rope_scaling or {}).get("rope_type", "default")
        if kind not in _SUPPORTED_ROPE:
            raise ConfigError(
                "rope_scaling", f"rope_type {kind!r} is not supported by the draft",
                f"use one of {', '.join(_SUPPORTED_ROPE)}",
            )
        if not 0 < self.draft_vocab_size <= self.vocab_size:
            raise ConfigError("draft_vocab_size", f"must be in 1..{self.vocab_size}")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def resolved_target_hidden_size(self) -> int:
        return self.target_hidden_size or self.hidden_size

    @classmethod
    def from_target_config(
        cls,
        target: TargetArchitecture,
        *,
        draft_vocab_size: int = 32000,
        aux_layer_ids: Sequence[int] | None = None,
        **overrides: Any,
    ) -> DraftConfig:
        """Copy the target's shape (one layer, untied, silu); aux ids default to [1, N/2-1, N-4]."""
        ids = tuple(aux_layer_ids) if aux_layer_ids is not None else tuple(
            default_aux_layer_ids(target.num_hidden_layers)
        )
        if max(ids) >= target.num_hidden_layers:
            raise ConfigError(
                "aux_layer_ids", f"{list(ids)} exceed the target's {target.num_hidden_layers} layers"
            )
        if target.hidden_act != "silu":
            logger.warning("target hidden_act is %r; the EAGLE3 draft uses silu", target.hidden_act)
        values: dict[str, Any] = dict(
            hidden_size=target.hidden_size,
            intermediate_size=target.intermediate_size,
            num_attention_heads=target.num_attention_heads,
            num_key_value_heads=target.num_key_value_heads,
            vocab_size=target.vocab_size,
            draft_vocab_size=min(draft_vocab_size, target.vocab_size),
            aux_layer_ids=ids,
            target_hidden_size=None,
            head_dim=target.head_dim,
            rms_norm_eps=target.rms_norm_eps,
            rope_theta=target.rope_theta,
            rope_scaling=target.rope_scaling,
            max_position_embeddings=target.max_position_embeddings,
            initializer_range=target.initializer_range,
            bos_token_id=target.bos_token_id,
            eos_token_id=target.eos_token_id,
            pad_token_id=target.pad_token_id,
        )
        values.update(overrides)
        # The fc input width is the target's, whatever the draft's own width is.
        values["target_hidden_size"] = (
            None if values["hidden_size"] == target.hidden_size else target.hidden_size
        )
        return cls(**values)

    def with_(self, **changes: Any) -> DraftConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["aux_layer_ids"] = list(self.aux_layer_ids)
        return out

    def check_target(self, *, aux_layer_ids: Sequence[int], hidden_size: int,
                     vocab_size: int) -> None:
        """Refuse features captured from another target shape or other layers."""
        problems = []
        if tuple(aux_layer_ids) != self.aux_layer_ids:
            problems.append(f"aux layers {list(aux_layer_ids)} != {list(self.aux_layer_ids)}")
        if hidden_size != self.resolved_target_hidden_size:
            problems.append(f"hidden size {hidden_size} != {self.resolved_target_hidden_size}")
        if vocab_size != self.vocab_size:
            problems.append(f"vocab size {vocab_size} != {self.vocab_size}")
        if problems:
            raise RunMismatchError("features do not match the draft: " + "; ".join(problems))


class RMSNorm(nn.Module):
    """``w * x / sqrt(mean(x^2) + eps)`` with the variance in fp32."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def _inv_freq(config: DraftConfig) -> torch.Tensor:
    dim = config.resolved_head_dim
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv = inv / float(scaling["factor"])
    elif kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / low, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / high) & (wavelen <= old / low)
        inv = torch.where(medium, blended, scaled)
    # "dynamic" equals the default within max_position_embeddings, which training never exceeds.
    return inv.float()


class RotaryEmbedding(nn.Module):
    """RoPE cos/sin for given positions (HF "rotate half" layout)."""

    def __init__(self, config: DraftConfig) -> None:
        super().__init__()
        self.register_buffer("inv_freq", _inv_freq(config), persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``position_ids [T] or [B,T]`` -> cos, sin ``[B or 1, 1, T, hd]``."""
        if position_ids.dim() == 1:
            position_ids = position_ids[None]
        freqs = position_ids.float()[..., None] * self.inv_freq.to(position_ids.device)
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate queries or keys by their positions (RoPE), as the target does."""
    return x * cos + _rotate_half(x) * sin


class Eagle3Attention(nn.Module):
    """GQA self-attention whose q/k/v read the 2H ``[embedding | hidden]`` concatenation."""

    def __init__(self, config: DraftConfig) -> None:
        super().__init__()
        hd, nh, nkv = config.resolved_head_dim, config.num_attention_heads, config.num_key_value_heads
        self.num_heads, self.num_kv_heads, self.head_dim = nh, nkv, hd
        width = 2 * config.hidden_size
        self.q_proj = nn.Linear(width, nh * hd, bias=False)
        self.k_proj = nn.Linear(width, nkv * hd, bias=False)
        self.v_proj = nn.Linear(width, nkv * hd, bias=False)
        self.o_proj = nn.Linear(nh * hd, config.hidden_size, bias=False)

    def forward(self, u: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVSteps,
                key_padding_mask: torch.Tensor | None, impl: AttentionImpl) -> torch.Tensor:
        batch, length, _ = u.shape

        def heads(x: torch.Tensor, n: int) -> torch.Tensor:
            return x.view(batch, length, n, self.head_dim).transpose(1, 2)

        q = apply_rope(heads(self.q_proj(u), self.num_heads), cos, sin)
        k = apply_rope(heads(self.k_proj(u), self.num_kv_heads), cos, sin)
        v = heads(self.v_proj(u), self.num_kv_heads)
        cache.append(k, v)
        out = ttt_attention(q, cache.keys, cache.values, key_padding_mask, impl=impl)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class Eagle3MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: DraftConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Eagle3DecoderLayer(nn.Module):
    """The single draft layer; the residual is the *un-normalised* hidden input."""

    def __init__(self, config: DraftConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hidden_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Eagle3Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = Eagle3MLP(config)

    def forward(self, embeds: torch.Tensor, hidden: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor, cache: KVSteps, key_padding_mask: torch.Tensor | None,
                impl: AttentionImpl) -> torch.Tensor:
        u = torch.cat([self.input_layernorm(embeds), self.hidden_norm(hidden)], dim=-1)
        h1 = hidden + self.self_attn(u, cos, sin, cache, key_padding_mask, impl)
        return h1 + self.mlp(self.post_attention_layernorm(h1))


class Eagle3Draft(nn.Module):
    """EAGLE3 draft: ``fc`` (3Ht -> H), one ``midlayer``, ``norm``, ``lm_head`` (Vd x H).

    ``forward`` is one draft step; :func:`pipeline.train.ttt.ttt_forward` unrolls it.
    """

    def __init__(self, config: DraftConfig, vocab: VocabMapping | None = None,
                 embed_weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, hidden)
        self.fc = nn.Linear(3 * config.resolved_target_hidden_size, hidden, bias=False)
        self.midlayer = Eagle3DecoderLayer(config)
        self.norm = RMSNorm(hidden, config.rms_norm_eps)
        self.lm_head = nn.Linear(hidden, config.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(config.draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.zeros(config.vocab_size, dtype=torch.bool))
        self.rotary = RotaryEmbedding(config)
        self.reset_parameters()
        # The target's embedding is frozen; only a width-changing draft (H != Ht) owns and
        # trains its embedding, because no target embedding of width H exists.
        self.embed_tokens.weight.requires_grad_(self.owns_embedding)
        if vocab is not None:
            self.set_vocab_mapping(vocab)
        if embed_weight is not None:
            self.load_target_embedding(embed_weight)

    @property
    def owns_embedding(self) -> bool:
        return self.config.resolved_target_hidden_size != self.config.hidden_size

    def reset_parameters(self) -> None:
        """HF-style init: Linear/Embedding ~ N(0, initializer_range), norms = 1."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def set_vocab_mapping(self, vocab: VocabMapping) -> None:
        if (vocab.draft_vocab_size, vocab.target_vocab_size) != (
            self.config.draft_vocab_size, self.config.vocab_size
        ):
            raise ConfigError(
                "vocab_mapping",
                f"maps {vocab.target_vocab_size} -> {vocab.draft_vocab_size} ids, the draft "
                f"expects {self.config.vocab_size} -> {self.config.draft_vocab_size}",
            )
        self.d2t.copy_(vocab.d2t)
        self.t2d.copy_(vocab.t2d)

    def vocab_mapping(self) -> VocabMapping:
        return VocabMapping(d2t=self.d2t.detach().cpu().clone(), t2d=self.t2d.detach().cpu().clone())

    def load_target_embedding(self, weight: torch.Tensor) -> None:
        if tuple(weight.shape) != tuple(self.embed_tokens.weight.shape):
            raise ConfigError(
                "target_model_path",
                f"target embedding {tuple(weight.shape)} does not fit the draft's "
                f"{tuple(self.embed_tokens.weight.shape)}",
            )
        with torch.no_grad():
            self.embed_tokens.weight.copy_(weight)

    @classmethod
    def from_target(
        cls,
        target: str | Path | TargetHead,
        vocab: VocabMapping,
        *,
        aux_layer_ids: Sequence[int] | None = None,
        **overrides: Any,
    ) -> Eagle3Draft:
        """Derive the config from the target and copy its embedding (``Vd`` from ``vocab``)."""
        head = target if isinstance(target, TargetHead) else load_target_head(target)
        config = DraftConfig.from_target_config(
            head.config, draft_vocab_size=vocab.draft_vocab_size,
            aux_layer_ids=aux_layer_ids, **overrides,
        )
        draft = cls(config, vocab=vocab)
        if not draft.owns_embedding:
            draft.load_target_embedding(head.embed_tokens)
        return draft

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def project(self, aux_hidden_states: torch.Tensor) -> torch.Tensor:
        """Step-0 hidden: ``fc`` over the concatenated three aux layers."""
        return self.fc(aux_hidden_states.to(self.fc.weight.dtype))

    def forward(
        self,
        input_ids: torch.Tensor,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        cache: KVSteps,
        key_padding_mask: torch.Tensor | None = None,
        attention: AttentionImpl = "cached",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One draft step -> (logits ``[B,T,Vd]``, pre-norm hidden ``h2`` for the next step)."""
        embeds = self.embed_tokens(input_ids).to(hidden.dtype)
        cos, sin = self.rotary(position_ids, hidden.dtype)
        h2 = self.midlayer(embeds, hidden, cos, sin, cache, key_padding_mask, attention)
        return self.lm_head(self.norm(h2)), h2

    def extra_repr(self) -> str:
        return f"aux_layer_ids={list(self.config.aux_layer_ids)}"


def config_from_mapping(values: Mapping[str, Any]) -> DraftConfig:
    """Inverse of :meth:`DraftConfig.to_dict` (ignores unknown keys)."""
    known = {f for f in DraftConfig.__dataclass_fields__}
    return DraftConfig(**{k: v for k, v in values.items() if k in known})
