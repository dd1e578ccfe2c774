"""Spec check 4: no step sees the future, and the aux features are wired in and trained."""

from __future__ import annotations

from collections.abc import Callable

import torch

from pipeline.train.collate import collate
from pipeline.train.draft import Eagle3Draft
from pipeline.train.ttt import compute_teacher, ttt_forward, ttt_loss

L, K = 14, 3


def _logits(draft: Eagle3Draft, ids: torch.Tensor, aux: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return ttt_forward(draft, ids[None], aux[None], num_steps=K)


def test_logits_ignore_future_tokens_and_features(make_draft: Callable[..., Eagle3Draft]) -> None:
    draft = make_draft()
    ids, aux = torch.randint(0, 512, (L,)), torch.randn(L, 192)
    base = _logits(draft, ids, aux)
    for cut in (3, 7, 11):
        later_ids = ids.clone()
        later_ids[cut:] = torch.randint(0, 512, (L - cut,))
        later_aux = aux.clone()
        later_aux[cut:] = torch.randn(L - cut, 192)
        by_ids, by_aux = _logits(draft, later_ids, aux), _logits(draft, ids, later_aux)
        for k in range(K):
            # (k, i) reads tokens up to x[i+k+1]: unchanged when i + k + 2 <= cut
            seen = cut - k - 1
            assert torch.equal(by_ids[k][0, :seen], base[k][0, :seen]), (cut, k)
            assert not torch.allclose(by_ids[k][0, seen:L - k - 1], base[k][0, seen:L - k - 1])
            # (k, i) reads aux up to aux[i]: unchanged for i < cut
            assert torch.equal(by_aux[k][0, :cut], base[k][0, :cut]), (cut, k)


def test_changing_aux_i_changes_position_i(make_draft: Callable[..., Eagle3Draft]) -> None:
    draft = make_draft()
    ids, aux = torch.randint(0, 512, (L,)), torch.randn(L, 192)
    base = _logits(draft, ids, aux)
    for i in (0, 5, 9):
        moved_aux = aux.clone()
        moved_aux[i] += torch.randn(192)
        moved = _logits(draft, ids, moved_aux)
        for k in range(K):
            assert torch.equal(moved[k][0, :i], base[k][0, :i])
            assert (moved[k][0, i] - base[k][0, i]).abs().max() > 1e-4, (i, k)


def test_gradients_reach_fc_through_the_unroll_only_into_trainable_weights(
    make_draft: Callable[..., Eagle3Draft], make_sample: Callable[..., dict[str, torch.Tensor]]
) -> None:
    draft = make_draft()
    batch = collate([make_sample(L, seed=3)])
    final = batch.final_hidden_states.clone().requires_grad_(True)
    teacher = compute_teacher(final, torch.randn(512, 64), draft.t2d, num_steps=K)
    result = ttt_loss(draft, batch, teacher, num_steps=K)
    # a later step alone still trains fc: gradients flow through h and the cached keys
    result.step_losses[K - 1].backward(retain_graph=True)
    assert draft.fc.weight.grad is not None and draft.fc.weight.grad.abs().sum() > 0
    draft.zero_grad()
    result.loss.backward()
    assert draft.fc.weight.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in draft.trainable_parameters())
    assert draft.embed_tokens.weight.grad is None, "the target embedding is frozen"
    assert final.grad is None, "the teacher is detached"
