"""`specstream status --json` through a run's life, with every stage its own process on the broker.

The source runs to its end; a generator alone fills the backlog to the high watermark and its
heartbeat says paused by backpressure (and its log says so); a trainer joins and both show
running; SIGKILL of the trainer leaves the generator held and the run stalled, the trainer's
last-seen age growing; a second trainer resumes and the run ends finished with the summary.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pipeline.app.status import run_status
from pipeline.transport.kafka import KafkaSettings
from tests.faults.harness import stage
from tests.integration.test_runtime import write_config
from tests.support import spawn, wait_exit, wait_for_output

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CONVERSATIONS = 64
INTERVAL_S = 0.5


def status_json(config: Path) -> dict[str, Any]:
    """``specstream status --config CONFIG --json``, as a script reads it."""
    code, out = wait_exit(spawn(["status", "--config", str(config), "--json"]), timeout_s=60)
    assert code == 0, out
    return json.loads(out[out.index("{") :])


def poll(kafka: KafkaSettings, run_id: str, until: Callable[[dict[str, Any]], bool], what: str,
         timeout_s: float = 90.0) -> dict[str, Any]:  # fmt: skip
    """The status view (the dict ``--json`` prints) once ``until`` holds, read every half second."""
    deadline = time.monotonic() + timeout_s
    view: dict[str, Any] = {}
    while time.monotonic() < deadline:
        view = run_status(kafka, run_id).to_json()
        if until(view):
            return view
        time.sleep(0.5)  # polling the broker's view, bounded by the deadline
    raise AssertionError(
        f"status never showed {what} in {timeout_s:.0f} s: {json.dumps(view, indent=1)[-4000:]}"
    )


def process(view: dict[str, Any], role: str, id_: str | None = None) -> dict[str, Any] | None:
    return next((p for p in view["processes"] if p["role"] == role and id_ in (None, p["id"])), None)


def test_status_shows_paused_running_stalled_and_finished(
    kafka: KafkaSettings, run_id: str, tmp_path: Path, tiny_target_dir: Path
) -> None:
    config = write_config(
        tmp_path, kafka, run_id, tiny_target_dir, conversations=CONVERSATIONS,
        data={"partitions": 2}, generate={"high_watermark": 8, "low_watermark": 6},
        train={"prefetch": 1, "save_interval": 4}, monitor={"heartbeat_interval_s": INTERVAL_S},
    )  # fmt: skip
    code, out = wait_exit(stage("source", config), timeout_s=180)
    assert code == 0, out
    generator = stage("generate", config, "--worker-id", "g0", "--verbose")
    trainers: list[subprocess.Popen[str]] = []
    try:
        # 1. no trainer yet: the generator fills the backlog to the watermark and pauses
        wait_for_output(generator, r"g0: backpressure pauses prompt partitions", timeout_s=120)
        paused = status_json(config)
        gen = process(paused, "generator", "g0")
        assert gen is not None and gen["state"] == "paused" and gen["alive"], paused
        assert gen["reason"].startswith("backpressure: backlog") and "high watermark 8" in gen["reason"], gen
        assert paused["state"] == "running" and paused["lag"] >= 8, paused
        assert paused["prompts"] == {"total": CONVERSATIONS, "source_ended": True, "trained": 0}
        assert process(paused, "source")["state"] == "finished"  # type: ignore[index]

        # 2. a trainer joins: both are live, the run runs
        trainers.append(stage("train", config))
        running = poll(
            kafka, run_id,
            lambda v: (t := process(v, "trainer")) is not None and t["alive"] and t["state"] == "running"
            and t["counters"].get("step", 0) >= 1 and process(v, "generator", "g0")["alive"],  # type: ignore[index]
            "a live trainer that has stepped beside a live generator",
        )  # fmt: skip
        assert running["state"] == "running", running

        # 3. SIGKILL of the trainer: silent, the backlog waits, the run is stalled
        trainers[0].send_signal(signal.SIGKILL)
        wait_exit(trainers[0], timeout_s=30)
        stalled = poll(kafka, run_id, lambda v: v["state"] == "stalled", "a stalled run", timeout_s=60)
        assert "trainer/rank-0 silent" in stalled["reason"] and stalled["lag"] > 0, stalled
        first = status_json(config)
        assert first["state"] == "stalled", first
        second = poll(
            kafka, run_id,
            lambda v: process(v, "trainer")["age_s"] > process(first, "trainer")["age_s"] + 1,  # type: ignore[index]
            "the trainer's age growing", timeout_s=30,
        )  # fmt: skip
        assert second["state"] == "stalled" and not process(second, "trainer")["alive"], second  # type: ignore[index]
        assert process(second, "generator", "g0")["alive"], second  # type: ignore[index]

        # 4. the same command resumes the trainer; the run ends finished with its accounting
        trainers.append(stage("train", config))
        code, out = wait_exit(trainers[1], timeout_s=240)
        assert code == 0, out[-4000:]
        code, out = wait_exit(generator, timeout_s=60)
        assert code == 0, out[-4000:]
        assert "backpressure resumes prompt partitions" in out, out[-4000:]
        done = status_json(config)
        assert done["state"] == "finished", done
        summary = done["summary"]
        assert (summary["prompts"], summary["trained"] + summary["tail"]) == (CONVERSATIONS, CONVERSATIONS), (
            summary
        )
        assert summary["missing"] == summary["duplicates"] == 0, summary
        assert {p["state"] for p in done["processes"]} == {"finished"}, done["processes"]
        assert done["lag"] == 0 and done["eta_s"] is None, done

        # 5. --watch, not on a terminal: one plain view after another until Ctrl-C, which exits 0
        watch = spawn(["status", "--config", str(config), "--watch", "--interval", "0.5"])
        trainers.append(watch)
        wait_for_output(watch, r"^state: finished at", timeout_s=60)
        wait_for_output(watch, r"^state: finished at", timeout_s=30)
        watch.send_signal(signal.SIGINT)
        code, out = wait_exit(watch, timeout_s=30)
        assert code == 0, out[-4000:]
    finally:
        for proc in (generator, *trainers):
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
