"""Ledger and metrics histories after a crash: the resumed attempt supersedes the dead one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.core.errors import StreamError
from pipeline.core.messages import LedgerStep, PartitionOffset, RankProgress, StepMetrics
from pipeline.ledger import effective_history
from pipeline.train.metrics import read_metrics
from pipeline.train.plot import plot_metrics_file


def record(step: int, tag: str = "") -> LedgerStep:
    return LedgerStep(
        run_id="run",
        step=step,
        epoch=0,
        lr=1e-3,
        created_at=0.0,
        ranks=[
            RankProgress(
                rank=0,
                sample_ids=[f"s{step}{tag}"],
                next_offsets=[PartitionOffset(partition=0, offset=step, records=step)],
            )
        ],
        metrics=StepMetrics(loss=1.0, ploss=[1.0], acc=[0.5]),
    )


def test_a_repeated_step_discards_the_dead_attempts_later_records() -> None:
    log = [
        record(1),
        record(2),
        record(3),
        record(4, "dead"),
        record(5, "dead"),
        record(4),
        record(5),
        record(6),
    ]
    history = effective_history(log)
    assert [r.step for r in history] == [1, 2, 3, 4, 5, 6]
    assert [r.ranks[0].sample_ids[0] for r in history][3:5] == ["s4", "s5"]


def test_a_gap_in_the_ledger_is_an_error() -> None:
    with pytest.raises(StreamError, match="jumps from step 2 to 4"):
        effective_history([record(1), record(2), record(4)])


def test_metrics_rows_follow_the_same_rule_and_plot(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    rows = []
    for step, loss in [(1, 3.0), (2, 2.5), (3, 9.9), (2, 2.5), (3, 2.0)]:
        rows.append(
            {
                "step": step,
                "loss": loss,
                "ploss": [loss],
                "acc": [0.1 * step],
                "acceptance_length": 0.1 * step,
            }
        )
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{torn")
    got = read_metrics(path)
    assert [(r["step"], r["loss"]) for r in got] == [(1, 3.0), (2, 2.5), (3, 2.0)]
    png = plot_metrics_file(path, tmp_path / "curves.png")
    assert png is not None and png.read_bytes()[:4] == b"\x89PNG"
