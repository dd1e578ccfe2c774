"""The run-state rules of `specstream status`, and heartbeats through the in-process broker."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from pipeline.app.config_file import parse_config
from pipeline.app.run_state import decide_run_state
from pipeline.app.runtime import build_online_run
from pipeline.app.status import render_status, run_status
from pipeline.core.heartbeat import HeartbeatPublisher, read_heartbeats
from pipeline.core.messages import Heartbeat
from pipeline.core.topics import RunTopics
from pipeline.devkit.chats import markov_conversations, write_jsonl
from pipeline.devkit.target import TINY_AUX_LAYER_IDS
from pipeline.transport.memory import MemoryBroker

NOW = 1_000.0


def beat(
    role: str, id_: str, state: str, at: float, *, reason: str = "", interval: float = 5.0, **counters
) -> Heartbeat:
    return Heartbeat(
        run_id="r", role=role, id=id_, host="h", pid=1, state=state, reason=reason, counters=counters,
        interval_s=interval, started_at=0.0, created_at=at,
    )  # fmt: skip


def test_no_heartbeats_is_unknown() -> None:
    assert decide_run_state([], now=NOW, lag=3).state == "unknown"


def test_live_processes_are_running_and_paused_generators_are_noted() -> None:
    state = decide_run_state(
        [beat("generator", "g0", "paused", NOW - 1, reason="backpressure"), beat("trainer", "rank-0", "running", NOW - 2)],
        now=NOW, lag=10,
    )  # fmt: skip
    assert state.state == "running" and "1 generators paused" in state.reason


def test_a_trainer_silent_for_three_intervals_with_lag_is_a_stall() -> None:
    gen = beat("generator", "g0", "paused", NOW - 1)
    trainer = beat("trainer", "rank-0", "running", NOW - 16)  # 3 x 5 s + 1
    stalled = decide_run_state([gen, trainer], now=NOW, lag=4)
    assert (
        stalled.state == "stalled" and stalled.since == NOW - 16 and "trainer/rank-0 silent" in stalled.reason
    )
    # the same silence with nothing to train is no stall (the generators are still working)
    assert decide_run_state([gen, trainer], now=NOW, lag=0).state == "running"
    # just within three intervals: alive
    assert (
        decide_run_state([gen, beat("trainer", "rank-0", "running", NOW - 14)], now=NOW, lag=4).state
        == "running"
    )


def test_no_process_alive_is_a_stall_since_the_newest_heartbeat() -> None:
    state = decide_run_state(
        [beat("source", "source", "finished", NOW - 100), beat("generator", "g0", "running", NOW - 60)],
        now=NOW,
        lag=0,
    )
    assert state.state == "stalled" and state.since == NOW - 60 and "generator/g0" in state.reason


def test_finished_trainers_finish_the_run_with_the_summary() -> None:
    state = decide_run_state(
        [
            beat("generator", "g0", "finished", NOW - 50),
            beat("trainer", "rank-0", "finished", NOW - 10, prompts=48, trained=48, missing=0, duplicates=0),
            beat("trainer", "rank-1", "finished", NOW - 11, step=6),
        ],
        now=NOW, lag=0,
    )  # fmt: skip
    assert state.state == "finished" and state.since == NOW - 10 and state.summary["trained"] == 48


def test_a_trainer_stopped_at_max_steps_is_stopped_not_stalled() -> None:
    state = decide_run_state(
        [beat("generator", "g0", "paused", NOW - 1), beat("trainer", "rank-0", "stopped", NOW - 30, reason="max_steps")],
        now=NOW, lag=11,
    )  # fmt: skip
    assert state.state == "stopped" and "max_steps" in state.reason


def test_a_failed_process_fails_the_run_with_its_reason() -> None:
    state = decide_run_state(
        [beat("generator", "g0", "failed", NOW - 5, reason="StreamError: boom"), beat("trainer", "rank-0", "running", NOW)],
        now=NOW, lag=1,
    )  # fmt: skip
    assert state.state == "failed" and state.reason == "generator/g0: StreamError: boom"


def test_a_failed_generator_replaced_by_another_is_a_run_going_on() -> None:
    crashed = beat("generator", "host-1", "failed", NOW - 60, reason="OSError: disk")
    replacement = beat("generator", "host-2", "running", NOW)
    state = decide_run_state([crashed, replacement, beat("trainer", "rank-0", "running", NOW)], now=NOW, lag=1)
    assert state.state == "running"
    done = decide_run_state(
        [crashed, beat("generator", "host-2", "finished", NOW - 2), beat("trainer", "rank-0", "finished", NOW)],
        now=NOW, lag=0,
    )  # fmt: skip
    assert done.state == "finished"
    silent = beat("generator", "host-2", "running", NOW - 50)  # heard after the failure, but dead since
    assert decide_run_state([crashed, silent, beat("trainer", "rank-0", "running", NOW)], now=NOW, lag=1).state == "failed"


def test_heartbeats_through_the_in_process_broker() -> None:
    broker = MemoryBroker()
    broker.admin().ensure_run_topics(RunTopics("r"), 2)
    count = {"n": 0}
    publisher = HeartbeatPublisher(broker, "r", "generator", "g0", 0.05, lambda: {"refs": count["n"]})
    stop = threading.Event()
    with publisher.lifetime(stop):
        publisher.set_state("paused", "backpressure: backlog 8 >= cap 8")
        count["n"] = 3
        deadline = time.monotonic() + 10
        while (b := read_heartbeats(broker, "r").get("generator/g0")) is None or b.state != "paused":
            assert time.monotonic() < deadline, "no paused heartbeat within 10 s"
        assert b.reason.startswith("backpressure") and b.interval_s == 0.05
    final = read_heartbeats(broker, "r")["generator/g0"]
    assert final.state == "finished" and final.counters == {"refs": 3}


def test_a_stage_that_raises_leaves_a_failed_heartbeat_and_the_topic_is_made_when_missing() -> None:
    broker = MemoryBroker()  # no run topics yet: the publisher creates its own topic
    publisher = HeartbeatPublisher(broker, "r", "trainer", "rank-0", 10.0)
    with pytest.raises(ValueError), publisher.lifetime():
        raise ValueError("no data\nsecond line")
    assert read_heartbeats(broker, "r")["trainer/rank-0"].reason == "ValueError: no data"


def test_a_disabled_heartbeat_publishes_nothing() -> None:
    broker = MemoryBroker()
    with HeartbeatPublisher(broker, "r", "source", "source", None).lifetime():
        pass
    assert read_heartbeats(broker, "r") == {}


def test_the_single_process_run_leaves_a_finished_heartbeat_per_stage(
    tmp_path: Path, tiny_target_dir: Path
) -> None:
    """`specstream run` on the in-process transport: the source, each generator thread and the
    trainer beat, and their final heartbeats tell status the run finished, with its accounting."""
    data = tmp_path / "data.jsonl"
    write_jsonl(markov_conversations(16, seed=2), str(data))
    config = parse_config(
        {
            "run_id": "beats", "broker": {"bootstrap_servers": "memory"},
            "storage": {"root": str(tmp_path / "features")},
            "data": {"path": str(data), "max_length": 128, "partitions": 2},
            "target": {"backend": "hf", "model": str(tiny_target_dir), "aux_layer_ids": list(TINY_AUX_LAYER_IDS)},
            "generate": {"workers": 2, "high_watermark": 16, "low_watermark": 8},
            "train": {"batch_size": 2, "ttt_steps": 2, "draft_vocab_size": 64, "prefetch": 2,
                      "output_dir": str(tmp_path / "out")},
            "monitor": {"heartbeat_interval_s": 0.2},
        }
    )  # fmt: skip
    run = build_online_run(config)
    result = run.run()
    assert result.reason == "end_of_stream"
    status = run_status(run.transport, "beats")
    assert {(b.role, b.id, b.state) for b in status.processes} == {
        ("source", "source", "finished"), ("generator", "beats-gen-0", "finished"),
        ("generator", "beats-gen-1", "finished"), ("trainer", "rank-0", "finished"),
    }  # fmt: skip
    assert status.state.state == "finished" and status.state.summary["trained"] == 16
    assert status.state.summary["step"] == result.steps
    shown = render_status(status)
    print(shown)
    assert "state: finished at" in shown and "16 of 16 prompts trained" in shown
