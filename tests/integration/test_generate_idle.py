"""A group-mode generator that owns no prompt partition says so, and says when it owns one again.

Two workers share a 1-partition run on the real broker: the group gives the partition to one, and
the other logs that it owns none of the 1 prompt partitions (once per idle stretch; both may say so
while the group's first join is under way). When the owner stops, the idle one takes the partition
and logs that it owns it again.
"""

from __future__ import annotations

import logging
import threading
import time

import pytest

from pipeline.core.topics import RunTopics
from pipeline.generate.config import GeneratorConfig
from pipeline.generate.synthetic import SyntheticTarget
from pipeline.generate.worker import GeneratorWorker
from pipeline.storage import FeatureStore
from pipeline.transport.kafka import KafkaAdmin, KafkaSettings

pytestmark = pytest.mark.integration

IDLE = "owns none of the 1 prompt partitions"


def _lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in list(caplog.records) if text in r.getMessage()]


def _open_report(caplog: pytest.LogCaptureFixture, name: str) -> bool:
    """Whether ``name`` reported owning nothing and has not owned a partition since."""
    return len(_lines(caplog, f"{name}: {IDLE}")) > len(_lines(caplog, f"{name}: owns prompt partitions"))


def _wait_for(condition, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    tick = threading.Event()  # never set: polling a condition with a deadline
    while not condition() and time.monotonic() < deadline:
        tick.wait(0.05)
    assert condition(), f"not within {timeout_s} s"


def test_an_idle_group_member_says_it_owns_no_partition_until_it_owns_one(
    kafka: KafkaSettings, run_id: str, storage_root: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pipeline.generate")
    topics = RunTopics(run_id)
    with KafkaAdmin(kafka) as admin:
        admin.ensure_run_topics(topics, 1)
    store = FeatureStore(storage_root, run_id, durable=False)
    stops = {name: threading.Event() for name in ("gen-a", "gen-b")}
    errors: list[BaseException] = []

    def run(name: str) -> None:
        config = GeneratorConfig(
            run_id=run_id, worker_id=name, batch_size=4, idle_report_s=0.5, session_timeout_ms=6000
        )
        try:
            GeneratorWorker(kafka, store, SyntheticTarget(hidden_size=16), config).run(stops[name])
        except BaseException as exc:
            errors.append(exc)

    threads = {name: threading.Thread(target=run, args=(name,), name=name) for name in stops}

    def owner() -> str | None:
        """The worker whose newest assignment is [0] while the other has an open idle report."""
        for name in stops:
            other = next(n for n in stops if n != name)
            assigned = _lines(caplog, f"{name}: partitions ")
            if assigned and assigned[-1] == f"{name}: partitions [0] assigned" and _open_report(caplog, other):
                return name
        return None

    try:
        for t in threads.values():
            t.start()
        _wait_for(lambda: owner() is not None)  # both may be idle first: the group's first join can take a while
        first = owner()
        assert first is not None
        idle = next(name for name in stops if name != first)

        stops[first].set()  # the owner leaves the group: its partition moves to the idle worker
        threads[first].join(timeout=60)
        assert not threads[first].is_alive()
        _wait_for(lambda: bool(_lines(caplog, f"{idle}: owns prompt partitions [0] again")))
        for name in stops:  # one report per idle stretch, never repeated within it
            assert len(_lines(caplog, f"{name}: {IDLE}")) <= len(_lines(caplog, f"{name}: owns prompt partitions")) + 1
        assert not errors, errors
    finally:
        for stop in stops.values():
            stop.set()
        for t in threads.values():
            t.join(timeout=60)
        with KafkaAdmin(kafka) as admin:
            admin.delete_topics(topics.all())
