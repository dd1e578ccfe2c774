"""The Markov chats: deterministic ShareGPT records that follow the chain, written anywhere."""

from __future__ import annotations

import json
import math
from pathlib import Path

import fsspec
import pytest

from pipeline.devkit import chats

pytestmark = pytest.mark.usefixtures("one_thread")

ROLES = {"system": "system", "human": "user", "gpt": "assistant"}


def _messages(record: dict) -> list[dict[str, str]]:
    return [{"role": ROLES[t["from"]], "content": t["value"]} for t in record["conversations"]]


def test_markov_conversations_are_deterministic_sharegpt_records() -> None:
    a = chats.markov_conversations(20, seed=5, turns=(1, 2), words_per_turn=(3, 6), system_prob=0.5)
    assert a == chats.markov_conversations(20, seed=5, turns=(1, 2), words_per_turn=(3, 6), system_prob=0.5)
    assert a != chats.markov_conversations(20, seed=6, turns=(1, 2), words_per_turn=(3, 6), system_prob=0.5)
    vocabulary = set(chats.WORDS)
    saw_system = False
    for record in a:
        turns = record["conversations"]
        speakers = [t["from"] for t in turns]
        if speakers[0] == "system":
            saw_system = True
            speakers = speakers[1:]
        assert speakers in (["human", "gpt"], ["human", "gpt", "human", "gpt"])
        for turn in turns:
            words = turn["value"].split(" ")
            assert 3 <= len(words) <= 6 and set(words) <= vocabulary
    assert saw_system


def test_chain_transitions_follow_the_successor_table() -> None:
    chain = chats.markov_chain()
    assert len(chain.words) == 500 and math.isclose(sum(chain.unigram), 1.0)
    assert all(len(set(s)) == 4 and i not in s for i, s in enumerate(chain.successors))
    counts: dict[tuple[str, str], int] = {}
    for record in chats.markov_conversations(200, seed=9, system_prob=0.0):
        for turn in record["conversations"]:
            words = turn["value"].split(" ")
            for prev, nxt in zip(words, words[1:]):
                assert nxt in chain.next_distribution(prev)
                counts[(prev, nxt)] = counts.get((prev, nxt), 0) + 1
    top = sum(n for (p, w), n in counts.items() if w == chain.most_likely_next(p))
    assert 0.65 < top / sum(counts.values()) < 0.75  # p = .70


def test_write_jsonl_to_any_fsspec_url(tmp_path: Path) -> None:
    records = chats.markov_conversations(3, seed=1)
    for url in ("memory://tiny/data.jsonl", str(tmp_path / "data.jsonl"), f"file://{tmp_path}/b.jsonl"):
        assert chats.write_jsonl(records, url) == 3
        with fsspec.open(url, "rt") as fh:
            assert [json.loads(line) for line in fh] == records
