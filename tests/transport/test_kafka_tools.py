"""Kafka's command-line tools from the install's jars: names, the install check, the command (no broker)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.core.errors import BrokerError
from pipeline.transport import kafka_jars, kafka_tools

VERSION = kafka_jars.KAFKA_VERSION


def _libs(root: Path, *, tools: bool) -> Path:
    """A libs dir that the checks take for an install (empty jars: only the names are checked)."""
    libs = root / f"kafka-{VERSION}" / "libs"
    libs.mkdir(parents=True)
    names = [f"kafka_2.13-{VERSION}.jar", "log4j-slf4j-impl-2.25.4.jar"] + ([f"kafka-tools-{VERSION}.jar"] if tools else [])
    for name in names:
        (libs / name).touch()
    return libs


def test_an_install_without_the_tools_still_starts_the_broker_but_is_completed_by_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SPECSTREAM_HOME", str(tmp_path))
    libs = _libs(tmp_path, tools=False)
    assert kafka_jars.libs_ready(libs, VERSION) and not kafka_jars.tools_ready(libs, VERSION)
    monkeypatch.setattr(kafka_jars.shutil, "which", lambda name: None)  # install must reach for mvn
    with pytest.raises(BrokerError, match="mvn"):
        kafka_jars.install()
    with pytest.raises(BrokerError, match="specstream broker install"):
        kafka_tools.tool_command("kafka-topics", ["--list"], libs=libs)


def test_a_tool_runs_its_main_class_from_the_libs_dir(tmp_path: Path) -> None:
    libs = _libs(tmp_path, tools=True)
    command = kafka_tools.tool_command("kafka-console-consumer", ["--topic", "t"], libs=libs)
    assert command[-5:] == ["-cp", f"{libs}/*", "org.apache.kafka.tools.consumer.ConsoleConsumer", "--topic", "t"]


def test_an_unknown_tool_is_one_line_that_lists_the_names(tmp_path: Path) -> None:
    with pytest.raises(BrokerError, match="unknown Kafka tool 'kafka-nope': use one of kafka-console-consumer,"):
        kafka_tools.tool_command("kafka-nope", [], libs=_libs(tmp_path, tools=True))


def test_the_bootstrap_default_applies_only_to_broker_tools_without_one() -> None:
    assert kafka_tools.takes_bootstrap("kafka-topics", ["--list"])
    assert not kafka_tools.takes_bootstrap("kafka-topics", ["--bootstrap-server", "h:1", "--list"])
    assert not kafka_tools.takes_bootstrap("kafka-topics", ["--bootstrap-server=h:1"])
    assert not kafka_tools.takes_bootstrap("kafka-dump-log", ["--files", "x.log"])
