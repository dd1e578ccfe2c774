"""Spec check 3: cached "causal + diagonals" attention equals the dense flattened-mask reference."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from pipeline.train.attention import cached_ttt_attention, dense_ttt_attention, repeat_kv
from pipeline.train.collate import collate
from pipeline.train.draft import Eagle3Draft
from pipeline.train.ttt import compute_teacher, ttt_forward, ttt_loss

B, NH, NKV, T, HD = 2, 4, 2, 9, 16


def _qkv(steps: int) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    q = torch.randn(B, NH, T, HD)
    keys = [torch.randn(B, NKV, T, HD) for _ in range(steps)]
    values = [torch.randn(B, NKV, T, HD) for _ in range(steps)]
    padding = torch.ones(B, T, dtype=torch.bool)
    padding[1, 6:] = False
    return q, keys, values, padding


@pytest.mark.parametrize("steps", [1, 2, 3, 5, 7])
def test_cached_equals_dense_for_every_step(steps: int) -> None:
    q, keys, values, padding = _qkv(steps)
    cached = cached_ttt_attention(q, keys, values, padding)
    dense = dense_ttt_attention(q, keys, values, padding)
    assert torch.allclose(cached, dense, atol=1e-5)


def test_one_step_is_plain_causal_attention() -> None:
    q, keys, values, padding = _qkv(1)
    mask = torch.ones(T, T, dtype=torch.bool).tril()[None, None] & padding[:, None, None, :]
    expected = F.scaled_dot_product_attention(
        q, repeat_kv(keys[0], NH // NKV), repeat_kv(values[0], NH // NKV), attn_mask=mask
    )
    assert torch.allclose(cached_ttt_attention(q, keys, values, padding), expected, atol=1e-5)


def test_diagonal_keys_only_reach_their_own_position() -> None:
    q, keys, values, padding = _qkv(3)
    base = cached_ttt_attention(q, keys, values, padding)
    values[2] = values[2].clone()
    values[2][:, :, 4] += 10.0
    moved = cached_ttt_attention(q, keys, values, padding)
    changed = (moved - base).abs().amax(dim=(0, 1, 3)) > 1e-6
    assert changed.tolist() == [i == 4 for i in range(T)]


def test_padding_keys_are_invisible() -> None:
    q, keys, values, padding = _qkv(2)
    base = cached_ttt_attention(q, keys, values, padding)
    keys[0] = keys[0].clone()
    keys[0][1, :, 6:] = 100.0
    values[0] = values[0].clone()
    values[0][1, :, 6:] = -100.0
    assert torch.allclose(cached_ttt_attention(q, keys, values, padding)[:, :, :6], base[:, :, :6])


def test_model_unroll_and_gradients_match_dense(
    make_draft: Callable[..., Eagle3Draft], make_sample: Callable[..., dict[str, torch.Tensor]]
) -> None:
    batch = collate([make_sample(12, seed=1), make_sample(8, seed=2)])
    steps = 4
    draft = make_draft()
    cached = ttt_forward(draft, batch.input_ids, batch.aux_hidden_states, batch.attention_mask,
                         num_steps=steps)
    dense = ttt_forward(draft, batch.input_ids, batch.aux_hidden_states, batch.attention_mask,
                        num_steps=steps, attention="dense")
    for k in range(steps):
        assert torch.allclose(cached[k], dense[k], atol=1e-5), k
    # the first step does not depend on how many steps follow: K=1 is plain causal decoding
    single = ttt_forward(draft, batch.input_ids, batch.aux_hidden_states, batch.attention_mask,
                         num_steps=1)
    assert torch.equal(single[0], cached[0])

    teacher = compute_teacher(batch.final_hidden_states, torch.randn(512, 64), draft.t2d,
                              num_steps=steps)
    grads = []
    for impl in ("cached", "dense"):
        draft.zero_grad()
        ttt_loss(draft, batch, teacher, num_steps=steps, attention=impl).loss.backward()
        grads.append([p.grad.clone() for p in draft.trainable_parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6)
