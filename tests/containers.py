"""The test session's broker in a container: the image infra/kafka-image/build.sh makes, run by
testcontainers on the engine of infra/engine.sh.

testcontainers' own ``KafkaContainer`` does not fit (it refuses non-Confluent tags in KRaft mode and
needs published ports, and the engine runs with ``--bridge=none``), so this is a plain
``DockerContainer``: host networking, free loopback ports, a wait on the broker's started line.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from pipeline.transport.broker import free_port
from pipeline.transport.kafka_jars import KAFKA_VERSION

logger = logging.getLogger(__name__)

IMAGE = f"specstream-kafka:{KAFKA_VERSION}"
ENGINE_SOCKET = Path(os.environ.get("SPECSTREAM_ENGINE_DIR", "/tmp/specstream-engine")) / "docker.sock"
LABEL = "org.testcontainers"
_STARTED = "Kafka Server started"
_HOW = "start the engine with `bash infra/engine.sh start` and build the image with `bash infra/kafka-image/build.sh`"


class EngineUnavailable(RuntimeError):
    """No container engine answers, or the broker image is not built: the message says which and how."""


def configure_environment() -> None:
    """Point testcontainers at loopback and the private engine; set before testcontainers is imported.

    The machine has ``/.dockerenv``, so testcontainers would otherwise take the default gateway for
    the container host; the Ryuk reaper image cannot be pulled (no registry), so clean-up is ours.
    """
    os.environ["TESTCONTAINERS_HOST_OVERRIDE"] = "127.0.0.1"
    os.environ["TESTCONTAINERS_RYUK_DISABLED"] = "true"
    if "DOCKER_HOST" not in os.environ and ENGINE_SOCKET.exists():
        os.environ["DOCKER_HOST"] = f"unix://{ENGINE_SOCKET}"


def engine_client() -> Any:
    """A docker-py client of the engine, or EngineUnavailable."""
    configure_environment()
    import docker  # lazy: start-up (only the container mode needs docker-py)

    try:
        client = docker.from_env(timeout=10)
        client.ping()
    except Exception as exc:
        where = os.environ.get("DOCKER_HOST", "the default socket")
        raise EngineUnavailable(f"no container engine answers at {where} ({exc}): {_HOW}") from exc
    return client


def describe(client: Any, image: str = IMAGE) -> str:
    """One line: the engine's version and the image's id and size (EngineUnavailable if not built)."""
    import docker  # lazy: start-up (only the container mode needs docker-py)

    version = client.version()
    try:
        found = client.images.get(image)
    except docker.errors.ImageNotFound as exc:
        raise EngineUnavailable(f"the broker image {image} is not built: {_HOW}") from exc
    size_mb = found.attrs["Size"] / 1e6
    return (
        f"container broker {image} ({found.short_id}, {size_mb:.0f} MB) on engine "
        f"{version.get('Version')} (API {version.get('ApiVersion')})"
    )


def remove_leftovers(client: Any) -> int:
    """Remove every testcontainers container on the engine (Ryuk is off): a crashed session's too."""
    removed = 0
    for container in client.containers.list(all=True, filters={"label": f"{LABEL}=true"}):
        container.remove(force=True, v=True)
        removed += 1
    return removed



def kafka_container(image: str = IMAGE, *, heap_mb: int = 384, startup_timeout_s: float = 180) -> Any:
    """The broker container, not yet started (a context manager); ``.bootstrap`` is its address."""
    configure_environment()
    # lazy: start-up (testcontainers is imported only in container mode, after the environment is set)
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.wait_strategies import LogMessageWaitStrategy

    class SpecstreamKafkaContainer(DockerContainer):
        """One KRaft node on host networking, listening on free 127.0.0.1 ports only."""

        def __init__(self) -> None:
            super().__init__(image)
            self.port, self.controller_port = free_port(), free_port()
            self.bootstrap = f"127.0.0.1:{self.port}"
            self.with_kwargs(network_mode="host")
            self.with_envs(
                KAFKA_PORT=str(self.port),
                KAFKA_CONTROLLER_PORT=str(self.controller_port),
                KAFKA_LISTEN_HOST="127.0.0.1",
                KAFKA_ADVERTISED_HOST="127.0.0.1",
                KAFKA_HEAP_MB=str(heap_mb),
                # C1 only, as the native test broker: it starts sooner on a loaded 2-core machine.
                KAFKA_JVM_OPTS="-XX:TieredStopAtLevel=1",
            )
            self.waiting_for(LogMessageWaitStrategy(_STARTED).with_startup_timeout(int(startup_timeout_s)))

    return SpecstreamKafkaContainer()
