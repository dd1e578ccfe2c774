"""The benchmarks' shared harness (benchmarks/_stats.py): fair order, paired ratios, clean scratch."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.transport.broker import env_or_local_broker
from tests.benchmarks.modules import BENCHMARKS, benchmark_module

def _stats():
    return benchmark_module("_stats")


def test_sides_alternate_in_rotated_order_after_warmup() -> None:
    stats = _stats()
    calls: list[str] = []

    def side(name: str, value: float):
        return lambda: calls.append(name) or {"s": value}

    results = stats.alternate({"a": side("a", 2.0), "b": side("b", 1.0), "c": side("c", 4.0)}, 3, warmup=1)
    assert calls == ["a", "b", "c", "a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert [r["s"] for r in results["a"]] == [2.0, 2.0, 2.0]
    assert stats.ratios(results, "b", "a", "s") == [0.5, 0.5, 0.5]
    assert stats.spread([3.0, 1.0, 2.0]) == (1.0, 2.0, 3.0)
    assert "median 2.00 (1.00 - 3.00, 3 runs)" == stats.fmt_spread([3.0, 1.0, 2.0])


def test_machine_load_names_the_cpus() -> None:
    assert "CPUs" in _stats().machine_load()


def test_scratch_is_removed_even_on_error(tmp_path: Path) -> None:
    stats = _stats()
    with pytest.raises(RuntimeError), stats.scratch("bench-x-") as work:
        (work / "f").write_bytes(b"x" * 10)
        raise RuntimeError("boom")
    assert not work.exists()


@pytest.mark.integration
@pytest.mark.slow
def test_throwaway_broker_leaves_nothing_in_tmpdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    with env_or_local_broker() as bootstrap:
        assert bootstrap
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith("specstream-kafka-")]
    assert list(tmp_path.iterdir()) == []


def test_sigterm_still_removes_the_scratch_directory(tmp_path: Path) -> None:
    script = (
        "import sys, time; sys.path.insert(0, sys.argv[1]); from _stats import scratch, session\n"
        "with session('t'), scratch('bench-term-') as work:\n"
        "    print(work, flush=True); time.sleep(60)\n"
    )
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(BENCHMARKS)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout is not None
        proc.stdout.readline(), proc.stdout.readline()  # the title, the load
        work = Path(proc.stdout.readline().strip())
        assert work.is_dir()
        proc.terminate()
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        proc.kill()
    assert not work.exists()
