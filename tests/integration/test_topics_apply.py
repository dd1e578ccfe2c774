"""``specstream topics apply`` on the real broker: create, alter, idempotence, and what it refuses.

The session broker has one node, so replication factor 1 is what can be created here; asking
for 3 must fail with one line naming ``topics.replication_factor``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.app.config_file import load_config
from pipeline.app.manifest import claim_run
from pipeline.core.topics import RunTopics
from pipeline.transport.kafka import KafkaAdmin, KafkaSettings
from tests.support import one_error, spawn, wait_exit

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _config(
    tmp_path: Path, run_id: str, bootstrap: str, topics: dict[str, object], partitions: int = 2, eval_set: bool = False
) -> Path:
    path = tmp_path / f"{run_id}-{len(list(tmp_path.glob('*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump({
        "run_id": run_id,
        "broker": {"bootstrap_servers": bootstrap},
        "storage": {"root": str(tmp_path / "features")},
        "data": {"path": str(tmp_path / "chats.jsonl"), "partitions": partitions,
                 "eval_path": str(tmp_path / "eval.jsonl") if eval_set else None},
        "target": {"backend": "synthetic"},
        "topics": topics,
    }))  # fmt: skip
    return path


def _apply(config: Path) -> tuple[int, str]:
    return wait_exit(spawn(["topics", "apply", "--config", str(config)]), timeout_s=120)


def test_apply_creates_then_alters_then_changes_nothing(
    tmp_path: Path, kafka: KafkaSettings, kafka_bootstrap: str, run_id: str
) -> None:
    topics = RunTopics(run_id)
    try:
        first = _config(tmp_path, run_id, kafka_bootstrap, {"replication_factor": 1, "min_insync_replicas": 1})
        code, out = _apply(first)
        assert code == 0, out
        assert sum(line.startswith("created ") for line in out.splitlines()) == 6, out
        with KafkaAdmin(kafka) as admin:
            assert admin.replication_factor(topics.samples) == 1
            assert admin.partition_count(topics.samples) == 2
            assert admin.topic_configs(topics.manifest, ["cleanup.policy"]) == {"cleanup.policy": "compact"}
            assert admin.topic_configs(topics.heartbeats, ["cleanup.policy"]) == {"cleanup.policy": "compact"}
            assert admin.topic_configs(topics.samples, ["retention.ms"]) == {"retention.ms": "-1"}

        week, gib = 7 * 24 * 3600 * 1000, 1 << 30
        second = _config(tmp_path, run_id, kafka_bootstrap, {
            "replication_factor": 1, "min_insync_replicas": 1, "samples_retention_ms": week,
            "samples_retention_bytes": gib, "max_message_bytes": 2 << 20,
        })  # fmt: skip
        code, out = _apply(second)
        assert code == 0, out
        assert f"altered {topics.samples}: retention.ms -1 -> {week}" in out, out
        assert f"altered {topics.samples}: retention.bytes -1 -> {gib}" in out, out
        assert f"altered {topics.ledger}: max.message.bytes {8 << 20} -> {2 << 20}" in out, out
        with KafkaAdmin(kafka) as admin:
            assert admin.topic_configs(topics.samples, ["retention.ms", "retention.bytes", "max.message.bytes"]) == {
                "retention.ms": str(week), "retention.bytes": str(gib), "max.message.bytes": str(2 << 20)}
            # incremental: what apply did not name stays (the heartbeats' compaction settings)
            assert admin.topic_configs(topics.heartbeats, ["cleanup.policy", "segment.ms"]) == {
                "cleanup.policy": "compact", "segment.ms": "600000"}

        code, out = _apply(second)
        assert code == 0, out
        assert out.strip().splitlines()[-1] == f"run {run_id}: topics already as configured", out

        # claim_run uses the same plan: an existing run's topics are accepted as they are
        claim_run(kafka, load_config(second))
    finally:
        with KafkaAdmin(kafka) as admin:
            admin.delete_topics(topics.all())


def test_apply_refuses_what_kafka_cannot_do_in_one_line(
    tmp_path: Path, kafka: KafkaSettings, kafka_bootstrap: str, run_id: str
) -> None:
    topics = RunTopics(run_id)
    try:
        code, out = _apply(_config(tmp_path, run_id, kafka_bootstrap, {"replication_factor": 3, "min_insync_replicas": 2}))
        assert code == 2, out
        line = one_error(out)
        assert "`topics.replication_factor`" in line and "3 replicas asked" in line and "1 broker(s)" in line, line
        with KafkaAdmin(kafka) as admin:
            assert not set(topics.all()) & admin.topics()  # nothing half created

        code, out = _apply(_config(tmp_path, run_id, kafka_bootstrap, {}, partitions=4, eval_set=True))
        assert code == 0 and f"created {topics.eval.prompts}: 1 partitions" in out, out
        assert sum(line.startswith("created ") for line in out.splitlines()) == 12, out  # the eval sub-run's too
        code, out = _apply(_config(tmp_path, run_id, kafka_bootstrap, {}, partitions=2))
        assert code == 2, out
        assert "Kafka cannot decrease a topic's partitions" in one_error(out), out
    finally:
        with KafkaAdmin(kafka) as admin:
            admin.delete_topics([*topics.all(), *topics.eval.all()])
