"""The dead-letter policy stops a stage whose input is systematically wrong."""

from __future__ import annotations

import pytest

from pipeline.core.deadletter import DeadLetterLimitExceeded, DeadLetterLimits, DeadLetterPolicy


def test_a_run_of_invalid_records_stops_the_stage() -> None:
    policy = DeadLetterPolicy("generate", DeadLetterLimits(max_consecutive=3, max_invalid_ratio=1.0))
    policy.record(valid=False, reason="a")
    policy.record(valid=False, reason="b")
    with pytest.raises(DeadLetterLimitExceeded, match="3 invalid records in a row.*last: c"):
        policy.record(valid=False, reason="c")


def test_a_valid_record_resets_the_run() -> None:
    policy = DeadLetterPolicy("generate", DeadLetterLimits(max_consecutive=2, max_invalid_ratio=1.0))
    for _ in range(10):
        policy.record(valid=False)
        policy.record(valid=True)
    assert (policy.valid, policy.invalid) == (10, 10)


def test_the_ratio_applies_once_enough_records_were_seen() -> None:
    policy = DeadLetterPolicy("source", DeadLetterLimits(max_invalid_ratio=0.25, min_records=8, max_consecutive=100))
    for _ in range(3):
        policy.record(valid=False)  # 3 of 3 invalid, but too few records to judge
    for _ in range(4):
        policy.record(valid=True)
    with pytest.raises(DeadLetterLimitExceeded, match="4 of 8 records invalid"):
        policy.record(valid=False)
