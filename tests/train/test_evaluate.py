"""Evaluation on the held-out set: the training's TTT loss without gradients, rows and callbacks."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from pipeline.train.collate import collate
from pipeline.train.draft import Eagle3Draft
from pipeline.train.evaluate import Evaluator, eval_line, evaluate, figures
from pipeline.train.ttt import compute_teacher, ttt_loss
from pipeline.vocab import VocabMapping

Sample = dict[str, torch.Tensor]
K = 3


def _lm_head(vocab: VocabMapping) -> torch.Tensor:
    return torch.randn(vocab.target_vocab_size, 64, generator=torch.Generator().manual_seed(5))


def test_eval_loss_equals_ttt_loss_on_the_same_batch_and_leaves_no_gradients(
    make_draft: Callable[..., Eagle3Draft], make_sample: Callable[..., Sample], vocab: VocabMapping
) -> None:
    draft = make_draft()
    lm_head = _lm_head(vocab)
    batch = collate([make_sample(24, seed=s, supervised_from=4) for s in range(3)])
    with torch.no_grad():
        teacher = compute_teacher(batch.final_hidden_states, lm_head, draft.t2d, num_steps=K)
        expected = ttt_loss(draft, batch, teacher, num_steps=K, decay=0.8)

    stats = evaluate(draft, lm_head, [batch], ttt_steps=K, device=torch.device("cpu"))

    assert stats is not None
    values = figures(stats, 0.8)
    assert values["loss"] == pytest.approx(expected.loss.item(), rel=1e-6)
    assert [values[f"ploss_{k}"] for k in range(K)] == pytest.approx(expected.stats.ploss(), rel=1e-6)
    assert [values[f"acc_{k}"] for k in range(K)] == pytest.approx(expected.stats.acc())
    assert values["acceptance_length"] == pytest.approx(expected.stats.acceptance_length())
    assert all(p.grad is None for p in draft.parameters())
    assert draft.training  # back in the mode it was in


def test_evaluator_loads_once_writes_a_row_per_evaluation_and_calls_back(
    make_draft: Callable[..., Eagle3Draft], make_sample: Callable[..., Sample], vocab: VocabMapping,
    tmp_path: Path,
) -> None:
    loads: list[int] = []
    seen: list[tuple[int, dict[str, float]]] = []
    samples = [make_sample(16 + s, seed=s) for s in range(5)]

    def load() -> list[Sample]:
        loads.append(1)
        return samples

    path = tmp_path / "eval.jsonl"
    evaluator = Evaluator(load, interval=2, batch_size=2, ttt_steps=K, decay=0.8, path=str(path),
                          on_eval=lambda step, values: seen.append((step, values)))
    draft, lm_head = make_draft(), _lm_head(vocab)
    ran = [step for step in range(1, 5) if evaluator.due(step)]
    for step in ran:
        evaluator.run(step, draft, lm_head, device=torch.device("cpu"))
    again = evaluator.run(4, draft, lm_head, device=torch.device("cpu"))  # the end, at an eval step

    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert ran == [2, 4] and len(loads) == 1
    assert [r["step"] for r in rows] == [2, 4] and all(r["split"] == "eval" for r in rows)
    assert all(r["samples"] == 5 and len(r["acc"]) == K for r in rows)
    assert [s for s, _ in seen] == [2, 4] and again == seen[-1][1]
    assert all(math.isfinite(v) for _, values in seen for v in values.values())
    assert "accept length" in eval_line(4, again)


def test_evaluator_without_an_eval_set_skips_and_does_not_ask_again(
    make_draft: Callable[..., Eagle3Draft], vocab: VocabMapping
) -> None:
    loads: list[int] = []

    def load() -> None:
        loads.append(1)
        return None

    evaluator = Evaluator(load, interval=1, batch_size=2, ttt_steps=K, decay=0.8)
    draft, lm_head = make_draft(), _lm_head(vocab)
    assert evaluator.run(1, draft, lm_head, device=torch.device("cpu")) is None
    assert evaluator.run(2, draft, lm_head, device=torch.device("cpu")) is None
    assert len(loads) == 1 and evaluator.last is None


def test_the_eval_set_loaded_ahead_is_the_one_evaluated_and_nothing_loads_again(
    make_draft: Callable[..., Eagle3Draft], make_sample: Callable[..., Sample], vocab: VocabMapping
) -> None:
    samples = [make_sample(16 + s, seed=s) for s in range(3)]
    asked: list[str] = []

    def ahead() -> list[Sample]:
        asked.append("ahead")
        return samples

    def load() -> list[Sample]:
        asked.append("now")
        return samples

    evaluator = Evaluator(load, interval=1, batch_size=2, ttt_steps=K, decay=0.8, load_ahead=ahead, ahead_wait_s=30)
    evaluator.start()
    draft, lm_head = make_draft(), _lm_head(vocab)
    assert evaluator.run(1, draft, lm_head, device=torch.device("cpu")) is not None
    assert evaluator.run(2, draft, lm_head, device=torch.device("cpu")) is not None
    assert asked == ["ahead"] and evaluator.samples == 3


def test_a_load_ahead_that_found_nothing_is_tried_again_at_the_first_evaluation(
    make_draft: Callable[..., Eagle3Draft], make_sample: Callable[..., Sample], vocab: VocabMapping
) -> None:
    """The trainer started long before the generators: the early try gave up, the set came later."""
    samples = [make_sample(16, seed=1)]
    evaluator = Evaluator(lambda: samples, interval=1, batch_size=2, ttt_steps=K, decay=0.8,
                          load_ahead=lambda: None, ahead_wait_s=30)  # fmt: skip
    evaluator.start()
    assert evaluator.run(1, make_draft(), _lm_head(vocab), device=torch.device("cpu")) is not None
    assert evaluator.samples == 1


def test_a_load_ahead_still_waiting_bounds_the_first_evaluation_and_evaluation_is_skipped(
    make_draft: Callable[..., Eagle3Draft], vocab: VocabMapping
) -> None:
    import threading

    release = threading.Event()
    asked: list[str] = []

    def ahead() -> None:
        release.wait(30)  # a load still inside its own bounded wait
        return None

    def load() -> None:
        asked.append("now")
        return None

    evaluator = Evaluator(load, interval=1, batch_size=2, ttt_steps=K, decay=0.8, load_ahead=ahead, ahead_wait_s=0.2)
    evaluator.start()
    try:
        assert evaluator.run(1, make_draft(), _lm_head(vocab), device=torch.device("cpu")) is None
        assert evaluator.run(2, make_draft(), _lm_head(vocab), device=torch.device("cpu")) is None
        assert asked == [] and evaluator.last is None  # the wait was spent: not a second one
    finally:
        release.set()
