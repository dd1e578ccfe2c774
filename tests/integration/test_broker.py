"""The local broker as users run it: install check messages, and start/status/stop in the background."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pipeline.core.errors import BrokerError
from pipeline.transport import background_broker, kafka_jars
from pipeline.transport import broker as local
from pipeline.transport.kafka import KafkaSettings


def test_missing_java_names_what_to_install_and_the_alternative(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local.shutil, "which", lambda name: None)
    with pytest.raises(BrokerError, match="openjdk-17.*KAFKA_BOOTSTRAP_SERVERS"):
        local._java()


def test_missing_maven_names_what_to_install_and_the_alternative(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SPECSTREAM_HOME", str(tmp_path))  # no jars cached there
    monkeypatch.setattr(kafka_jars.shutil, "which", lambda name: None)
    with pytest.raises(BrokerError, match="apt-get install maven.*KAFKA_BOOTSTRAP_SERVERS"):
        kafka_jars.install()


@pytest.mark.integration
def test_detached_broker_starts_reports_and_stops(own_home: Path) -> None:
    """What `specstream broker start|status|stop` do, with its own state directory."""
    state = background_broker.start_detached(heap_mb=256)
    try:
        assert background_broker.detached_status() == state
        assert background_broker.start_detached() == state  # a second start finds the running one
        with KafkaSettings(state.bootstrap).admin() as admin:
            admin.ensure_topics({"broker-test": 1})
            assert "broker-test" in admin.topics()
    finally:
        assert background_broker.stop_detached()
    assert background_broker.detached_status() is None and not background_broker.stop_detached()


@pytest.mark.integration
def test_a_restarted_local_broker_keeps_its_topics_and_its_address(own_home: Path) -> None:
    """stop then start: the same address, the same topics and records (DESIGN 4.8)."""
    first = background_broker.start_detached(heap_mb=256)
    try:
        settings = KafkaSettings(first.bootstrap)
        with settings.admin() as admin:
            admin.ensure_topics({"durable": 2})
        producer = settings.plain_producer()
        producer.send("durable", b"kept", partition=1)
        producer.flush()
        producer.close()
    finally:
        assert background_broker.stop_detached()
    second = background_broker.start_detached(heap_mb=256)
    try:
        assert second.bootstrap == first.bootstrap and second.pid != first.pid
        with settings.admin() as admin:
            assert admin.partition_count("durable") == 2
            assert admin.end_offsets("durable", [0, 1]) == {0: 0, 1: 1}
    finally:
        background_broker.stop_detached()
    background_broker.delete_detached_data()
    assert not (own_home / "broker" / "run").exists()


@pytest.mark.integration
def test_concurrent_starts_share_one_broker(own_home: Path) -> None:
    with ThreadPoolExecutor(2) as pool:
        states = list(pool.map(lambda _: background_broker.start_detached(heap_mb=256), range(2)))
    try:
        assert states[0] == states[1]
    finally:
        background_broker.stop_detached()


def test_stop_never_signals_a_process_that_is_not_our_broker(own_home: Path) -> None:
    """A stale state file whose pid now belongs to another process (here: this test) is ignored."""
    state_file = own_home / "broker" / "state.json"
    state_file.parent.mkdir(parents=True)
    state_file.write_text(json.dumps(
        {"pid": os.getpid(), "bootstrap": "127.0.0.1:1", "workdir": str(own_home / "broker" / "run"),
         "version": kafka_jars.KAFKA_VERSION}
    ))  # fmt: skip
    assert background_broker.detached_status() is None
    assert not background_broker.stop_detached()
