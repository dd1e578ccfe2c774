"""End-of-stream accounting: counts must add up; failure wins."""

from __future__ import annotations

import pytest

from pipeline.core.eos import CompletenessTracker
from pipeline.core.errors import StreamError
from pipeline.core.messages import EndOfStream


def eos(p: int, count: int, **kw) -> EndOfStream:
    return EndOfStream(run_id="r", stage="generate", partition=p, count=count, **kw)


def test_partition_ends_when_the_count_holds() -> None:
    t = CompletenessTracker([0, 1])
    for _ in range(3):
        t.used(0)
    t.rejected(0)
    assert t.end(eos(0, 4)) and t.ended(0) and not t.all_ended()
    assert t.end(eos(1, 0)) and t.all_ended()
    s = t.summary()
    assert (s.expected, s.used, s.rejected, s.missing) == (4, 3, 1, 0)


def test_missing_records_are_an_error_not_a_log_line() -> None:
    t = CompletenessTracker([0])
    t.used(0)
    with pytest.raises(StreamError, match="says 2 records, 1 arrived"):
        t.end(eos(0, 2))


def test_failed_marker_wins() -> None:
    t = CompletenessTracker([0])
    with pytest.raises(StreamError, match="disk full"):
        t.end(eos(0, 0, status="failed", reason="disk full"))


def test_records_after_the_marker_are_refused() -> None:
    t = CompletenessTracker([0])
    t.end(eos(0, 0))
    with pytest.raises(StreamError, match="after the end-of-stream"):
        t.used(0)


def test_several_writers_each_close_their_share() -> None:
    t = CompletenessTracker([0], writers_per_partition=2)
    t.used(0)
    t.used(0)
    assert not t.end(eos(0, 1, producer_id="a"))
    assert not t.end(eos(0, 1, producer_id="a"))  # a repeated marker counts once
    assert t.end(eos(0, 1, producer_id="b"))


def test_unknown_partition_is_refused() -> None:
    with pytest.raises(StreamError, match="does not own"):
        CompletenessTracker([0]).used(3)
