"""The session broker's testcontainers mode when it cannot run: in CI it fails, never skips; locally it
skips with the commands that set it up; tests with a native broker of their own skip with a reason.

Each case is a pytest subprocess against an engine socket that does not exist (no engine needed).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ON_SESSION_BROKER = "tests/integration/test_data_plane.py::test_existing_topics_of_another_shape_are_refused"
OWN_BROKER = "tests/integration/test_broker.py::test_detached_broker_starts_reports_and_stops"


def _pytest(
    tmp_path: Path, *args: str, ci: bool, mode: str = "testcontainers"
) -> subprocess.CompletedProcess[str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("CI", "KAFKA_TEST_REQUIRED", "KAFKA_BOOTSTRAP_SERVERS")
    }
    env.update(SPECSTREAM_TEST_BROKER=mode, DOCKER_HOST=f"unix://{tmp_path}/no-engine.sock")
    if ci:
        env["KAFKA_TEST_REQUIRED"] = "1"
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rs", "-q", *args]
    return subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_in_ci_an_unreachable_engine_fails_the_session_broker(tmp_path: Path) -> None:
    proc = _pytest(tmp_path, ON_SESSION_BROKER, ci=True)
    assert proc.returncode == 1, proc.stdout
    assert "no container engine answers" in proc.stdout and "infra/engine.sh start" in proc.stdout
    assert "1 error" in proc.stdout and "skipped" not in proc.stdout


def test_off_ci_it_skips_and_own_broker_tests_skip_with_their_reason(tmp_path: Path) -> None:
    proc = _pytest(tmp_path, ON_SESSION_BROKER, OWN_BROKER, ci=False)
    assert proc.returncode == 0, proc.stdout
    assert "2 skipped" in proc.stdout
    assert "no container engine answers" in proc.stdout
    assert "starts its own native LocalKafka" in proc.stdout


def test_an_unknown_mode_is_a_usage_error(tmp_path: Path) -> None:
    proc = _pytest(tmp_path, ON_SESSION_BROKER, ci=False, mode="dockr")
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert "SPECSTREAM_TEST_BROKER='dockr'" in proc.stdout + proc.stderr
