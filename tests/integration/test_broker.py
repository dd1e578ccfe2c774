"""The local broker as users run it: install check messages, and start/status/stop in the background."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.core.errors import BrokerError
from pipeline.transport import broker
from pipeline.transport.kafka import KafkaSettings


def test_missing_java_names_what_to_install_and_the_alternative(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(broker.shutil, "which", lambda name: None)
    with pytest.raises(BrokerError, match="openjdk-17.*KAFKA_BOOTSTRAP_SERVERS"):
        broker._java()


def test_missing_maven_names_what_to_install_and_the_alternative(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SPECSTREAM_HOME", str(tmp_path))  # no jars cached there
    monkeypatch.setattr(broker.shutil, "which", lambda name: None)
    with pytest.raises(BrokerError, match="apt-get install maven.*KAFKA_BOOTSTRAP_SERVERS"):
        broker.install()


@pytest.mark.integration
def test_detached_broker_starts_reports_and_stops(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """What `specstream broker start|status|stop` do, with its own state directory."""
    jars = broker.libs_dir()  # reuse the cached jars, keep the state separate
    monkeypatch.setenv("SPECSTREAM_HOME", str(tmp_path))
    (tmp_path / f"kafka-{broker.KAFKA_VERSION}").mkdir()
    (tmp_path / f"kafka-{broker.KAFKA_VERSION}" / "libs").symlink_to(jars)
    state = broker.start_detached(heap_mb=256)
    try:
        assert broker.detached_status() == state
        assert broker.start_detached() == state  # a second start finds the running one
        with KafkaSettings(state.bootstrap).admin() as admin:
            admin.ensure_topics({"broker-test": 1})
            assert "broker-test" in admin.topics()
    finally:
        assert broker.stop_detached()
    assert broker.detached_status() is None and not broker.stop_detached()
