"""Spec check 2: the draft vocabulary mapping (d2t/t2d) and its safetensors persistence."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from pipeline.core.errors import ConfigError, PayloadError
from pipeline.vocab import TokenCounter, VocabMapping, build_vocab_mapping, count_tokens


def _assert_consistent(mapping: VocabMapping, vd: int, v: int) -> None:
    assert mapping.d2t.dtype == torch.long and mapping.d2t.shape == (vd,)
    assert mapping.t2d.dtype == torch.bool and mapping.t2d.shape == (v,)
    assert int(mapping.t2d.sum()) == vd
    hot = torch.arange(vd) + mapping.d2t
    assert bool((hot[1:] > hot[:-1]).all()), "target ids of draft ids must be strictly increasing"
    assert torch.equal(hot, torch.nonzero(mapping.t2d).flatten())


def test_counter_counts_only_supervised_positions() -> None:
    counter = TokenCounter()
    counter.update(torch.tensor([5, 5, 7, 9, 5]), torch.tensor([0, 1, 1, 0, 1], dtype=torch.uint8))
    counter.update([9, 3], [1, 1])
    counts = counter.counts
    assert counts[5] == 2 and counts[7] == 1 and counts[9] == 1 and counts[3] == 1
    assert counter.total == 5 and counter.num_distinct == 4 and counter.samples == 2


def test_most_frequent_ids_are_kept_and_sorted() -> None:
    counts = torch.zeros(50, dtype=torch.long)
    counts[[40, 3, 17, 25, 8]] = torch.tensor([100, 90, 80, 70, 1])
    mapping = build_vocab_mapping(counts, 50, 4)
    _assert_consistent(mapping, 4, 50)
    assert mapping.hot_token_ids.tolist() == [3, 17, 25, 40]
    assert mapping.d2t.tolist() == [3, 16, 23, 37]
    assert mapping.to_target(torch.tensor([0, 3])).tolist() == [3, 40]
    # boolean indexing of target logits yields draft-id order
    logits = torch.arange(50.0)
    assert logits[mapping.t2d].tolist() == [3.0, 17.0, 25.0, 40.0]


def test_ties_break_by_ascending_id() -> None:
    counts = {9: 5, 4: 5, 7: 5, 2: 5, 11: 8}
    mapping = build_vocab_mapping(counts, 16, 3)
    # 11 wins outright; of the four ids tied at 5, the two smallest (2, 4) are taken
    assert mapping.hot_token_ids.tolist() == [2, 4, 11]


def test_pads_with_unseen_ids_from_zero() -> None:
    mapping = build_vocab_mapping({1: 3, 10: 2}, 20, 5)
    _assert_consistent(mapping, 5, 20)
    assert mapping.hot_token_ids.tolist() == [0, 1, 2, 3, 10]
    empty = build_vocab_mapping(TokenCounter(), 20, 4)
    assert empty.hot_token_ids.tolist() == [0, 1, 2, 3]


def test_deterministic_regardless_of_feed_order_and_merge() -> None:
    g = torch.Generator().manual_seed(0)
    samples = [(torch.randint(0, 300, (40,), generator=g), torch.randint(0, 2, (40,), generator=g))
               for _ in range(20)]
    forward = build_vocab_mapping(count_tokens(samples), 300, 64)
    backward = build_vocab_mapping(count_tokens(reversed(samples)), 300, 64)
    merged = count_tokens(samples[:7]).merge(count_tokens(samples[7:]))
    assert torch.equal(forward.d2t, backward.d2t) and torch.equal(forward.t2d, backward.t2d)
    assert torch.equal(build_vocab_mapping(merged, 300, 64).t2d, forward.t2d)
    assert forward.fingerprint() == backward.fingerprint()
    _assert_consistent(forward, 64, 300)


def test_refuses_bad_sizes_and_ids() -> None:
    with pytest.raises(ConfigError):
        build_vocab_mapping({1: 1}, 10, 11)
    with pytest.raises(ConfigError):
        build_vocab_mapping({12: 1}, 10, 4)
    counter = TokenCounter()
    counter.update([15], [1])
    with pytest.raises(ConfigError):
        build_vocab_mapping(counter, 10, 4)
    with pytest.raises(PayloadError):
        counter.update([1, 2], [1])


def test_save_load_roundtrip_local_and_fsspec(tmp_path: Path) -> None:
    mapping = build_vocab_mapping({5: 9, 6: 1, 30: 4}, 40, 8)
    path = tmp_path / "vocab" / "mapping.safetensors"
    path.parent.mkdir()
    mapping.save(str(path))
    with safe_open(str(path), framework="pt") as handle:  # a plain safetensors file
        assert set(handle.keys()) == {"d2t", "t2d"}
        assert handle.metadata()["fingerprint"] == mapping.fingerprint()
    for url in (str(path), "memory://specstream-test/vocab.safetensors"):
        if url.startswith("memory://"):
            mapping.save(url)
        loaded = VocabMapping.load(url)
        assert torch.equal(loaded.d2t, mapping.d2t) and torch.equal(loaded.t2d, mapping.t2d)


def test_load_refuses_garbage_and_inconsistent_maps(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x80\x04not a safetensors file")
    with pytest.raises(PayloadError):
        VocabMapping.load(str(bad))
    with pytest.raises(PayloadError):
        VocabMapping(d2t=torch.tensor([0, 0]), t2d=torch.tensor([True, False, True]))
