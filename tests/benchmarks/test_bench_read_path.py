"""The read-path benchmark (benchmarks/bench_read_path.py) runs end to end at a tiny size, both modes."""

from __future__ import annotations

import sys

import pytest

from tests.benchmarks.modules import benchmark_module


@pytest.mark.parametrize("cold", [False, True], ids=["page-cache", "cold"])
def test_every_side_reads_every_sample_and_the_ratios_are_printed(
    cold: bool, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    benchmark_module("_stats")  # the script imports it as a sibling
    bench = benchmark_module("bench_read_path")
    args = ["--samples", "8", "--batch", "2", "--tokens", "16", "--hidden", "64", "--repeats", "2"]
    mode = ["--cold"] if cold else ["--stream", "12"]
    monkeypatch.setattr(sys, "argv", ["bench_read_path.py", *args, *mode])
    bench.main()  # a deliverable run that hands out fewer samples than it published raises
    out = capsys.readouterr().out
    assert "slots / plain, per repeat:" in out
    assert ("slots / hinted, per repeat:" in out) == cold
    assert "to its first micro-batch: get" in out
