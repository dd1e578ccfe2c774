"""The training-time-test attention of EAGLE3: step-0 causal keys plus one diagonal per later step.

A query at (TTT step k, position i) attends to the step-0 keys at positions ``j <= i`` (causal,
padding masked) and, for each later step ``m in 1..k``, to the step-m key at the *same* position
``i``. That mirrors inference, where each drafted token sees the verified prefix plus its own
chain of earlier drafts. One softmax (fp32) runs over ``[T causal scores | k diagonal scores]``.

``cached`` computes exactly that in O(T^2 + kT) per step. ``dense`` builds the equivalent flattened
``(k+1)T``-key mask (block 0 lower-triangular, blocks 1..k identity) and is the reference the
tests compare against.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

__all__ = ("AttentionImpl", "KVSteps", "repeat_kv", "ttt_attention", "cached_ttt_attention",
           "dense_ttt_attention")

AttentionImpl = Literal["cached", "dense"]


@dataclass
class KVSteps:
    """Rotated keys and values of every TTT step so far (index 0 = the causal step).

    Tensors keep their autograd history: gradients flow through the whole unroll.
    """

    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)

    def append(self, key: torch.Tensor, value: torch.Tensor) -> None:
        self.keys.append(key)
        self.values.append(value)

    def __len__(self) -> int:
        return len(self.keys)


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """GQA: ``[B, nkv, T, hd] -> [B, nkv*groups, T, hd]``; kv head j serves query heads jg..jg+g-1."""
    if groups == 1:
        return x
    batch, heads, length, dim = x.shape
    return x[:, :, None].expand(batch, heads, groups, length, dim).reshape(
        batch, heads * groups, length, dim
    )


def _causal_mask(length: int, key_padding_mask: torch.Tensor | None,
                 device: torch.device) -> torch.Tensor:
    """``[B or 1, 1, T, T]`` bool, True where query i may see step-0 key j."""
    mask = torch.ones(length, length, dtype=torch.bool, device=device).tril()[None, None]
    if key_padding_mask is not None:
        mask = mask & key_padding_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
    return mask


def _check(q: torch.Tensor, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> int:
    if not keys or len(keys) != len(values):
        raise ValueError("need the same non-zero number of key and value steps")
    heads, kv_heads = q.shape[1], keys[0].shape[1]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} kv heads")
    return heads // kv_heads


def cached_ttt_attention(
    q: torch.Tensor,
    keys: Sequence[torch.Tensor],
    values: Sequence[torch.Tensor],
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``q [B,nh,T,hd]``, ``keys[m]/values[m] [B,nkv,T,hd]`` for m = 0..k -> ``[B,nh,T,hd]``."""
    groups = _check(q, keys, values)
    length = q.shape[2]
    scale = q.shape[-1] ** -0.5
    k0, v0 = repeat_kv(keys[0], groups), repeat_kv(values[0], groups)
    scores = torch.matmul(q, k0.transpose(-1, -2)).float() * scale
    mask = _causal_mask(length, key_padding_mask, q.device)
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    if len(keys) > 1:
        diagonal = torch.stack(
            [(q * repeat_kv(k, groups)).sum(-1) for k in keys[1:]], dim=-1
        ).float() * scale
        scores = torch.cat([scores, diagonal], dim=-1)
    weights = torch.softmax(scores, dim=-1).to(v0.dtype)
    out = torch.matmul(weights[..., :length], v0)
    for m, value in enumerate(values[1:]):
        out = out + weights[..., length + m, None] * repeat_kv(value, groups)
    return out


def dense_ttt_attention(
    q: torch.Tensor,
    keys: Sequence[torch.Tensor],
    values: Sequence[torch.Tensor],
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference: ordinary masked attention over all ``(k+1)T`` keys with the flattened mask."""
    groups = _check(q, keys, values)
    length = q.shape[2]
    scale = q.shape[-1] ** -0.5
    k_all = repeat_kv(torch.cat(list(keys), dim=2), groups)
    v_all = repeat_kv(torch.cat(list(values), dim=2), groups)
    blocks = [_causal_mask(length, key_padding_mask, q.device)]
    eye = torch.eye(length, dtype=torch.bool, device=q.device)[None, None]
    blocks += [eye.expand_as(blocks[0])] * (len(keys) - 1)
    mask = torch.cat(blocks, dim=-1)
    scores = torch.matmul(q, k_all.transpose(-1, -2)).float() * scale
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1).to(v_all.dtype)
    return torch.matmul(weights, v_all)


def ttt_attention(
    q: torch.Tensor,
    keys: Sequence[torch.Tensor],
    values: Sequence[torch.Tensor],
    key_padding_mask: torch.Tensor | None = None,
    *,
    impl: AttentionImpl = "cached",
) -> torch.Tensor:
    """TTT attention by the chosen implementation (the dense one exists to check the cached one)."""
    if impl == "cached":
        return cached_ttt_attention(q, keys, values, key_padding_mask)
    if impl == "dense":
        return dense_ttt_attention(q, keys, values, key_padding_mask)
    raise ValueError(f"unknown attention implementation {impl!r} (cached or dense)")
