"""Shared fixtures: one real Kafka broker per test session, unique names per test.

The broker comes from, in order: ``KAFKA_BOOTSTRAP_SERVERS`` (any running broker); the project's
local KRaft broker assembled from Maven Central jars (java + the jars or mvn); a testcontainers
Kafka container where a Docker engine answers. In CI (``CI`` or ``KAFKA_TEST_REQUIRED`` set) a
missing broker fails the session instead of skipping the integration tests.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.core.topics import RunTopics
from pipeline.transport.kafka import KafkaAdmin, KafkaSettings

logger = logging.getLogger(__name__)


def _docker_answers() -> bool:
    try:
        import docker  # noqa: PLC0415

        docker.from_env(timeout=3).ping()
        return True
    except Exception:
        return False


def _broker_required() -> bool:
    return bool(os.environ.get("CI") or os.environ.get("KAFKA_TEST_REQUIRED"))


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Bootstrap address of a real broker, started once for the whole session."""
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if external:
        yield external
        return
    from pipeline.transport import broker, kafka_jars  # lazy: start-up (only when no broker is given)

    if shutil.which("java") and (kafka_jars.libs_dir().is_dir() or shutil.which("mvn")):
        with broker.LocalKafka(tmp_path_factory.mktemp("kafka")) as local:
            logger.info("local Kafka %s at %s (%.1f s)", local.version, local.bootstrap, local.startup_seconds)
            yield local.bootstrap
        return
    if _docker_answers():
        try:
            from testcontainers.community.kafka import KafkaContainer  # noqa: PLC0415
        except ImportError:
            from testcontainers.kafka import KafkaContainer  # type: ignore[no-redef]  # noqa: PLC0415
        container = (
            KafkaContainer("confluentinc/cp-kafka:7.6.1")
            .with_kraft()
            .with_env("KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR", "1")
            .with_env("KAFKA_TRANSACTION_STATE_LOG_MIN_ISR", "1")
        )
        with container:
            yield container.get_bootstrap_server()
        return
    message = "no Kafka broker: set KAFKA_BOOTSTRAP_SERVERS, install java+maven, or run Docker"
    if _broker_required():
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def kafka(kafka_bootstrap: str) -> KafkaSettings:
    return KafkaSettings(kafka_bootstrap)


@pytest.fixture
def run_id() -> str:
    """A fresh run per test: its own topics, groups and storage prefix."""
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture
def run_topics(kafka: KafkaSettings, run_id: str) -> Iterator[RunTopics]:
    """The run's topics with 4 partitions, deleted after the test."""
    topics = RunTopics(run_id)
    with KafkaAdmin(kafka) as admin:
        admin.ensure_run_topics(topics, 4)
    yield topics
    with KafkaAdmin(kafka) as admin:
        admin.delete_topics(topics.all())


@pytest.fixture
def storage_root(tmp_path: Path) -> str:
    return str(tmp_path / "features")


@pytest.fixture(scope="session")
def tiny_target_dir() -> Path:
    """The tiny trained Llama target (built once per machine, cached under SPECSTREAM_HOME)."""
    from pipeline.devkit.target import build_tiny_target  # noqa: PLC0415

    return build_tiny_target()


@pytest.fixture
def own_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A private SPECSTREAM_HOME that reuses the cached jars but keeps its own broker state
    (spawned ``specstream`` processes inherit it)."""
    from pipeline.transport import kafka_jars  # lazy: start-up (only the local-broker tests)

    jars = kafka_jars.libs_dir()
    monkeypatch.setenv("SPECSTREAM_HOME", str(tmp_path))
    (tmp_path / f"kafka-{kafka_jars.KAFKA_VERSION}").mkdir()
    (tmp_path / f"kafka-{kafka_jars.KAFKA_VERSION}" / "libs").symlink_to(jars)
    return tmp_path


@pytest.fixture(scope="session")
def s3_server() -> Iterator[object]:
    """A real S3-compatible server (moto's server mode) on 127.0.0.1 for the whole session."""
    pytest.importorskip("s3fs", reason="the s3 extra is not installed: pip install -e .[s3,test]")
    pytest.importorskip("moto.server", reason="moto[server] is not installed: pip install -e .[test]")
    from tests.s3_server import start_s3_server  # lazy: start-up (only the S3 tests)

    with start_s3_server() as server:
        yield server


@pytest.fixture
def s3_root(s3_server: object) -> object:
    """A fresh bucket per test: its ``s3://bucket/root`` URL and the storage options to reach it."""
    from tests.s3_server import S3Root  # lazy: start-up (only the S3 tests)

    return S3Root(f"s3://{s3_server.new_bucket()}/root", s3_server.options)  # type: ignore[attr-defined]
