"""A run that reached its end but trained too small a share of its prompts fails (issue 9.3)."""

from __future__ import annotations

import pytest

from pipeline.core.errors import StreamError
from pipeline.train.result import RunCompleteness

# Two ranks: 16 trained, 2 in the tail, 4 of the 22 prompts dead-lettered by the generators.
RANK = {"expected": 9, "used": 9, "missing": 0, "duplicates": 0, "foreign": 0, "partitions_ended": 2,
        "partitions": 2, "dropped_upstream": 2, "trained": 8, "tail": 1}  # fmt: skip


def test_the_share_counts_the_tail_as_trained_and_the_dead_letters_against() -> None:
    run = RunCompleteness.combine([RANK, RANK])
    run.check(18 / 22)  # exactly the share: trained + tail = 18 of 22
    run.check(0.0)
    with pytest.raises(StreamError) as info:
        run.check(0.99)
    message = str(info.value)
    assert message.startswith("the run trained 18 of its 22 prompts (81.8%, the 2 tail samples included), "
                              "below train.min_trained_fraction 0.99: 16 of 22 prompts trained")  # fmt: skip
    assert "nothing was exported" in message and "`specstream export`" in message


def test_a_run_without_dead_letters_passes_the_strictest_share() -> None:
    clean = {**RANK, "dropped_upstream": 0}
    RunCompleteness.combine([clean, clean]).check(1.0)
