"""Shared fixtures: one real Kafka broker per test session, unique names per test.

``SPECSTREAM_TEST_BROKER`` chooses the broker: ``auto`` (the default) takes, in order,
``KAFKA_BOOTSTRAP_SERVERS`` (any running broker), the project's local KRaft broker assembled from
Maven Central jars (java + the jars or mvn), then the container broker where an engine answers and
its image is built; ``local`` only the local broker; ``testcontainers`` only the container broker
(tests/containers.py: infra/kafka-image's image on infra/engine.sh's engine). In CI (``CI`` or
``KAFKA_TEST_REQUIRED`` set) a missing broker fails the session instead of skipping the
integration tests.
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


_MODES = ("auto", "local", "testcontainers")
# Tests that start a native LocalKafka of their own (restarts, outages, SASL): the native pass runs them.
_OWN_BROKER_FIXTURES = frozenset({"own_home", "own_broker", "sasl_broker", "secure_broker"})
_OWN_BROKER_SKIP = "starts its own native LocalKafka: runs in the native pass, not on the container broker"


def _broker_mode() -> str:
    mode = os.environ.get("SPECSTREAM_TEST_BROKER", "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise pytest.UsageError(f"SPECSTREAM_TEST_BROKER={mode!r}: use one of {', '.join(_MODES)}")
    return mode


def _broker_required() -> bool:
    return bool(os.environ.get("CI") or os.environ.get("KAFKA_TEST_REQUIRED"))


def _no_broker(message: str) -> None:
    if _broker_required():
        pytest.fail(message)
    pytest.skip(message)


def pytest_configure(config: pytest.Config) -> None:
    _broker_mode()  # a misspelt mode stops the session at once


def pytest_report_header(config: pytest.Config) -> list[str]:
    """The session's broker mode; in container mode the engine version and the image id and size."""
    mode = _broker_mode()
    if mode != "testcontainers":
        return [f"broker: {mode} (SPECSTREAM_TEST_BROKER)"]
    from tests import containers  # lazy: start-up (only the container mode)

    try:
        return [f"broker: {containers.describe(containers.engine_client())}"]
    except containers.EngineUnavailable as exc:
        return [f"broker: testcontainers unavailable: {exc}"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _broker_mode() != "testcontainers":
        return
    skip = pytest.mark.skip(reason=_OWN_BROKER_SKIP)
    for item in items:
        if _OWN_BROKER_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(skip)


def _container_broker() -> Iterator[str]:
    """The session broker in a container; leftover testcontainers containers are removed first and last."""
    from tests import containers  # lazy: start-up (only the container mode)

    try:
        client = containers.engine_client()
        logger.info("%s", containers.describe(client))
    except containers.EngineUnavailable as exc:
        _no_broker(str(exc))
        return
    if removed := containers.remove_leftovers(client):
        logger.info("removed %d leftover testcontainers container(s)", removed)
    try:
        with containers.kafka_container() as container:
            short_id = container.get_wrapped_container().short_id
            logger.info("container Kafka %s at %s", short_id, container.bootstrap)
            yield container.bootstrap
    finally:
        containers.remove_leftovers(client)
        client.close()


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Bootstrap address of a real broker, started once for the whole session."""
    mode = _broker_mode()
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if external and mode == "auto":
        yield external
        return
    if mode == "testcontainers":
        yield from _container_broker()
        return
    from pipeline.transport import broker, kafka_jars  # lazy: start-up (only when no broker is given)

    if shutil.which("java") and (kafka_jars.libs_dir().is_dir() or shutil.which("mvn")):
        with broker.LocalKafka(tmp_path_factory.mktemp("kafka")) as local:
            logger.info("local Kafka %s at %s (%.1f s)", local.version, local.bootstrap, local.startup_seconds)
            yield local.bootstrap
        return
    if mode == "auto":
        from tests import containers  # lazy: start-up (only when no local broker can start)

        try:
            containers.describe(containers.engine_client())
        except containers.EngineUnavailable:
            pass
        else:
            yield from _container_broker()
            return
    _no_broker(
        "no Kafka broker: set KAFKA_BOOTSTRAP_SERVERS, install java+maven, or build and run the "
        "container broker (infra/engine.sh, infra/kafka-image/build.sh, SPECSTREAM_TEST_BROKER=testcontainers)"
    )


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
