"""Spec checks 1 and 5: the one left shift, and TTT as a faithful simulation of chain drafting."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from pipeline.train.collate import collate
from pipeline.train.draft import Eagle3Draft
from pipeline.train.ttt import compute_teacher, step_targets, ttt_forward
from pipeline.vocab import build_vocab_mapping

# Hand-built sample: 8 tokens; the target's argmax after token t is TEACHER[t] (15 is not in the
# draft vocab); assistant tokens from position 2 on.
TOKENS = [20, 21, 22, 23, 24, 25, 26, 27]
TEACHER = [3, 1, 4, 15, 9, 2, 6, 5]
LOSS_MASK = [0, 0, 1, 1, 1, 1, 1, 1]
HOT = [1, 2, 3, 4, 5, 6, 9, 20]

# Spec 3.1 for k = 0, 1, 2 and positions i = 0..7: input token x[i+k+1], teacher row Z[i+k+1]
# (shown as its argmax), accuracy mask loss_mask[i+k], position mask (accuracy mask and the
# teacher's argmax in the draft vocab). Zero past the end; loss_mask[7] is forced to 0.
EXPECTED = {
    0: dict(tok=[21, 22, 23, 24, 25, 26, 27, 0], teacher=[1, 4, 15, 9, 2, 6, 5, 0],
            lm=[0, 0, 1, 1, 1, 1, 1, 0], pm=[0, 0, 0, 1, 1, 1, 1, 0]),
    1: dict(tok=[22, 23, 24, 25, 26, 27, 0, 0], teacher=[4, 15, 9, 2, 6, 5, 0, 0],
            lm=[0, 1, 1, 1, 1, 1, 0, 0], pm=[0, 0, 1, 1, 1, 1, 0, 0]),
    2: dict(tok=[23, 24, 25, 26, 27, 0, 0, 0], teacher=[15, 9, 2, 6, 5, 0, 0, 0],
            lm=[1, 1, 1, 1, 1, 0, 0, 0], pm=[0, 1, 1, 1, 1, 0, 0, 0]),
}


def test_hand_built_alignment_matches_the_spec_table() -> None:
    vocab_size = hidden = 32
    lm_head = 10.0 * torch.eye(vocab_size)
    final = torch.nn.functional.one_hot(torch.tensor(TEACHER), hidden).float()
    sample = {
        "input_ids": torch.tensor(TOKENS),
        "loss_mask": torch.tensor(LOSS_MASK, dtype=torch.uint8),
        "aux_hidden_states": torch.zeros(8, 3 * hidden),
        "final_hidden_states": final,
    }
    batch = collate([sample])
    vocab = build_vocab_mapping({t: 1 for t in HOT}, vocab_size, len(HOT))
    teacher = compute_teacher(batch.final_hidden_states, lm_head, vocab.t2d, num_steps=3)
    for k, expected in EXPECTED.items():
        step = step_targets(batch, teacher, k)
        assert step.input_ids[0].tolist() == expected["tok"], k
        assert step.target_ids[0].tolist() == expected["teacher"], k
        assert step.loss_mask[0].tolist() == expected["lm"], k
        assert step.position_mask[0].int().tolist() == expected["pm"], k
        for i in range(8 - k - 1):  # teacher rows inside the sequence: restricted, renormalised
            z = lm_head @ final[i + k + 1]
            assert torch.allclose(step.log_q[0, i], torch.log_softmax(z[vocab.t2d], -1))
            mass = torch.logsumexp(z[vocab.t2d], -1) - torch.logsumexp(z, -1)
            assert torch.allclose(step.log_draft_mass[0, i], mass)
        # rows past the end are finite filler (uniform) so 0 * filler stays 0
        assert torch.allclose(step.log_q[0, 8 - k - 1:].exp().sum(-1), torch.ones(k + 1))


def _rope(x: torch.Tensor, position: int, theta: float) -> torch.Tensor:
    dim = x.shape[-1]
    angle = position / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    cos, sin = torch.cat([angle.cos(), angle.cos()]).float(), torch.cat([angle.sin(), angle.sin()]).float()
    rotated = torch.cat([-x[..., dim // 2:], x[..., : dim // 2]], dim=-1)
    return x * cos + rotated * sin


def _chain_drafting(draft: Eagle3Draft, x: torch.Tensor, aux: torch.Tensor, i: int,
                    steps: int) -> list[torch.Tensor]:
    """Inference-style reference, position by position: the verified prefix 0..i is processed
    causally (step 0), then each next draft sees the prefix plus its own chain of earlier drafts,
    at RoPE position i+m, fed the ground-truth token x[i+m+1] and the previous step's h2."""
    cfg, layer = draft.config, draft.midlayer
    attn = layer.self_attn
    nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.resolved_head_dim

    def project(token: int, hidden: torch.Tensor, position: int):
        e = draft.embed_tokens.weight[token]
        u = torch.cat([layer.input_layernorm(e), layer.hidden_norm(hidden)])
        q = _rope(attn.q_proj(u).view(nh, hd), position, cfg.rope_theta)
        k = _rope(attn.k_proj(u).view(nkv, hd), position, cfg.rope_theta)
        return q, k, attn.v_proj(u).view(nkv, hd)

    def attend(q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor]):
        ks, vs = torch.stack(keys), torch.stack(values)  # [n, nkv, hd]
        out = []
        for head in range(nh):
            kv = head // (nh // nkv)
            weights = torch.softmax(ks[:, kv] @ q[head] / math.sqrt(hd), dim=0)
            out.append(weights @ vs[:, kv])
        return torch.cat(out)

    def finish(hidden: torch.Tensor, attended: torch.Tensor):
        h1 = hidden + attn.o_proj(attended)
        h2 = h1 + layer.mlp(layer.post_attention_layernorm(h1))
        return draft.lm_head(draft.norm(h2)), h2

    prefix = [project(int(x[j + 1]), draft.fc(aux[j]), j) for j in range(i + 1)]
    keys, values = [p[1] for p in prefix], [p[2] for p in prefix]
    logits, hidden = finish(draft.fc(aux[i]), attend(prefix[i][0], keys, values))
    out = [logits]
    for m in range(1, steps):
        q, k, v = project(int(x[i + m + 1]), hidden, i + m)
        keys, values = keys + [k], values + [v]
        logits, hidden = finish(hidden, attend(q, keys, values))
        out.append(logits)
    return out


def test_ttt_equals_position_by_position_chain_drafting(make_draft: Callable[..., Eagle3Draft]) -> None:
    draft = make_draft()
    length, steps = 10, 3
    x = torch.randint(0, 512, (length,))
    aux = torch.randn(length, 192)
    with torch.no_grad():
        unrolled = ttt_forward(draft, x[None], aux[None], num_steps=steps)
        for i in range(length - steps):
            for k, expected in enumerate(_chain_drafting(draft, x, aux, i, steps)):
                assert torch.allclose(unrolled[k][0, i], expected, atol=1e-5), (k, i)
