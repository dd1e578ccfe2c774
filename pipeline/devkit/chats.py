"""Synthetic chats from a first-order Markov chain: the tiny target's training data, and fresh data.

Words follow a Zipf-like unigram start distribution, and every word has four successors with
p = .70/.15/.10/.05, so a model trained on them has a learnable, low-entropy next-token
distribution (a good draft can reach ~70 % top-1 agreement). :func:`markov_conversations`
returns ShareGPT records from the chain and :func:`write_jsonl` writes them to any fsspec URL.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import fsspec

__all__ = (
    "CHAIN_SEED",
    "NUM_WORDS",
    "WORDS",
    "MarkovChain",
    "markov_chain",
    "markov_conversations",
    "write_jsonl",
)

#: The chain is a fixed part of the task: every build and every test sample uses this seed.
CHAIN_SEED = 20250301

_SUCCESSOR_PROBS = (0.70, 0.15, 0.10, 0.05)
_ZIPF_EXPONENT = 1.1


def _word_list(count: int) -> list[str]:
    """``count`` distinct pronounceable two-syllable words, in a fixed order."""
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    words = [a + b for a in syllables for b in syllables]
    random.Random(7).shuffle(words)
    return words[:count]


#: The chain's words: with the tokenizer's 7 special and 5 plain tokens they fill the tiny
#: target's 512 ids (:func:`pipeline.devkit.target.build_tiny_tokenizer` checks the sum).
NUM_WORDS = 500
WORDS: tuple[str, ...] = tuple(_word_list(NUM_WORDS))


@dataclass(frozen=True)
class MarkovChain:
    """A first-order chain over :data:`WORDS` (indices into it, not token ids).

    ``unigram[w]``: start distribution (Zipf over a fixed random ranking);
    ``successors[w]``: four distinct next words with probabilities :data:`_SUCCESSOR_PROBS`.
    """

    words: tuple[str, ...]
    unigram: tuple[float, ...]
    successors: tuple[tuple[int, ...], ...]
    probs: tuple[float, ...] = _SUCCESSOR_PROBS

    def most_likely_next(self, word: str) -> str:
        return self.words[self.successors[self._index[word]][0]]

    def next_distribution(self, word: str) -> dict[str, float]:
        return {self.words[s]: p for s, p in zip(self.successors[self._index[word]], self.probs, strict=True)}

    @property
    def entropy(self) -> float:
        """Nats per transition (the floor of any model's cross-entropy on in-turn words)."""
        return -sum(p * math.log(p) for p in self.probs)

    @property
    def _index(self) -> dict[str, int]:
        return _word_index(self.words)

    def walk(self, rng: random.Random, length: int) -> list[str]:
        word = rng.choices(range(len(self.words)), weights=self.unigram)[0]
        out = [word]
        for _ in range(length - 1):
            word = rng.choices(self.successors[word], weights=self.probs)[0]
            out.append(word)
        return [self.words[w] for w in out]


@lru_cache(maxsize=4)
def _word_index(words: tuple[str, ...]) -> dict[str, int]:
    return {w: i for i, w in enumerate(words)}


@lru_cache(maxsize=4)
def markov_chain(chain_seed: int = CHAIN_SEED) -> MarkovChain:
    """The chain behind the tiny target's training data (deterministic in ``chain_seed``)."""
    rng = random.Random(chain_seed)
    n = len(WORDS)
    ranking = list(range(n))
    rng.shuffle(ranking)
    weights = [0.0] * n
    for rank, word in enumerate(ranking):
        weights[word] = 1.0 / (rank + 1) ** _ZIPF_EXPONENT
    total = sum(weights)
    unigram = tuple(w / total for w in weights)
    successors: list[tuple[int, ...]] = []
    for _ in range(n):
        chosen: list[int] = []
        while len(chosen) < len(_SUCCESSOR_PROBS):
            word = rng.choices(range(n), weights=unigram)[0]
            if word not in chosen and word != len(successors):
                chosen.append(word)
        successors.append(tuple(chosen))
    return MarkovChain(words=WORDS, unigram=unigram, successors=tuple(successors))


def markov_conversations(
    n: int,
    *,
    seed: int,
    turns: tuple[int, int] = (1, 3),
    words_per_turn: tuple[int, int] = (4, 24),
    system_prob: float = 0.25,
    chain_seed: int = CHAIN_SEED,
) -> list[dict[str, Any]]:
    """``n`` ShareGPT records (``{"conversations": [{"from", "value"}, ...]}``) from the chain.

    Each record: an optional system turn (probability ``system_prob``), then ``turns`` (a
    closed range) human/gpt exchanges; every turn is a fresh walk of ``words_per_turn`` (closed
    range) words joined by spaces. Deterministic in ``seed`` and ``chain_seed``.
    """
    chain = markov_chain(chain_seed)
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        conversation = []

        def turn(speaker: str) -> None:
            length = rng.randint(*words_per_turn)
            conversation.append({"from": speaker, "value": " ".join(chain.walk(rng, length))})

        if rng.random() < system_prob:
            turn("system")
        for _ in range(rng.randint(*turns)):
            turn("human")
            turn("gpt")
        records.append({"conversations": conversation})
    return records


def write_jsonl(
    records: Iterable[Mapping[str, Any]],
    url: str | os.PathLike[str],
    *,
    storage_options: Mapping[str, Any] | None = None,
) -> int:
    """Write one JSON object per line to any fsspec URL; returns the number of records."""
    count = 0
    try:
        with fsspec.open(os.fspath(url), "w", encoding="utf-8", **(storage_options or {})) as fh:
            for record in records:
                fh.write(json.dumps(record, ensure_ascii=False))
                fh.write("\n")
                count += 1
    except OSError as exc:
        exc.add_note(f"writing {os.fspath(url)}")  # a full disk's write error names no file
        raise
    return count
