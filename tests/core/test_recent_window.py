"""The dedup window (pipeline/core/recent_window.py): a deque's semantics, snapshots that stay put
and cost no copy of the window."""

from __future__ import annotations

import pickle
import random
import tracemalloc
from collections import deque

import pytest

from pipeline.core.progress import StreamState
from pipeline.core.recent_window import CHUNK, RecentPairs, RecentWindow


def _pair(i: int) -> tuple[str, str]:
    return f"s{i}", f"crc32c:{i:08x}"


def test_it_keeps_and_evicts_what_a_bounded_deque_would_and_snapshots_do_not_move() -> None:
    maxlen = CHUNK + CHUNK // 3  # the window spans chunk boundaries as it slides
    window, model = RecentWindow(maxlen), deque(maxlen=maxlen)
    taken: list[tuple[RecentPairs, list[tuple[str, str]]]] = []
    rng = random.Random(0)
    for i in range(4 * CHUNK + 17):
        pair = _pair(i)
        expected = model[0] if len(model) == maxlen else None
        model.append(pair)
        assert window.append(pair) == expected
        assert len(window) == len(model)
        if rng.random() < 0.003 or i in (0, maxlen - 1, maxlen, CHUNK - 1, CHUNK):
            taken.append((window.snapshot(), list(model)))
    assert len(taken) > 10
    for snapshot, then in taken:  # later appends and evictions leave every snapshot as it was
        assert snapshot == then and list(snapshot) == then and len(snapshot) == len(then)
        assert snapshot[0] == then[0] and snapshot[-1] == then[-1] and snapshot[len(then) // 2] == then[len(then) // 2]
        assert snapshot[3:9] == then[3:9]
        with pytest.raises(IndexError):
            snapshot[len(then)]


def test_a_snapshot_of_a_full_default_window_copies_no_pairs() -> None:
    window = RecentWindow(65536)
    for i in range(70000):
        window.append(_pair(i))
    tracemalloc.start()
    try:
        snapshot = window.snapshot()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(snapshot) == 65536 and snapshot[0] == _pair(70000 - 65536)
    assert peak < 4096, f"a snapshot allocated {peak} B: a copy of the window's pointers is 512 KiB"


def test_a_snapshot_survives_a_checkpoint_and_a_pickle_as_the_same_pairs() -> None:
    window = RecentWindow(10)
    for i in range(25):
        window.append(_pair(i))
    state = StreamState(positions={0: 25}, partitions={}, cursor=0, recent=window.snapshot())
    again = StreamState.from_json(state.to_json())
    assert again == state and list(again.recent) == [_pair(i) for i in range(15, 25)]
    assert pickle.loads(pickle.dumps(state)) == state


def test_an_empty_window_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one pair"):
        RecentWindow(0)
