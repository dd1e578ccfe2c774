"""Collation of unshifted per-sample features into a right-padded batch (spec 1.4, check 1)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from pipeline.core.errors import PayloadError
from pipeline.train.collate import collate

Sample = dict[str, torch.Tensor]


def test_pads_right_with_zeros_and_builds_masks(make_sample: Callable[..., Sample]) -> None:
    samples = [make_sample(5, seed=1), make_sample(9, seed=2), make_sample(1, seed=3)]
    original_mask = samples[0]["loss_mask"].clone()
    batch = collate(samples)
    assert batch.input_ids.shape == (3, 9) and batch.input_ids.dtype == torch.long
    assert batch.aux_hidden_states.shape == (3, 9, 192)
    assert batch.final_hidden_states.shape == (3, 9, 64)
    assert batch.lengths.tolist() == [5, 9, 1]
    assert batch.attention_mask.tolist()[0] == [1] * 5 + [0] * 4
    for row, sample in enumerate(samples):
        n = sample["input_ids"].numel()
        assert torch.equal(batch.input_ids[row, :n], sample["input_ids"])
        assert torch.equal(batch.aux_hidden_states[row, :n], sample["aux_hidden_states"])
        assert torch.equal(batch.final_hidden_states[row, :n], sample["final_hidden_states"])
        assert not batch.input_ids[row, n:].any() and not batch.aux_hidden_states[row, n:].any()
        assert not batch.final_hidden_states[row, n:].any() and not batch.loss_mask[row, n:].any()
        # the last real token has no captured successor distribution: never supervised
        assert batch.loss_mask[row, n - 1] == 0
        assert batch.loss_mask[row, : n - 1].tolist() == [1] * (n - 1)
    assert torch.equal(samples[0]["loss_mask"], original_mask), "collate must not mutate input"


def test_truncates_to_max_length_and_masks_new_last_token(
    make_sample: Callable[..., Sample],
) -> None:
    batch = collate([make_sample(12), make_sample(4, seed=1)], max_length=6)
    assert batch.input_ids.shape == (2, 6) and batch.lengths.tolist() == [6, 4]
    assert batch.loss_mask[0].tolist() == [1, 1, 1, 1, 1, 0]
    assert batch.loss_mask[1].tolist() == [1, 1, 1, 0, 0, 0]


def test_casts_hidden_dtype_and_refuses_mixed(make_sample: Callable[..., Sample]) -> None:
    a, b = make_sample(3), make_sample(4, seed=1)
    b = {**b, "aux_hidden_states": b["aux_hidden_states"].bfloat16(),
         "final_hidden_states": b["final_hidden_states"].bfloat16()}
    with pytest.raises(PayloadError, match="mixed"):
        collate([a, b])
    batch = collate([a, b], dtype=torch.float32)
    assert batch.aux_hidden_states.dtype == torch.float32


@pytest.mark.parametrize(
    "change, reason",
    [
        (lambda s: s.pop("final_hidden_states"), "missing"),
        (lambda s: s.update(aux_hidden_states=s["aux_hidden_states"][:, :100]), "3 x final"),
        (lambda s: s.update(loss_mask=s["loss_mask"][:-1]), "lengths disagree"),
        (lambda s: s.update(input_ids=s["input_ids"][None]), "expected"),
        (lambda s: s.update(input_ids=s["input_ids"].float()), "integers"),
    ],
)
def test_contract_violations_are_payload_errors(
    make_sample: Callable[..., Sample], change: Callable[[Sample], object], reason: str
) -> None:
    sample = make_sample(6)
    change(sample)
    with pytest.raises(PayloadError, match=reason):
        collate([sample])


def test_refuses_hidden_size_other_than_the_targets(make_sample: Callable[..., Sample]) -> None:
    with pytest.raises(PayloadError, match="hidden size"):
        collate([make_sample(4)], hidden_size=128)
    with pytest.raises(PayloadError, match="different hidden sizes"):
        collate([make_sample(4), make_sample(4, hidden=32)])
