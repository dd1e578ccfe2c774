"""The data-plane benchmark's raw baseline (benchmarks/bench_dataplane.py): the same file, plainly."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import save

from tests.benchmarks.modules import benchmark_module


def test_the_raw_baseline_writes_the_very_file_from_the_tensors_memory_and_reads_it_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    benchmark_module("_stats")  # the script imports it as a sibling
    bench = benchmark_module("bench_dataplane")
    tensors = [bench.make_sample(16, 8, seed) for seed in range(3)]
    payloads = [save(t) for t in tensors]
    chunks = bench.raw_chunks(tensors[0], payloads[0])
    assert len(chunks) == 1 + len(tensors[0])  # the header, then each tensor's own memory
    monkeypatch.setattr(bench, "WRITE_PIECE", 7)  # many pieces a tensor, the last one short
    out = bench.row_raw(bench.Case(tensors, payloads, tmp_path, bootstrap="unused"))
    assert [(tmp_path / f"{i}.bin").read_bytes() for i in range(3)] == payloads
    assert 0 < out["write_s"] <= out["s"] and 0 < out["read_s"] <= out["s"]
