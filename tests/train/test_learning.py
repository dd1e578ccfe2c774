"""Spec check 7: the draft LEARNS from a real (tiny, trained) target's captured hidden states.

End to end without Kafka: Markov conversations -> chat template and assistant loss mask (the
source stage's tokenizer) -> the HF capture backend on the tiny trained Llama -> vocab map from
supervised counts -> draft built from the target directory -> TTT steps. Accuracy is measured on
held-out conversations.
"""

from __future__ import annotations

import random

import pytest
import torch

from pipeline.source.conversations import normalize_messages
from pipeline.source.template import load_tokenizer, tokenize_conversation
from pipeline.train.collate import Batch, collate
from pipeline.train.draft import Eagle3Draft
from pipeline.train.target_head import load_target_head
from pipeline.train.ttt import Teacher, TTTStats, compute_teacher, step_targets, ttt_loss
from pipeline.vocab import TokenCounter, build_vocab_mapping

chats = pytest.importorskip("pipeline.devkit.chats")
tiny_target = pytest.importorskip("pipeline.devkit.target")
hf = pytest.importorskip("pipeline.generate.hf")

K, BATCH, MAX_STEPS, EVAL_EVERY = 3, 8, 200, 10


def _floor(batch: Batch, teacher: Teacher) -> float:
    """The exact minimum of step 0's loss: the teacher's own entropy on supervised positions."""
    step = step_targets(batch, teacher, 0)
    entropy = -(step.log_q.exp() * step.log_q).sum(-1)
    return float((step.position_mask * entropy).sum() / batch.input_ids.numel())


@pytest.mark.slow
def test_step0_accuracy_rises_above_0_8_on_a_trained_tiny_target() -> None:
    target_dir = tiny_target.build_tiny_target()  # cached after the first build
    tokenizer = load_tokenizer(target_dir)
    records = chats.markov_conversations(256 + 64, seed=123, turns=(1, 1),
                                        words_per_turn=(12, 28), system_prob=0.0)
    prompts = [tokenize_conversation(tokenizer, normalize_messages(r))[:2] for r in records]
    aux_ids = list(tiny_target.TINY_AUX_LAYER_IDS)
    with hf.HFTarget(target_dir, aux_layer_ids=aux_ids) as target:
        features = target.capture(prompts)
    train, held_out = features[:256], features[256:]

    counter = TokenCounter()
    for sample in train:
        counter.update(sample["input_ids"], sample["loss_mask"])
    head = load_target_head(target_dir)
    vocab = build_vocab_mapping(counter, head.config.vocab_size, 128)
    torch.manual_seed(0)
    draft = Eagle3Draft.from_target(head, vocab, aux_layer_ids=aux_ids)
    optimizer = torch.optim.AdamW(draft.trainable_parameters(), lr=3e-3, betas=(0.9, 0.95),
                                  weight_decay=0.0)

    held = collate(held_out)
    held_teacher = compute_teacher(held.final_hidden_states, head.lm_head, vocab.t2d, num_steps=K)
    floor = _floor(held, held_teacher)

    def evaluate() -> TTTStats:
        with torch.no_grad():
            return ttt_loss(draft, held, held_teacher, num_steps=K).stats

    initial = evaluate()
    rng = random.Random(0)
    curve: list[tuple[int, float]] = []
    stats = initial
    for step in range(1, MAX_STEPS + 1):
        batch = collate(rng.sample(train, BATCH))
        teacher = compute_teacher(batch.final_hidden_states, head.lm_head, vocab.t2d, num_steps=K)
        result = ttt_loss(draft, batch, teacher, num_steps=K)
        optimizer.zero_grad()
        result.loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.trainable_parameters(), 0.5)
        optimizer.step()
        if step % EVAL_EVERY == 0:
            stats = evaluate()
            curve.append((step, round(stats.acc()[0], 3)))
            if stats.acc()[0] > 0.8:
                break
    print(f"held-out acc_0 curve {curve}; ploss_0 {initial.ploss()[0]:.3f} -> "
          f"{stats.ploss()[0]:.3f} (floor {floor:.3f}); acc {stats.acc()}; "
          f"acceptance {stats.acceptance_rate()}; length {stats.acceptance_length():.2f}")
    assert initial.acc()[0] < 0.05
    assert stats.acc()[0] > 0.8, curve
    assert min(stats.acc()) > 0.5  # later TTT steps learn too (they lag step 0)
    # most of the excess loss over the exact floor is gone
    assert stats.ploss()[0] - floor < 0.4 * (initial.ploss()[0] - floor)
    assert stats.acceptance_rate()[0] > 2 * initial.acceptance_rate()[0]
