"""A real single-node Apache Kafka broker (KRaft) assembled from Maven Central jars.

No Docker, no tarball: ``install()`` runs Maven once over ``infra/kafka/pom.xml`` to copy the
broker's runtime jars into a cache directory; ``LocalKafka`` formats fresh KRaft storage, starts
``kafka.Kafka`` as a JVM on loopback ports, waits until the broker accepts connections and stops
it with SIGTERM (what ``kafka-server-stop.sh`` does). Logs go to ``<workdir>/kafka.log``.

Used by the test fixture (one broker per pytest session), by ``specstream broker start|stop``
and by ``specstream quickstart``. Anyone with a broker already can skip all of this by setting
``KAFKA_BOOTSTRAP_SERVERS``.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from pipeline.core.errors import BrokerError

__all__ = (
    "KAFKA_VERSION",
    "LocalKafka",
    "install",
    "libs_dir",
    "home_dir",
    "start_detached",
    "stop_detached",
    "detached_status",
    "DetachedBroker",
    "env_or_local_broker",
)

logger = logging.getLogger(__name__)

KAFKA_VERSION = "4.3.1"
# A 2-core machine starts the broker in ~5-10 s; a loaded CI machine can take much longer.
_READY_TIMEOUT_S = 120.0
_STOP_TIMEOUT_S = 30.0
_NO_JAVA = (
    "java (17 or newer) is not on PATH: install a JDK 17+ (e.g. `apt-get install "
    "openjdk-17-jre-headless`), or use a broker you already run by setting "
    "KAFKA_BOOTSTRAP_SERVERS=host:port"
)
_NO_MAVEN = (
    "the Kafka broker jars are not installed and `mvn` is not on PATH: install Maven "
    "(e.g. `apt-get install maven`) and run `specstream broker install`, or use a broker you "
    "already run by setting KAFKA_BOOTSTRAP_SERVERS=host:port"
)


def home_dir() -> Path:
    """Cache and state live under ``$SPECSTREAM_HOME`` (default ``~/.cache/specstream``)."""
    return Path(os.environ.get("SPECSTREAM_HOME", Path.home() / ".cache" / "specstream"))


def libs_dir(version: str = KAFKA_VERSION) -> Path:
    """Where the broker jars of ``version`` are installed."""
    return home_dir() / f"kafka-{version}" / "libs"


def _pom_path() -> Path:
    """The POM ships in the wheel (``pipeline/_infra``) or sits in the source checkout."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package / "_infra" / "kafka" / "pom.xml", package.parent / "infra/kafka/pom.xml"):
        if candidate.is_file():
            return candidate
    raise BrokerError("infra/kafka/pom.xml not found: reinstall specstream")


def _libs_ready(libs: Path, version: str) -> bool:
    return (libs / f"kafka_2.13-{version}.jar").is_file() and any(libs.glob("log4j-slf4j-impl-*.jar"))


