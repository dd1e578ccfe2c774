"""The ``topics`` section: defaults keep a single-node run as it always was; impossible
durability settings stop at start with the key and the fix."""

from __future__ import annotations

from typing import Any

import pytest

from pipeline.app.config_file import parse_config
from pipeline.core.errors import ConfigError
from pipeline.core.heartbeat import HEARTBEAT_TOPIC_CONFIG
from pipeline.core.topic_plan import config_changes, run_topic_plan
from pipeline.core.topics import MAX_RECORD_BYTES, RunTopics

BASE: dict[str, Any] = {"run_id": "r1", "data": {"path": "x.jsonl"}, "target": {"backend": "synthetic"}}


def test_defaults_are_the_single_node_topics_of_before() -> None:
    cfg = parse_config(BASE)
    topics = RunTopics("r1")
    plan = run_topic_plan(topics, 4, cfg.topics.policy())
    assert {name: spec.partitions for name, spec in plan.items()} == {
        topics.prompts: 4, topics.samples: 4, topics.ledger: 1, topics.dlq: 1, topics.manifest: 1, topics.heartbeats: 1}
    assert all(spec.replication_factor is None for spec in plan.values())  # the broker's default
    assert plan[topics.samples].configs["retention.ms"] == "-1"
    assert plan[topics.manifest].configs["cleanup.policy"] == "compact"
    assert dict(HEARTBEAT_TOPIC_CONFIG).items() <= dict(plan[topics.heartbeats].configs).items()
    assert {spec.configs["max.message.bytes"] for spec in plan.values()} == {str(MAX_RECORD_BYTES)}
    assert all("min.insync.replicas" not in spec.configs for spec in plan.values())


def test_production_policy_reaches_every_topic() -> None:
    cfg = parse_config({**BASE, "topics": {"replication_factor": 3, "min_insync_replicas": 2,
                                           "samples_retention_ms": 86_400_000, "samples_retention_bytes": 1 << 30}})  # fmt: skip
    plan = run_topic_plan(RunTopics("r1"), 8, cfg.topics.policy())
    assert {spec.replication_factor for spec in plan.values()} == {3}
    assert {spec.configs["min.insync.replicas"] for spec in plan.values()} == {"2"}
    samples = plan["r1.samples"].configs
    assert (samples["retention.ms"], samples["retention.bytes"]) == ("86400000", str(1 << 30))
    assert plan["r1.prompts"].configs["retention.ms"] == "-1"
    assert config_changes(samples, {**samples, "retention.ms": "-1"}) == {"retention.ms": ("-1", "86400000")}


@pytest.mark.parametrize(
    ("topics", "key"),
    [
        ({"replication_factor": 2, "min_insync_replicas": 3}, "topics.min_insync_replicas"),
        ({"samples_retention_ms": 0}, "topics.samples_retention_ms"),
        ({"max_message_bytes": 1000}, "topics.max_message_bytes"),
        ({"replication_factr": 3}, "topics.replication_factr"),
    ],
)
def test_impossible_topic_settings_name_the_key(topics: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({**BASE, "topics": topics})
    assert caught.value.key == key, str(caught.value)
