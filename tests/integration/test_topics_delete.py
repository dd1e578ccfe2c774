"""``specstream topics delete`` on the real broker: it lists, refuses a live run, then deletes the
run's topics and consumer groups, so the run id starts fresh; a run resuming from checkpoints of
the deleted topics is refused before it re-creates them."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import yaml

from pipeline.app.config_file import load_config
from pipeline.app.manifest import claim_run
from pipeline.core.heartbeat import HeartbeatPublisher, read_heartbeats
from pipeline.core.topics import RunTopics
from pipeline.transport.kafka import KafkaAdmin, KafkaSettings, PartitionReader
from tests.integration.test_runtime import write_config
from tests.support import one_error, spawn, wait_exit

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _delete(config: Path, *flags: str) -> tuple[int, str]:
    return wait_exit(spawn(["topics", "delete", "--config", str(config), *flags]), timeout_s=120)


def test_delete_lists_refuses_a_live_run_then_deletes_topics_and_groups(
    tmp_path: Path, kafka: KafkaSettings, kafka_bootstrap: str, run_id: str
) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "run_id": run_id, "broker": {"bootstrap_servers": kafka_bootstrap},
        "storage": {"root": str(tmp_path / "features")}, "target": {"backend": "synthetic"},
        "data": {"path": str(tmp_path / "chats.jsonl"), "partitions": 2, "eval_path": str(tmp_path / "eval.jsonl")},
    }))  # fmt: skip
    topics = RunTopics(run_id)
    code, out = wait_exit(spawn(["topics", "apply", "--config", str(config)]), timeout_s=120)
    assert code == 0, out
    generators = PartitionReader(kafka, topics.prompts, partitions=[0], group_id=topics.generator_group)
    generators.commit({0: 0}, "counts")  # what the generators' group holds: their counts
    generators.close()
    run_topics = [*topics.all(), *topics.eval.all()]
    try:
        code, out = _delete(config)
        assert code == 0, out
        listed = [line.split()[-1] for line in out.splitlines() if line.startswith("would delete topic ")]
        assert sorted(listed) == sorted(run_topics), out
        assert f"would delete group {topics.generator_group}" in out and "nothing deleted (add --yes)" in out, out

        stop = threading.Event()
        with HeartbeatPublisher(kafka, run_id, "generator", "g0", 0.5).lifetime(stop):
            deadline = time.monotonic() + 60
            while "generator/g0" not in read_heartbeats(kafka, run_id, timeout_s=10):
                assert time.monotonic() < deadline, "no heartbeat within 60 s"
            code, out = _delete(config, "--yes")
            assert code == 2, out
            assert "--force" in one_error(out) and "generator/g0 alive" in one_error(out), out
            with KafkaAdmin(kafka) as admin:
                assert set(run_topics) <= admin.topics() and topics.generator_group in admin.group_ids()
            stop.set()

        code, out = _delete(config, "--yes")  # its final heartbeat says it stopped: nothing alive
        assert code == 0, out
        assert f"deleted topic {topics.samples}" in out and f"deleted group {topics.generator_group}" in out, out
        assert "checkpoints" in out.splitlines()[-1] and "before a new run under this id" in out, out
        with KafkaAdmin(kafka) as admin:
            assert not set(run_topics) & admin.topics()
            assert topics.generator_group not in admin.group_ids()
        code, out = _delete(config)
        assert code == 0 and f"run {run_id}: nothing on the broker" in out, out
        claim_run(kafka, load_config(config))  # the id is free again: a new run claims it
    finally:
        with KafkaAdmin(kafka) as admin:
            admin.delete_topics(run_topics)


def test_a_run_whose_topics_were_deleted_is_refused_before_it_re_creates_them(
    tmp_path: Path, kafka: KafkaSettings, run_id: str, tiny_target_dir: Path
) -> None:
    """A finished run, its topics deleted, its checkpoints kept: the same command says why it
    cannot resume, in one line, before the source re-creates a topic or publishes a prompt."""
    config = write_config(tmp_path, kafka, run_id, tiny_target_dir, conversations=16, data={"partitions": 2})
    code, out = wait_exit(spawn(["run", "--config", str(config)]), timeout_s=300)
    assert code == 0 and "16 of 16 prompts trained" in out, out
    code, out = _delete(config, "--yes")
    assert code == 0, out
    code, out = wait_exit(spawn(["run", "--config", str(config)]), timeout_s=120)
    assert code == 2, out
    line = one_error(out)
    assert f"{RunTopics(run_id).samples} (topic id" in line and "is gone (deleted)" in line, line
    assert "Move or remove the checkpoints" in line, line
    with KafkaAdmin(kafka) as admin:
        assert not {*RunTopics(run_id).all()} & admin.topics()  # nothing re-created, nothing published
