"""A broker that goes away mid-run: killed, stopped, or down longer than a transaction may stay open.

Each test owns a broker of its own (the session's is shared by every other test), runs
``specstream run`` against it as a user would, takes the broker away mid-run for a real outage
and brings it back on the same port with its data. The run must ride the outage out and end
``N of N prompts trained, 0 missing``, and ``specstream audit`` must find nothing lost and
nothing repeated. Past the outage budget a stage exits with one ``error:`` line, and the same
command then resumes exactly.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.core.topics import RunTopics
from pipeline.transport import background_broker
from pipeline.transport.broker import LocalKafka
from pipeline.transport.kafka import KafkaSettings
from tests.integration.test_runtime import write_config
from tests.support import one_error, read_messages, spawn, wait_exit

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.slow]

CONVERSATIONS = 160  # ~80 steps: the run is still training when the broker goes
OUTAGE_S = 30.0  # the fault itself: how long the broker stays down


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[LocalKafka]:
    """A broker for this test alone: it is killed and restarted over the same directory."""
    local = LocalKafka(tmp_path / "kafka", heap_mb=384)
    local.start()
    yield local
    local.stop()


def _take_down(local: LocalKafka, how: signal.Signals) -> None:
    assert local.proc is not None
    local.proc.send_signal(how)
    local.proc.wait(60)


def _wait_for_topic(settings: KafkaSettings, topic: str) -> None:
    deadline = time.monotonic() + 120
    with settings.admin() as admin:
        while topic not in admin.topics():  # the run creates its topics first thing
            assert time.monotonic() < deadline, f"{topic} not created in 120 s"
            time.sleep(0.2)  # polling the broker's topic list, bounded by the deadline


def _wait_for_steps(local: LocalKafka, run_id: str, steps: int) -> None:
    """Until the trainer has recorded ``steps`` optimizer steps in the run's ledger (bounded)."""
    settings, ledger = KafkaSettings(local.bootstrap), RunTopics(run_id).ledger
    _wait_for_topic(settings, ledger)
    read_messages(settings, ledger, [0], timeout_s=300,
                  until=lambda got: len(got) >= steps)  # fmt: skip


def _audit_clean(config: Path, prompts: int) -> None:
    code, audit = wait_exit(spawn(["audit", "--config", str(config), "--json"]), timeout_s=120)
    assert code == 0, audit
    report = json.loads(audit[audit.index("{") :])
    assert report["ok"] and report["lost"] == 0 and report["repeated"] == 0
    assert report["totals"]["trained_once"] == prompts


def _config(tmp_path: Path, local: LocalKafka, run_id: str, tiny_target_dir: Path, **sections: dict) -> Path:
    return write_config(
        tmp_path, KafkaSettings(local.bootstrap), run_id, tiny_target_dir, conversations=CONVERSATIONS,
        data={"partitions": 2}, train={"save_interval": 2, "prefetch": 1}, **sections,
    )  # fmt: skip


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_a_run_rides_out_a_broker_outage(own_broker, run_id, tmp_path, tiny_target_dir, how) -> None:
    """Down for 30 s mid-training (transactions 15 s: shorter than the outage), then back."""
    config = _config(tmp_path, own_broker, run_id, tiny_target_dir)
    run = spawn(["run", "--config", str(config)])
    try:
        _wait_for_steps(own_broker, run_id, 2)
        _take_down(own_broker, how)
        time.sleep(OUTAGE_S)  # the outage itself (the fault), not a synchronisation
        own_broker.start()
        code, out = wait_exit(run, timeout_s=420)
    finally:
        if run.poll() is None:
            run.kill()
    assert code == 0, out
    assert f"{CONVERSATIONS} of {CONVERSATIONS} prompts trained, 0 missing, 0 duplicates dropped" in out, out
    assert "Traceback" not in out, out
    _audit_clean(config, CONVERSATIONS)


def test_past_the_outage_budget_one_line_then_the_same_command_resumes(
    own_broker, run_id, tmp_path, tiny_target_dir
) -> None:
    config = _config(tmp_path, own_broker, run_id, tiny_target_dir, broker={"outage_budget_s": 10})
    run = spawn(["run", "--config", str(config)])
    try:
        _wait_for_steps(own_broker, run_id, 2)
        _take_down(own_broker, signal.SIGKILL)
        code, out = wait_exit(run, timeout_s=180)
    finally:
        if run.poll() is None:
            run.kill()
    assert code != 0
    assert "outage" in one_error(out) or "broker" in one_error(out)
    own_broker.start()
    code, out = wait_exit(spawn(["run", "--config", str(config)]), timeout_s=420)
    assert code == 0, out
    assert f"{CONVERSATIONS} of {CONVERSATIONS} prompts trained, 0 missing" in out, out
    _audit_clean(config, CONVERSATIONS)


def test_the_local_broker_stopped_and_started_mid_run(own_home, run_id, tmp_path, tiny_target_dir) -> None:
    """`specstream broker stop`, then `start`: the same address, the run's topics kept, the run goes on."""
    code, out = wait_exit(spawn(["broker", "start"]), timeout_s=180)
    assert code == 0, out
    state = background_broker.detached_status()
    assert state is not None
    config = write_config(
        tmp_path, KafkaSettings(state.bootstrap), run_id, tiny_target_dir, conversations=CONVERSATIONS,
        data={"partitions": 2}, train={"save_interval": 2, "prefetch": 1},
    )  # fmt: skip
    run = spawn(["run", "--config", str(config)])
    try:
        settings = KafkaSettings(state.bootstrap)
        _wait_for_topic(settings, RunTopics(run_id).ledger)
        read_messages(settings, RunTopics(run_id).ledger, [0], timeout_s=300, until=lambda got: len(got) >= 2)
        code, out = wait_exit(spawn(["broker", "stop"]), timeout_s=120)
        assert code == 0, out
        code, out = wait_exit(spawn(["broker", "start"]), timeout_s=180)
        assert code == 0, out
        restarted = background_broker.detached_status()
        assert restarted is not None and restarted.bootstrap == state.bootstrap
        code, out = wait_exit(run, timeout_s=420)
    finally:
        if run.poll() is None:
            run.kill()
    try:
        assert code == 0, out
        assert (
            f"{CONVERSATIONS} of {CONVERSATIONS} prompts trained, 0 missing, 0 duplicates dropped" in out
        ), out
        _audit_clean(config, CONVERSATIONS)
    finally:
        background_broker.stop_detached()
