"""Apache Kafka's own command-line tools, run from the local install's jars (no tarball, no scripts).

The release tarball's ``bin/kafka-*.sh`` scripts are ``kafka-run-class.sh <main class>``; the jars
in ``libs_dir()`` hold the same classes (``kafka-tools``), so :func:`tool_command` builds the same
``java -cp '<libs>/*' <main class> ARGS`` under the names Kafka users know.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pipeline.core.errors import BrokerError
from pipeline.transport.kafka_jars import KAFKA_VERSION, libs_dir, tools_ready

__all__ = ("TOOLS", "takes_bootstrap", "tool_command")

#: Script name -> main class, as ``bin/<name>.sh`` of the 4.x release runs it.
TOOLS: dict[str, str] = {
    "kafka-console-consumer": "org.apache.kafka.tools.consumer.ConsoleConsumer",
    "kafka-console-producer": "org.apache.kafka.tools.ConsoleProducer",
    "kafka-topics": "org.apache.kafka.tools.TopicCommand",
    "kafka-consumer-groups": "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand",
    "kafka-get-offsets": "org.apache.kafka.tools.GetOffsetShell",
    "kafka-transactions": "org.apache.kafka.tools.TransactionsCommand",
    "kafka-dump-log": "org.apache.kafka.tools.DumpLogSegments",
    "kafka-acls": "org.apache.kafka.tools.AclCommand",
}
#: The tools that talk to a broker (``--bootstrap-server``); kafka-dump-log reads files.
_BROKER_TOOLS = frozenset(TOOLS) - {"kafka-dump-log"}
# kafka-run-class.sh's tool defaults: a small heap (its KAFKA_HEAP_OPTS) and a headless JVM.
_JVM_FLAGS = ("-Xmx256m", "-XX:TieredStopAtLevel=1", "-Djava.awt.headless=true")


def takes_bootstrap(name: str, args: list[str]) -> bool:
    """Whether the tool talks to a broker and ``args`` do not say which one."""
    given = any(a == "--bootstrap-server" or a.startswith("--bootstrap-server=") for a in args)
    return name in _BROKER_TOOLS and not given and "--help" not in args and "--version" not in args


def tool_command(name: str, args: list[str], *, version: str = KAFKA_VERSION, libs: Path | None = None) -> list[str]:
    """The ``java`` command line that runs Kafka's tool ``name`` with ``args``; a one-line
    ``BrokerError`` for an unknown name, missing java, or an install without the tools."""
    main_class = TOOLS.get(name)
    if main_class is None:
        raise BrokerError(f"unknown Kafka tool {name!r}: use one of {', '.join(TOOLS)}")
    libs = libs if libs is not None else libs_dir(version)
    if not tools_ready(libs, version):
        raise BrokerError(
            f"Kafka's command-line tools are not installed in {libs}: run `specstream broker install` "
            "(adds the kafka-tools jar from Maven Central)"
        )
    java = shutil.which("java")
    if java is None:
        raise BrokerError("java (17 or newer) is not on PATH: the Kafka tools need a JDK 17+ to run")
    return [java, *_JVM_FLAGS, "-cp", str(libs / "*"), main_class, *args]
