"""Spec checks 6 and 8 and the metric definitions of 3.4-3.5: loss scale, sums, overfitting."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from pipeline.train.collate import Batch, collate
from pipeline.train.draft import Eagle3Draft
from pipeline.train.ttt import (
    StepTargets,
    TTTStats,
    compute_teacher,
    score_step,
    simulated_acceptance_length,
    step_targets,
    ttt_loss,
)
from pipeline.vocab import VocabMapping, build_vocab_mapping

Sample = dict[str, torch.Tensor]
K = 3


def _in_vocab_lm_head(vocab: VocabMapping, scale: float = 1.0, seed: int = 5) -> torch.Tensor:
    """A target lm_head whose argmax always lies in the draft vocab (other rows are zero)."""
    head = torch.randn(vocab.target_vocab_size, 64, generator=torch.Generator().manual_seed(seed))
    head[~vocab.t2d] = 0.0
    return head * scale


def test_initial_loss_is_supervised_fraction_times_log_vd(
    make_draft: Callable[..., Eagle3Draft], make_sample: Callable[..., Sample],
    vocab: VocabMapping,
) -> None:
    batch = collate([make_sample(48, seed=s, supervised_from=8) for s in range(4)])
    teacher = compute_teacher(batch.final_hidden_states, _in_vocab_lm_head(vocab),
                              vocab.t2d, num_steps=K)
    with torch.no_grad():
        result = ttt_loss(make_draft(), batch, teacher, num_steps=K)
    ploss = result.stats.ploss()
    supervised = result.stats.column("supervised")
    for k in range(K):
        # every supervised position has its teacher argmax in the draft vocab: pm = shifted lm
        assert supervised[k] == step_targets(batch, teacher, k).loss_mask.sum()
        expected = supervised[k] / (4 * 48) * math.log(128)
        assert abs(ploss[k] - expected) / expected < 0.05, (k, ploss[k], expected)
        assert ploss[k] == pytest.approx(result.step_losses[k].item(), rel=1e-6)
    total = ploss[0] * sum(0.8**k for k in range(K))
    assert abs(result.loss.item() - total) / total < 0.05
    assert result.loss.item() == pytest.approx(result.stats.weighted_loss(0.8), rel=1e-6)


def test_denominator_counts_every_position_including_padding(
    make_draft: Callable[..., Eagle3Draft], make_sample: Callable[..., Sample],
    vocab: VocabMapping,
) -> None:
    short, long = make_sample(10, seed=1), make_sample(30, seed=2)
    head = _in_vocab_lm_head(vocab)
    draft = make_draft()

    def run(batch: Batch) -> TTTStats:
        teacher = compute_teacher(batch.final_hidden_states, head, vocab.t2d, num_steps=K)
        with torch.no_grad():
            return ttt_loss(draft, batch, teacher, num_steps=K).stats

    alone, padded = run(collate([short])), run(collate([short, long]))
    assert alone.column("positions") == [10.0] * K and padded.column("positions") == [60.0] * K
    both = run(collate([long])) + alone
    # the short row's loss sum is the same alone and padded: padding adds positions, no loss
    assert both.column("loss_sum") == pytest.approx(padded.column("loss_sum"), rel=1e-5)
    assert both.column("correct") == padded.column("correct")
    assert both.column("supervised") == padded.column("supervised")


def test_stats_are_sums_that_add_across_micro_batches(
    make_draft: Callable[..., Eagle3Draft], make_sample: Callable[..., Sample],
    vocab: VocabMapping,
) -> None:
    samples = [make_sample(16, seed=s, supervised_from=2) for s in range(4)]
    head = _in_vocab_lm_head(vocab, scale=0.3)
    draft = make_draft()

    def stats(batch: Batch) -> TTTStats:
        teacher = compute_teacher(batch.final_hidden_states, head, vocab.t2d, num_steps=K)
        with torch.no_grad():
            return ttt_loss(draft, batch, teacher, num_steps=K).stats

    whole = stats(collate(samples))
    parts = stats(collate(samples[:1])) + stats(collate(samples[1:3])) + stats(collate(samples[3:]))
    assert torch.allclose(whole.sums, parts.sums, rtol=1e-5)
    assert whole.ploss() == pytest.approx(parts.ploss(), rel=1e-5)
    assert whole.all_reduced() is whole  # no process group: nothing to reduce


def test_score_step_metric_definitions() -> None:
    """acc compares target ids (d + d2t[d]) over the shifted loss mask; acceptance uses the
    unrenormalised teacher mass; the loss is gated by the position mask."""
    vocab = build_vocab_mapping({2: 1, 5: 1, 7: 1, 9: 1}, 10, 4)
    assert vocab.d2t.tolist() == [2, 4, 5, 6]
    log_q = torch.log_softmax(torch.tensor([[[3.0, 1.0, 0.0, -1.0]] * 4]), dim=-1)
    targets = StepTargets(
        input_ids=torch.zeros(1, 4, dtype=torch.long),
        loss_mask=torch.tensor([[1, 1, 1, 0]]),
        position_mask=torch.tensor([[True, False, True, False]]),  # target 6 is not drafted
        target_ids=torch.tensor([[2, 6, 7, 9]]),
        log_q=log_q,
        log_draft_mass=torch.full((1, 4), math.log(0.5)),
    )
    logits = log_q.clone()
    logits[0, :, :] = torch.eye(4)[[0, 1, 2, 3]] * 5.0 + log_q[0]  # argmax d = 0, 1, 2, 3
    loss_sum, row = score_step(logits, targets, vocab.d2t)
    correct, acc_tokens = row[2].item(), row[3].item()
    assert (correct, acc_tokens) == (2.0, 3.0)  # hits at 0 and 2; 1 is a miss; 3 is unmasked
    log_p = torch.log_softmax(logits, -1)
    expected = -(log_q.exp() * log_p).sum(-1)[0, [0, 2]].sum()
    assert loss_sum.item() == pytest.approx(expected.item(), rel=1e-6)
    # a draft equal to the renormalised teacher: CE = H(q), acceptance = teacher draft mass
    loss_sum, row = score_step(log_q.clone(), targets, vocab.d2t)
    entropy = -(log_q.exp() * log_q).sum(-1)[0, 0].item()
    assert loss_sum.item() == pytest.approx(2 * entropy, rel=1e-5)
    assert row[4].item() == pytest.approx(2 * 0.5, rel=1e-5) and row[5].item() == 2.0


def test_simulated_acceptance_length() -> None:
    assert simulated_acceptance_length([1.0, 1.0, 1.0]) == 3.0
    assert simulated_acceptance_length([0.5, 0.5]) == pytest.approx(0.75)
    assert simulated_acceptance_length([0.0, 1.0]) == 0.0
    stats = TTTStats(torch.tensor([[0, 1, 3, 4, 0, 0], [0, 1, 1, 2, 0, 0]], dtype=torch.float64))
    assert stats.acc() == [0.75, 0.5] and stats.acceptance_length() == pytest.approx(0.75 + 0.375)
    assert stats.acceptance_rate() == [0.0, 0.0]  # no supervised positions: 0, never NaN


def test_overfits_one_batch_to_the_exact_floor(
    make_draft: Callable[..., Eagle3Draft], make_sample: Callable[..., Sample],
    vocab: VocabMapping,
) -> None:
    # Final hidden states are a fixed function of the token, so the teacher is learnable from
    # the input token; the floor is the teacher's own entropy on supervised positions.
    g = torch.Generator().manual_seed(3)
    token_state = torch.randn(512, 64, generator=g)
    samples = []
    for s in range(2):
        sample = make_sample(24, seed=10 + s, supervised_from=4)
        sample["final_hidden_states"] = token_state[sample["input_ids"]]
        samples.append(sample)
    batch = collate(samples)
    teacher = compute_teacher(batch.final_hidden_states, _in_vocab_lm_head(vocab, scale=0.25),
                              vocab.t2d, num_steps=K)
    floor = []
    for k in range(K):
        step = step_targets(batch, teacher, k)
        entropy = -(step.log_q.exp() * step.log_q).sum(-1)
        floor.append(float((step.position_mask * entropy).sum() / batch.input_ids.numel()))
    draft = make_draft()
    optimizer = torch.optim.AdamW(draft.trainable_parameters(), lr=3e-3, betas=(0.9, 0.95),
                                  weight_decay=0.0)
    gaps: list[float] = []
    for _ in range(300):
        result = ttt_loss(draft, batch, teacher, num_steps=K)
        gaps = [p - f for p, f in zip(result.stats.ploss(), floor)]
        if max(gaps) < 0.05:
            break
        optimizer.zero_grad()
        result.loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.trainable_parameters(), 0.5)
        optimizer.step()
    assert all(-1e-4 < gap < 0.05 for gap in gaps), gaps
