"""What a run's topics should look like on the broker: partitions, replicas and topic configs.

One function, :func:`run_topic_plan`, says it for every topic of a run, from a Kafka-agnostic
:class:`TopicPolicy` (the ``topics`` section of the run config). ``claim_run`` creates missing
topics from it, and ``specstream topics apply`` also brings existing topics' configs to it
(:func:`config_changes`). The default policy is what a run has always had: every data topic
keeps everything (replay and more epochs read it back), the manifest and the heartbeats are
compacted, records up to ``MAX_RECORD_BYTES``, replicas as the broker's default.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from pipeline.core.heartbeat import HEARTBEAT_TOPIC_CONFIG
from pipeline.core.topics import MAX_RECORD_BYTES, RunTopics

__all__ = ("TopicPolicy", "TopicSpec", "run_topic_plan", "config_changes")


@dataclass(frozen=True)
class TopicPolicy:
    """Replication, durability and retention of a run's topics (None: the broker's default).

    Retention is Kafka's: ``-1`` keeps everything; bytes are per partition (``retention.bytes``).
    """

    replication_factor: int | None = None
    min_insync_replicas: int | None = None
    max_message_bytes: int = MAX_RECORD_BYTES
    samples_retention_ms: int = -1
    samples_retention_bytes: int = -1
    prompts_retention_ms: int = -1
    prompts_retention_bytes: int = -1
    trainer_groups: tuple[str, ...] = ()  # each declared trainer group has its own ledger topic


@dataclass(frozen=True)
class TopicSpec:
    """One topic as it should be: partitions, replicas (None: broker default) and its configs."""

    partitions: int
    configs: Mapping[str, str] = field(default_factory=dict)
    replication_factor: int | None = None


def run_topic_plan(topics: RunTopics, partitions: int, policy: TopicPolicy | None = None) -> dict[str, TopicSpec]:
    """Every topic of the run, by name: what ``claim_run`` creates and ``topics apply`` enforces."""
    p = policy or TopicPolicy()
    common = {"max.message.bytes": str(p.max_message_bytes)}
    if p.min_insync_replicas is not None:
        common["min.insync.replicas"] = str(p.min_insync_replicas)
    keep = {"retention.ms": "-1", **common}

    def retained(ms: int, nbytes: int) -> dict[str, str]:
        return {**common, "retention.ms": str(ms), "retention.bytes": str(nbytes)}

    def spec(n: int, configs: Mapping[str, str]) -> TopicSpec:
        return TopicSpec(n, dict(configs), p.replication_factor)

    return {
        topics.prompts: spec(partitions, retained(p.prompts_retention_ms, p.prompts_retention_bytes)),
        topics.samples: spec(partitions, retained(p.samples_retention_ms, p.samples_retention_bytes)),
        topics.ledger: spec(1, keep),
        topics.dlq: spec(1, keep),
        topics.manifest: spec(1, {"cleanup.policy": "compact", **keep}),
        topics.heartbeats: spec(1, {**common, **HEARTBEAT_TOPIC_CONFIG}),
        **{RunTopics(topics.run_id, group).ledger: spec(1, keep) for group in p.trainer_groups},
    }


def config_changes(
    wanted: Mapping[str, str], current: Mapping[str, str | None]
) -> dict[str, tuple[str | None, str]]:
    """The configs whose current value differs from the wanted one: ``key -> (now, wanted)``.

    ``current`` holds the topic's effective values (a key missing there is unknown: it changes).
    """
    return {k: (current.get(k), v) for k, v in sorted(wanted.items()) if current.get(k) != v}