def install(version: str = KAFKA_VERSION, *, force: bool = False) -> Path:
    """Copy the broker's runtime jars from Maven Central into the cache (once); return the dir."""
    libs = libs_dir(version)
    if _libs_ready(libs, version) and not force:
        return libs
    mvn = shutil.which("mvn")
    if mvn is None:
        raise BrokerError(_NO_MAVEN)
    staging = Path(tempfile.mkdtemp(prefix="libs-", dir=_mkdir(libs.parent)))
    cmd = [
        mvn, "-B", "-q", "-f", str(_pom_path()), "package",
        f"-Dkafka.version={version}", f"-Dlibs.dir={staging}",
        f"-Dproject.build.directory={staging.parent / 'mvn-target'}",
    ]  # fmt: skip
    logger.info("assembling Kafka %s jars from Maven Central into %s", version, libs)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0 or not (staging / f"kafka_2.13-{version}.jar").is_file():
        shutil.rmtree(staging, ignore_errors=True)
        raise BrokerError(
            f"mvn could not assemble Kafka {version} (exit {proc.returncode}):\n"
            f"{(proc.stdout + proc.stderr)[-3000:]}"
        )
    if libs.exists():
        shutil.rmtree(libs)
    staging.rename(libs)  # atomic: a half-copied folder is never taken for a complete one
    return libs


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _java() -> str:
    java = shutil.which("java")
    if java is None:
        raise BrokerError(_NO_JAVA)
    return java


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _cluster_id() -> str:
    """A Kafka Uuid: 16 random bytes, URL-safe base64 without padding, not starting with '-'."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


_SERVER_PROPERTIES = """\
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:{cport}
listeners=PLAINTEXT://127.0.0.1:{bport},CONTROLLER://127.0.0.1:{cport}
advertised.listeners=PLAINTEXT://127.0.0.1:{bport},CONTROLLER://127.0.0.1:{cport}
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
log.dirs={data_dir}
num.partitions=1
auto.create.topics.enable=false
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
share.coordinator.state.topic.num.partitions=1
group.initial.rebalance.delay.ms=0
num.network.threads=2
num.io.threads=2
log.cleaner.dedupe.buffer.size=16777216
message.max.bytes=8388608
transaction.abort.timed.out.transaction.cleanup.interval.ms=5000
"""

_LOG4J2 = """\
appender.out.type = Console
appender.out.name = OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = OUT
logger.req.name = kafka.request.logger
logger.req.level = WARN
"""


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """PR_SET_PDEATHSIG: the JVM gets SIGTERM if the Python process that owns it dies."""
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)
    except OSError:
        pass


class LocalKafka:
    """One broker+controller on loopback; a context manager that owns the JVM."""

    def __init__(
        self,
        workdir: Path,
        *,
        version: str = KAFKA_VERSION,
        heap_mb: int = 512,
        attached: bool = True,
    ) -> None:
        self.workdir = Path(workdir)
        self.version = version
        self.heap_mb = heap_mb
        self.attached = attached
        self.proc: subprocess.Popen[bytes] | None = None
        self.bootstrap = ""
        self.log_path = self.workdir / "kafka.log"
        self.startup_seconds = 0.0

    def __enter__(self) -> LocalKafka:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> str:
        """Format storage, launch the JVM and wait until it serves; return the bootstrap."""
        libs = libs_dir(self.version)
        if not _libs_ready(libs, self.version):
            libs = install(self.version)
        java = _java()
        last_error: BrokerError | None = None
        for _attempt in range(2):  # a second try covers the free-port race
            try:
                return self._start_once(java, libs)
            except BrokerError as exc:
                last_error = exc
                if "Address already in use" not in str(exc):
                    raise
        assert last_error is not None
        raise last_error

    def _start_once(self, java: str, libs: Path) -> str:
        data_dir = self.workdir / "data"
        shutil.rmtree(data_dir, ignore_errors=True)
        _mkdir(data_dir)
        bport, cport = _free_port(), _free_port()
        props = self.workdir / "server.properties"
        props.write_text(_SERVER_PROPERTIES.format(bport=bport, cport=cport, data_dir=data_dir))
        log4j = self.workdir / "log4j2.properties"
        log4j.write_text(_LOG4J2)
        classpath = f"{libs}/*"
        started = time.monotonic()
        fmt = subprocess.run(
            [java, "-Xmx128m", "-XX:TieredStopAtLevel=1", "-cp", classpath,
             "kafka.tools.StorageTool", "format", "--standalone",
             "-t", _cluster_id(), "-c", str(props)],
            capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        if fmt.returncode != 0:
            raise BrokerError(f"formatting KRaft storage failed:\n{fmt.stdout}{fmt.stderr}")
        cmd = [
            java, f"-Xms{min(256, self.heap_mb)}m", f"-Xmx{self.heap_mb}m", "-XX:+UseSerialGC",
            "-XX:TieredStopAtLevel=1", "-XX:+ExitOnOutOfMemoryError", "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={log4j}", f"-Dkafka.logs.dir={self.workdir / 'logs'}",
            "-cp", classpath, "kafka.Kafka", str(props),
        ]  # fmt: skip
        log = open(self.log_path, "ab")  # noqa: SIM115 - the JVM owns it until it exits
        try:
            self.proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent if self.attached else None,
                start_new_session=not self.attached,
            )
        finally:
            log.close()
        self.bootstrap = f"127.0.0.1:{bport}"
        self._wait_ready(bport)
        self.startup_seconds = time.monotonic() - started
        logger.info("Kafka %s ready at %s in %.1f s", self.version, self.bootstrap, self.startup_seconds)
        return self.bootstrap

    def _wait_ready(self, port: int) -> None:
        """The fixed-port listener opens only once the broker is unfenced: that is readiness."""
        assert self.proc is not None
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BrokerError(
                    f"the Kafka JVM exited with {self.proc.returncode} during startup; "
                    f"log tail ({self.log_path}):\n{self.log_tail()}"
                )
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                    return
            except OSError:
                time.sleep(0.2)  # polling a socket that is not open yet; bounded by the deadline
        self.stop()
        raise BrokerError(
            f"Kafka did not open {port} within {_READY_TIMEOUT_S:.0f} s; log tail:\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """SIGTERM, bounded wait, then SIGKILL."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


@contextlib.contextmanager
def env_or_local_broker() -> Iterator[str]:
    """``KAFKA_BOOTSTRAP_SERVERS`` if set, else a throwaway local broker for the block."""
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        yield os.environ["KAFKA_BOOTSTRAP_SERVERS"]
        return
    with LocalKafka(Path(tempfile.mkdtemp(prefix="specstream-kafka-"))) as local:
        yield local.bootstrap


# --- a broker that outlives the CLI command that started it -------------------------------


@dataclass(frozen=True)
class DetachedBroker:
    """A broker started in the background: enough to find, check and stop it later."""

    pid: int
    bootstrap: str
    workdir: str
    version: str


def _state_file() -> Path:
    return home_dir() / "broker" / "state.json"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def detached_status() -> DetachedBroker | None:
    """The broker started by ``specstream broker start``, if it still runs."""
    path = _state_file()
    try:
        state = DetachedBroker(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None
    if not _alive(state.pid):
        path.unlink(missing_ok=True)
        return None
    return state


def start_detached(version: str = KAFKA_VERSION, heap_mb: int = 512) -> DetachedBroker:
    """Start (or find) the user's local broker; it keeps running after this process exits."""
    running = detached_status()
    if running is not None:
        return running
    workdir = _mkdir(home_dir() / "broker" / "run")
    broker = LocalKafka(workdir, version=version, heap_mb=heap_mb, attached=False)
    broker.start()
    assert broker.proc is not None
    state = DetachedBroker(broker.proc.pid, broker.bootstrap, str(workdir), version)
    _state_file().write_text(json.dumps(state.__dict__))
    return state


def stop_detached() -> bool:
    """Stop the broker of ``specstream broker start``; False if none was running."""
    state = detached_status()
    if state is None:
        return False
    os.kill(state.pid, signal.SIGTERM)
    deadline = time.monotonic() + _STOP_TIMEOUT_S
    while _alive(state.pid) and time.monotonic() < deadline:
        time.sleep(0.2)  # waiting for another process to exit: no handle to wait() on
    if _alive(state.pid):
        os.kill(state.pid, signal.SIGKILL)
    _state_file().unlink(missing_ok=True)
    return True
