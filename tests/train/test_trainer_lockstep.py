"""The step decision and the tail: every rank takes a full global step or none, and reports the rest."""

from __future__ import annotations

import threading

import pytest

from pipeline.core.errors import StreamError
from pipeline.train.dataset import LockstepFeeder, Prefetcher
from pipeline.train.distributed import DistContext, Vote, decide
from pipeline.train.result import RunCompleteness
from tests.train_support import MemorySource

LENGTHS = [8 + i % 5 for i in range(11)]


def feeder_for(
    lengths: list[int],
    *,
    batch_size: int = 2,
    grad_accum: int = 2,
    depth: int = 2,
    fail_at: int | None = None,
) -> tuple[LockstepFeeder, MemorySource]:
    source = MemorySource("run", lengths, fail_at=fail_at)
    prefetcher = Prefetcher(source, batch_size=batch_size, depth=depth).start()
    return LockstepFeeder(prefetcher, grad_accum), source


def test_the_most_severe_vote_wins() -> None:
    assert decide([Vote.READY, Vote.READY]) is Vote.READY
    assert decide([Vote.READY, Vote.ENDED]) is Vote.ENDED
    assert decide([Vote.ENDED, Vote.STOP, Vote.READY]) is Vote.STOP
    assert decide([Vote.READY, Vote.FAILED, Vote.STOP]) is Vote.FAILED
    assert DistContext().agree(Vote.ENDED) is Vote.ENDED  # one rank: no process group, same answer


def test_full_steps_then_ended_then_the_tail_is_reported() -> None:
    feeder, source = feeder_for(LENGTHS)
    stop = threading.Event()
    steps = []
    while feeder.vote(stop) is Vote.READY:
        micro = feeder.take()
        assert [len(m.samples) for m in micro] == [2, 2]
        steps.append([s.offset for m in micro for s in m.samples])
    assert steps == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert feeder.vote(stop) is Vote.ENDED  # 3 samples left: one full micro-batch and a partial one
    tail = feeder.drain(deadline_s=30)
    assert [s.offset for s in tail.samples] == [8, 9, 10]
    assert tail.end is not None and tail.end.state.positions == {0: 11}
    assert tail.end.summary.used == 11
    feeder.prefetcher.close()
    assert source.closed


def test_each_micro_batch_carries_the_state_after_its_last_sample() -> None:
    feeder, _ = feeder_for(LENGTHS, grad_accum=1)
    assert feeder.vote(threading.Event()) is Vote.READY
    (micro,) = feeder.take()
    assert micro.state.positions == {0: 2}  # not the prefetcher's read-ahead position
    assert micro.batch.batch_size == 2 and micro.batch.seq_len == max(LENGTHS[:2])
    feeder.prefetcher.close()


def test_a_rank_that_ended_early_drains_the_ready_steps_as_tail() -> None:
    """Another rank voted ENDED while this one still held full steps: they are tail, not trained."""
    feeder, _ = feeder_for(LENGTHS, depth=8)
    assert feeder.vote(threading.Event()) is Vote.READY
    tail = feeder.drain(deadline_s=30)  # the global decision was ENDED
    assert [s.offset for s in tail.samples] == list(range(11))
    feeder.prefetcher.close()


def test_stop_is_voted_even_with_a_full_step_held() -> None:
    feeder, _ = feeder_for(LENGTHS)
    stop = threading.Event()
    assert feeder.vote(stop) is Vote.READY
    stop.set()
    assert feeder.vote(stop) is Vote.STOP
    feeder.prefetcher.close()


def test_a_failing_stream_votes_failed_and_keeps_the_error() -> None:
    feeder, _ = feeder_for(LENGTHS, fail_at=5)
    stop = threading.Event()
    assert feeder.vote(stop) is Vote.READY
    feeder.take()
    assert feeder.vote(stop) is Vote.FAILED
    assert isinstance(feeder.error, RuntimeError) and "failed at 5" in str(feeder.error)
    feeder.prefetcher.close()


def test_an_empty_stream_ends_at_once() -> None:
    feeder, _ = feeder_for([])
    assert feeder.vote(threading.Event()) is Vote.ENDED
    tail = feeder.drain(deadline_s=10)
    assert tail.samples == []
    feeder.prefetcher.close()


@pytest.mark.parametrize("bad", [{"batch_size": 0}, {"grad_accum": 0}])
def test_sizes_must_be_positive(bad: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        feeder_for(LENGTHS, **bad)


def test_the_summary_counts_every_prompt_and_an_incomplete_one_is_an_error() -> None:
    rank = {"expected": 9, "used": 9, "missing": 0, "duplicates": 0, "foreign": 1, "partitions_ended": 2,
            "partitions": 2, "dropped_upstream": 2, "trained": 8, "tail": 1}  # fmt: skip
    ok = RunCompleteness.combine([rank, {**rank, "duplicates": 1}])
    assert ok.line() == (
        "16 of 22 prompts trained, 0 missing, 1 duplicates dropped, 2 tail samples not stepped, "
        "6 dead letters (0 input lines, 4 prompts, 2 foreign records)"
    )
    ok.check()
    lost = {**rank, "expected": 10, "missing": 1}
    with pytest.raises(StreamError, match="incomplete run: 16 of 23 prompts trained, 1 missing"):
        RunCompleteness.combine([rank, lost]).check()
    with pytest.raises(StreamError, match="1 partitions did not end"):
        RunCompleteness.combine([rank, {**rank, "partitions_ended": 1}]).check()
    nothing = {**rank, "expected": 0, "used": 0, "trained": 0, "tail": 0}
    with pytest.raises(StreamError, match="trained nothing"):
        RunCompleteness.combine([nothing]).check()
    garbage = {**nothing, "dropped_upstream": 0, "foreign": 0, "source_letters": 4066}  # input the source refused
    with pytest.raises(StreamError, match="0 of 0 prompts trained.*4066 dead letters \\(4066 input lines"):
        RunCompleteness.combine([garbage]).check()
