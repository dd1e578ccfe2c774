"""``specstream topics delete``: a run's Kafka state removed, refused while a process of it lives.

A run's state on the broker is its topics (its own, its eval and regeneration sub-runs', one
ledger per trainer group) and its consumer groups, whose committed offsets carry the source's and
the generators' counts. Deleting the topics without the groups would leave counts that a later
run under the same id would resume from; deleting both makes the id new again. The features on
storage are not touched (``storage.retention`` and ``specstream sweep`` own them), and without
the samples topic the run can no longer be replayed, audited or trained for more epochs: the
command lists what it would delete and deletes only with ``--yes``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from pipeline.app.config import RunConfig
from pipeline.app.config_groups import group_names
from pipeline.app.run_state import alive
from pipeline.core.errors import OptionError
from pipeline.core.heartbeat import process_key, read_heartbeats
from pipeline.core.topics import RunTopics
from pipeline.transport.kafka import KafkaAdmin, KafkaSettings

__all__ = ("RunKafkaState", "run_kafka_state", "delete_run_kafka_state")


@dataclass(frozen=True)
class RunKafkaState:
    """The run's topics and consumer groups that exist on the broker."""

    topics: list[str]
    groups: list[str]


def _names(config: RunConfig) -> tuple[list[str], list[str]]:
    """Every topic and group the run may own, whether or not it exists."""
    run = RunTopics(config.run_id)
    topics, groups = [], []
    for sub in (run, run.eval, run.regen):
        topics += sub.all()
        groups += [sub.source_group, sub.generator_group, sub.trainer_group]
    for name in group_names(config):
        if name is not None:
            topics.append(RunTopics(config.run_id, name).ledger)
            groups.append(RunTopics(config.run_id, name).trainer_group)
    return topics, groups


def run_kafka_state(admin: KafkaAdmin, config: RunConfig) -> RunKafkaState:
    """What of the run is on the broker now."""
    topics, groups = _names(config)
    have_topics, have_groups = admin.topics(), admin.group_ids()
    return RunKafkaState([t for t in topics if t in have_topics], [g for g in groups if g in have_groups])


def delete_run_kafka_state(settings: KafkaSettings, config: RunConfig, *, force: bool = False) -> RunKafkaState:
    """Delete the run's topics and groups; refused while a process of it is alive (``force``: anyway)."""
    now = time.time()
    live = [process_key(b.role, b.id) for b in read_heartbeats(settings, config.run_id).values() if alive(b, now)]
    if live and not force:
        raise OptionError(
            "--force", f"not given, and run {config.run_id} is still running ({', '.join(sorted(live))} alive)",
            "stop its processes first, or add --force to delete under them",
        )  # fmt: skip
    with KafkaAdmin(settings) as admin:
        state = run_kafka_state(admin, config)
        admin.delete_groups(state.groups)
        admin.delete_topics(state.topics)
    return state
