"""The scale benchmark's smallest point in CI: real stage processes, a complete run, a clean audit.

``benchmarks/bench_scale.py --grid small`` on the session's broker (``KAFKA_BOOTSTRAP_SERVERS``):
one source, one generator and one trainer process; the run must train every prompt once, end on
its end of stream, pass ``specstream audit``, and leave nothing in its temp directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.transport.kafka import KafkaSettings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_scale.py"


def test_the_smallest_point_completes_with_a_clean_audit(kafka: KafkaSettings, tmp_path: Path) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    out = tmp_path / "scale.json"
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers, "TMPDIR": str(scratch)}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--grid", "small", "--json", str(out), "--timeout", "240"],
        env=env, check=False, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    [point] = json.loads(out.read_text())
    assert point["completed"] and point["eos"] and point["audit_ok"], point
    assert point["trained"] == "64 of 64 prompts trained, 0 missing", point
    assert point["first_step_s"] is not None and 0 < point["first_step_s"] < point["wall_s"], point
    assert point["generator_rss_mb"] > 0 and point["trainer_rss_mb"] > 0, point
    assert point["generators_pss_mb"] > 0 and point["trainers_pss_mb"] > 0, point
    assert "| p4 g1 r1 n64 | yes |" in proc.stdout, proc.stdout
    assert list(scratch.iterdir()) == [], "the benchmark left files in its temp directory"
