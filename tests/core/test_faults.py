"""Crash points: SIGKILL by default, another signal when named (SIGSTOP freezes, SIGCONT goes on)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from pipeline.core import faults
from tests.faults.harness import wait_stopped

PROGRAM = (
    "from pipeline.core.faults import crash_point\nfor _ in range(3): crash_point('p')\nprint('went on')"
)


def _run(spec: str) -> subprocess.Popen[str]:
    env = {**os.environ, faults.CRASH_ENV: spec}
    return subprocess.Popen([sys.executable, "-c", PROGRAM], env=env, stdout=subprocess.PIPE, text=True,
                            stderr=subprocess.STDOUT)  # fmt: skip


@pytest.mark.parametrize(
    ("spec", "expected"),
    [("a.b", ("a.b", 1, signal.SIGKILL)), ("a.b:3", ("a.b", 3, signal.SIGKILL)),
     ("a.b:2:SIGSTOP", ("a.b", 2, signal.SIGSTOP))],
)  # fmt: skip
def test_the_spec_names_the_point_the_hit_and_the_signal(monkeypatch, spec, expected) -> None:
    monkeypatch.setenv(faults.CRASH_ENV, spec)
    assert faults._target() == expected


def test_a_crash_point_kills_on_its_nth_hit() -> None:
    proc = _run("p:2")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL and "went on" not in out


def test_a_stop_point_freezes_the_process_until_it_is_continued() -> None:
    proc = _run("p:2:SIGSTOP")
    try:
        assert proc.stdout is not None and "crash point p (hit 2): SIGSTOP" in proc.stdout.readline()
        wait_stopped(proc.pid, timeout_s=30)
        proc.send_signal(signal.SIGCONT)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0 and "went on" in out
    finally:
        if proc.poll() is None:
            proc.kill()
