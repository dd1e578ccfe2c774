"""Kafka's own command-line tools through ``specstream broker tools``, against the session's broker."""

from __future__ import annotations

import shutil

import pytest

from pipeline.core.topics import RunTopics
from pipeline.transport import kafka_jars
from pipeline.transport.kafka import KafkaSettings
from tests.support import one_error, spawn, wait_exit

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module", autouse=True)
def tools_installed() -> None:
    """The tools are in the install (CI runs `specstream broker install`; an older one is completed)."""
    if not shutil.which("java"):
        pytest.skip("the Kafka tools need java")
    if not kafka_jars.tools_ready(kafka_jars.libs_dir(), kafka_jars.KAFKA_VERSION):
        if not shutil.which("mvn"):
            pytest.skip("the Kafka tools are not installed and mvn is missing")
        kafka_jars.install()


def test_kafka_topics_lists_a_run_topic_on_the_default_broker(kafka: KafkaSettings, run_topics: RunTopics) -> None:
    # No --bootstrap-server: it comes from KAFKA_BOOTSTRAP_SERVERS, as for every specstream command.
    proc = spawn(["broker", "tools", "kafka-topics", "--", "--list"], env={"KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers})
    code, out = wait_exit(proc, timeout_s=120)
    assert code == 0, out
    assert run_topics.prompts in out.splitlines(), out


def test_the_console_consumer_reads_records_a_test_wrote(kafka: KafkaSettings, run_topics: RunTopics) -> None:
    producer = kafka.plain_producer()
    for i in range(5):
        producer.send(run_topics.dlq, f"record-{i}".encode(), partition=0)
    producer.flush()
    producer.close()
    args = ["--bootstrap-server", kafka.bootstrap_servers, "--topic", run_topics.dlq, "--partition", "0",
            "--offset", "earliest", "--max-messages", "3", "--timeout-ms", "60000"]  # fmt: skip
    code, out = wait_exit(spawn(["broker", "tools", "kafka-console-consumer", "--", *args]), timeout_s=120)
    assert code == 0, out
    assert [line for line in out.splitlines() if line.startswith("record-")] == ["record-0", "record-1", "record-2"], out
    assert "Processed a total of 3 messages" in out


def test_the_tool_names_are_listed_and_an_unknown_one_is_one_error_line() -> None:
    code, out = wait_exit(spawn(["broker", "tools"]), timeout_s=60)
    assert code == 0 and "kafka-console-consumer" in out and "org.apache.kafka.tools.TopicCommand" in out, out
    code, out = wait_exit(spawn(["broker", "tools", "kafka-nope"]), timeout_s=60)
    assert code != 0
    assert "use one of kafka-console-consumer" in one_error(out)
