"""``specstream topics apply``: bring a run's topics to what its config's ``topics`` section says.

Idempotent: it creates the topics that are missing (as ``claim_run`` would), sets the configs of
existing ones that differ (incrementally: other configs stay), and reports each change in one
line; the eval sub-run's topics too, when the config has an eval set. What Kafka cannot change in
place is refused or reported, never half done: a different partition count (a run's partitioning
is fixed; Kafka cannot decrease partitions) is one error line, and a different replication factor
is reported with the tool that changes it.
"""

from __future__ import annotations

from pipeline.app.config import RunConfig
from pipeline.app.config_budget import regenerates
from pipeline.app.config_groups import topic_policy
from pipeline.core.topic_plan import config_changes, run_topic_plan
from pipeline.core.topics import RunTopics
from pipeline.transport.kafka import KafkaAdmin

__all__ = ("apply_run_topics",)


def apply_run_topics(admin: KafkaAdmin, config: RunConfig) -> list[str]:
    """Create or alter the run's topics; one line per change (empty: nothing to change)."""
    topics, policy = RunTopics(config.run_id), topic_policy(config)
    plan = run_topic_plan(topics, config.data.partitions, policy)
    if config.data.eval_path:  # the held-out set's sub-run: one partition of each
        plan.update(run_topic_plan(topics.eval, 1, policy))
    if regenerates(config):  # later epochs under a storage budget: the regeneration sub-run
        plan.update(run_topic_plan(topics.regen, config.data.partitions, policy))
    created = set(admin.ensure_topics(plan))  # refuses another partition count, creates the rest
    lines = []
    for name, spec in plan.items():
        if name in created:
            replicas = spec.replication_factor or "the broker's default"
            lines.append(f"created {name}: {spec.partitions} partitions, replicas {replicas}")
            continue
        changes = config_changes(spec.configs, admin.topic_configs(name, spec.configs))
        if changes:
            admin.alter_topic_configs(name, {key: wanted for key, (_, wanted) in changes.items()})
            lines.extend(f"altered {name}: {key} {now} -> {wanted}" for key, (now, wanted) in changes.items())
        have = admin.replication_factor(name)
        if spec.replication_factor is not None and have != spec.replication_factor:
            lines.append(
                f"kept {name}: replicas {have}, not {spec.replication_factor} (Kafka changes replicas only by "
                "partition reassignment: `specstream broker tools kafka-reassign-partitions`)"
            )
    return lines
