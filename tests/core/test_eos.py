"""End-of-stream accounting: the writer's numbered output is what counts; failure wins."""

from __future__ import annotations

import pytest

from pipeline.core.eos import CompletenessTracker, PartitionState, Position
from pipeline.core.errors import StreamError
from pipeline.core.messages import EndOfStream


def eos(p: int, count: int, **kw) -> EndOfStream:
    return EndOfStream(run_id="r", stage="generate", partition=p, count=count, seq=count, **kw)


def test_partition_ends_when_every_number_arrived() -> None:
    t = CompletenessTracker.over([0, 1])
    for seq in range(3):
        assert t.position(0, seq) is Position.NEXT
        t.used(0, seq)
    t.end(eos(0, 3), 0)
    assert t.ended(0) and not t.all_ended()
    t.end(eos(1, 0), 1)
    s = t.summary()
    assert t.all_ended() and (s.expected, s.used, s.missing, s.duplicates, s.foreign) == (3, 3, 0, 0, 0)


def test_a_gap_is_counted_missing_at_the_record_after_it_and_at_the_marker() -> None:
    t = CompletenessTracker.over([0])
    t.used(0, 0)
    t.used(0, 2)  # seq 1 never arrived
    t.end(eos(0, 5), 0)  # nor did 3 and 4
    assert t.summary().missing == 3 and t.summary().used == 2


def test_numbers_classify_records() -> None:
    t = CompletenessTracker.over([0])
    t.used(0, 0)
    assert t.position(0, None) is Position.UNNUMBERED
    assert t.position(0, 0) is Position.EARLIER
    assert t.position(0, 1) is Position.NEXT


def test_foreign_and_duplicate_records_never_touch_the_counts() -> None:
    t = CompletenessTracker.over([0])
    t.used(0, 0)
    t.foreign(0)
    t.duplicate(0)
    t.end(eos(0, 1), 0)
    s = t.summary()
    assert (s.expected, s.used, s.missing, s.duplicates, s.foreign) == (1, 1, 0, 1, 1)


def test_failed_marker_wins() -> None:
    t = CompletenessTracker.over([0])
    with pytest.raises(StreamError, match="disk full"):
        t.end(eos(0, 0, status="failed", reason="disk full"), 0)


def test_records_after_the_marker_are_refused() -> None:
    t = CompletenessTracker.over([0])
    t.end(eos(0, 0), 0)
    with pytest.raises(StreamError, match="after the end-of-stream"):
        t.used(0, 0)


def test_state_round_trips_through_json() -> None:
    t = CompletenessTracker.over([0])
    t.used(0, 1)
    t.duplicate(0)
    t.end(eos(0, 2), 0)
    restored = PartitionState.from_json(0, t.state(0).to_json())
    assert restored == t.state(0)


def test_unknown_partition_is_refused() -> None:
    with pytest.raises(StreamError, match="does not own"):
        CompletenessTracker.over([0]).used(3, 0)
