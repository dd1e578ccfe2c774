"""The tiny local target: tokenizer, cached concurrent-safe build, and that it learned the chain."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from pipeline.devkit import chats, target

pytestmark = pytest.mark.usefixtures("one_thread")

ROLES = {"system": "system", "human": "user", "gpt": "assistant"}


def _messages(record: dict) -> list[dict[str, str]]:
    return [{"role": ROLES[t["from"]], "content": t["value"]} for t in record["conversations"]]


def test_tokenizer_has_512_ids_and_a_llama3_chat_template() -> None:
    tok = target.build_tiny_tokenizer()
    assert len(tok) == 512 and tok.is_fast
    assert tok.convert_tokens_to_ids(list(target.LLAMA3_SPECIALS)) == list(range(7))
    messages = [{"role": "user", "content": "reve pale"}, {"role": "assistant", "content": "nize"}]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nreve pale<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nnize<|eot_id|>"
    )
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.apply_chat_template(messages, tokenize=True, return_dict=False) == ids
    assert ids.count(tok.bos_token_id) == 1
    assert tok("reve pale")["input_ids"] == tok("reve pale", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids[4:7]) == ["\n\n", "reve", "pale"]
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def _fake_build(calls: list[int], barrier: threading.Barrier | None = None):
    def fake(out_dir: Path, *, seed: int, progress: object = None) -> dict:
        calls.append(seed)
        (out_dir / "config.json").write_text("{}")
        if barrier is not None:
            barrier.wait(timeout=10)  # both builders finish their temp dirs before either renames
        return {"train_steps": 0}

    return fake


def test_build_is_cached_and_safe_against_concurrent_builders(tmp_path: Path, monkeypatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(target, "_train_and_save", _fake_build(calls, threading.Barrier(2)))
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(target.build_tiny_target(tmp_path))) for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 2 and len(results) == 2 and results[0] == results[1]
    assert [p.name for p in tmp_path.iterdir()] == [results[0].name]  # no temp dirs left behind
    marker = json.loads((results[0] / "specstream-tiny.json").read_text())
    assert marker["seed"] == 0 and "build_seconds" in marker
    monkeypatch.setattr(target, "_train_and_save", _fake_build(calls))
    assert target.build_tiny_target(tmp_path) == results[0] and len(calls) == 2  # reused
    assert target.build_tiny_target(tmp_path, seed=1) != results[0] and calls[-1] == 1  # keyed by seed


def test_an_incomplete_build_directory_is_replaced(tmp_path: Path, monkeypatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(target, "_train_and_save", _fake_build(calls))
    stale = tmp_path / f"tiny-llama-{target._build_key(0)}"
    stale.mkdir()
    (stale / "config.json").write_text("partial")
    assert target.build_tiny_target(tmp_path) == stale
    assert (stale / "specstream-tiny.json").is_file() and calls == [0]


def test_default_cache_root_honours_specstream_home(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SPECSTREAM_HOME", str(tmp_path))
    assert target.default_cache_root() == tmp_path / "tiny-target"


def test_the_tiny_target_has_learned_the_chain(tiny_target_dir: Path) -> None:
    """On fresh conversations, in-turn next-word accuracy is near the Bayes bound (0.70).

    Chance is 1/500 and always guessing the most frequent word scores 0.19; a model that learned
    the chain predicts each word's most likely successor (p = .70) and its cross-entropy on those
    positions approaches the chain's entropy (0.914 nats; ln 512 = 6.24 untrained).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    tok = AutoTokenizer.from_pretrained(tiny_target_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_target_dir).eval()
    chain = chats.markov_chain()
    word_ids = set(tok.convert_tokens_to_ids(list(chats.WORDS)))
    hits = agree = total = 0
    nll = 0.0
    for record in chats.markov_conversations(60, seed=2024):
        text = tok.apply_chat_template(_messages(record), tokenize=False)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0]
        log_probs = torch.log_softmax(logits, dim=-1)
        predicted = logits.argmax(-1).tolist()
        for j in range(len(ids) - 1):
            if ids[j] in word_ids and ids[j + 1] in word_ids:
                total += 1
                hits += predicted[j] == ids[j + 1]
                best = tok.convert_tokens_to_ids(chain.most_likely_next(tok.convert_ids_to_tokens(ids[j])))
                agree += predicted[j] == best
                nll -= float(log_probs[j, ids[j + 1]])
    assert total > 1000
    accuracy, agreement, cross_entropy = hits / total, agree / total, nll / total
    assert accuracy >= 0.6, accuracy  # vs chance 0.002, unigram 0.19, Bayes 0.70
    assert agreement >= 0.9, agreement
    assert cross_entropy <= chain.entropy + 0.3, cross_entropy
