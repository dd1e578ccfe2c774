"""A real single-node Apache Kafka broker (KRaft) assembled from Maven Central jars.

No Docker, no tarball: the jars come from ``pipeline.transport.kafka_jars``; ``LocalKafka`` starts
``kafka.Kafka`` as a JVM on loopback ports over a work directory, waits until the broker accepts
connections and stops it with SIGTERM (what ``kafka-server-stop.sh`` does). Logs go to
``<workdir>/kafka.log``.

Durable like a database: the KRaft storage is formatted only when it is empty, and the ports are
chosen once (the default ports, or free ones when those are taken) and remembered in
``<workdir>/ports.json``, so a broker stopped (or killed) and started again over the same work
directory serves the same topics at the same address.

``sasl_users`` adds a ``SASL_PLAINTEXT`` listener (mechanism ``PLAIN``, those users and passwords)
beside the plain one, at ``sasl_bootstrap``: for testing what a client with wrong credentials is
told. ``scram_users`` adds it with SCRAM-SHA-512 instead, plus the standard authorizer (ACLs,
deny by default; ``super_users`` may do anything): see ``pipeline.transport.broker_security``.
The SASL port is chosen afresh on every start (only the plain listener's address is durable).

Used by the test fixture (one broker per pytest session) and by the background broker of
``specstream broker start|stop`` (``pipeline.transport.background_broker``). Anyone with a broker already can skip all of this by setting
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
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType

from pipeline.core.errors import BrokerError
from pipeline.transport.broker_security import (
    SCRAM_MECHANISM, plain_properties, scram_format_args, scram_properties,
)
from pipeline.transport.kafka_jars import KAFKA_VERSION, install, libs_dir, libs_ready

__all__ = ("DEFAULT_PORTS", "STOP_TIMEOUT_S", "LocalKafka", "env_or_local_broker", "free_port")

logger = logging.getLogger(__name__)

DEFAULT_PORTS = (9092, 9093)
# A 2-core machine starts the broker in ~5-10 s; a loaded CI machine can take much longer.
_READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0
_NO_JAVA = (
    "java (17 or newer) is not on PATH: install a JDK 17+ (e.g. `apt-get install "
    "openjdk-17-jre-headless`), or use a broker you already run by setting "
    "KAFKA_BOOTSTRAP_SERVERS=host:port"
)
def _java() -> str:
    java = shutil.which("java")
    if java is None:
        raise BrokerError(_NO_JAVA)
    return java


def free_port() -> int:
    """A 127.0.0.1 port free now (the OS's choice); whoever binds it next may race another process."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_free(port: int) -> bool:
    """Whether a listener could bind the port now. Connections of a broker that just died linger
    in TIME_WAIT; they do not stop the JVM's listener (it binds with SO_REUSEADDR), so they must
    not stop this check either."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _choose_ports(preferred: tuple[int, int] | None) -> tuple[int, int]:
    """The preferred ports where both are free, else two free ones."""
    if preferred is not None and all(_port_free(p) for p in preferred):
        return preferred
    return free_port(), free_port()


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
        preferred_ports: tuple[int, int] | None = None,
        sasl_users: Mapping[str, str] | None = None,
        scram_users: Mapping[str, str] | None = None,
        super_users: tuple[str, ...] = (),
    ) -> None:
        self.workdir = Path(workdir)
        self.sasl_users = dict(sasl_users or {})
        self.scram_users = dict(scram_users or {})  # stored when the storage is formatted
        self.super_users = super_users
        if self.sasl_users and self.scram_users:
            raise BrokerError("LocalKafka: give sasl_users (PLAIN) or scram_users (SCRAM + ACLs), not both")
        self.sasl_bootstrap = ""  # set on start when ``sasl_users`` asks for the SASL listener
        self.preferred_ports = preferred_ports
        self.version = version
        self.heap_mb = heap_mb
        self.attached = attached
        self.proc: subprocess.Popen[bytes] | None = None
        self.bootstrap = ""
        self.log_path = self.workdir / "kafka.log"
        self._ports_file = self.workdir / "ports.json"
        self._data_dir = self.workdir / "data"
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
        """Launch the JVM over the work directory (formatting it when empty) and wait until it
        serves; return the bootstrap address (the same one on every start of this directory)."""
        libs = libs_dir(self.version)
        if not libs_ready(libs, self.version):
            libs = install(self.version)
        java = _java()
        fresh = not self.formatted()
        for attempt in range(2):  # a second try covers the race for freshly chosen free ports
            try:
                return self._start_once(java, libs)
            except BrokerError as exc:
                if attempt or not fresh or "Address already in use" not in str(exc):
                    raise
                self._forget()
        raise AssertionError("unreachable")

    def _forget(self) -> None:
        """Drop fresh storage and its ports (nothing was ever served from them)."""
        self._ports_file.unlink(missing_ok=True)
        shutil.rmtree(self._data_dir, ignore_errors=True)

    def _remembered_ports(self) -> tuple[int, int] | None:
        try:
            broker, controller = json.loads(self._ports_file.read_text())
        except (OSError, ValueError):
            return None
        return int(broker), int(controller)

    def _ports(self) -> tuple[int, int]:
        """Remembered ports once storage exists (its address must not change); else choose."""
        remembered = self._remembered_ports()
        if remembered is not None and self.formatted():
            taken = [p for p in remembered if not _port_free(p)]
            if taken:
                raise BrokerError(
                    f"the local broker's port {taken[0]} (remembered in {self._ports_file}) is in use "
                    "by another process: stop that process, or stop the broker already running "
                    "over this directory (`specstream broker stop`)"
                )
            return remembered
        ports = _choose_ports(self.preferred_ports)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._ports_file.write_text(json.dumps(list(ports)))
        return ports

    def formatted(self) -> bool:
        """Whether the KRaft storage holds a formatted log directory (then it is kept)."""
        return (self._data_dir / "meta.properties").is_file()

    def _start_once(self, java: str, libs: Path) -> str:
        data_dir = self._data_dir
        bport, cport = self._ports()
        props = self.workdir / "server.properties"
        text = _SERVER_PROPERTIES.format(bport=bport, cport=cport, data_dir=data_dir)
        sport = free_port() if self.sasl_users or self.scram_users else 0
        if self.sasl_users:  # later keys win in a Java properties file
            text += plain_properties(bport, cport, sport, self.sasl_users)
        if self.scram_users:
            text += scram_properties(bport, cport, sport, self.super_users)
        props.write_text(text)
        log4j = self.workdir / "log4j2.properties"
        log4j.write_text(_LOG4J2)
        classpath = f"{libs}/*"
        started = time.monotonic()
        if not self.formatted():
            shutil.rmtree(data_dir, ignore_errors=True)  # a half-formatted directory from a crash
            data_dir.mkdir(parents=True)
            fmt = subprocess.run(
                [java, "-Xmx128m", "-XX:TieredStopAtLevel=1", "-cp", classpath,
                 "kafka.tools.StorageTool", "format", "--standalone",
                 "-t", _cluster_id(), "-c", str(props), *scram_format_args(self.scram_users)],
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
        self.sasl_bootstrap = f"127.0.0.1:{sport}" if sport else ""
        self._wait_ready(bport)
        self._wait_login()
        self.startup_seconds = time.monotonic() - started
        logger.info("Kafka %s ready at %s in %.1f s", self.version, self.bootstrap, self.startup_seconds)
        return self.bootstrap

    def _wait_ready(self, port: int) -> None:
        """The fixed-port listener opens only once the broker is unfenced: that is readiness."""
        assert self.proc is not None
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                    return
            except OSError:
                time.sleep(0.2)  # polling a socket that is not open yet; bounded by the deadline
        self.stop()
        raise BrokerError(
            f"Kafka did not open {port} within {_READY_TIMEOUT_S:.0f} s; log tail:\n{self.log_tail()}"
        )

    def _wait_login(self) -> None:
        """With a SASL listener, ready means a login completes there: the plain port opens first,
        and on a loaded machine a client's first SASL handshake could outlast its 10 s timeout."""
        users = self.sasl_users or self.scram_users
        if not users:
            return
        from pipeline.transport.kafka import KafkaSettings  # lazy: start-up, only a SASL broker logs in

        user, password = next(iter(users.items()))
        options = {"security.protocol": "SASL_PLAINTEXT", "sasl.username": user, "sasl.password": password,
                   "sasl.mechanism": "PLAIN" if self.sasl_users else SCRAM_MECHANISM}  # fmt: skip
        settings = KafkaSettings(self.sasl_bootstrap, options, outage_budget_s=0.0)
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while True:
            try:
                with settings.admin():
                    return
            except BrokerError as exc:  # the handshake timed out, or the listener is not open yet
                self._check_alive()
                if time.monotonic() > deadline:
                    self.stop()
                    raise BrokerError(f"no SASL login at {self.sasl_bootstrap} within "
                                      f"{_READY_TIMEOUT_S:.0f} s: {exc}") from None  # fmt: skip
                time.sleep(0.2)  # a refused connection returns at once; bounded by the deadline

    def _check_alive(self) -> None:
        """A JVM that died while starting fails the wait at once, with its log, not at the deadline."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise BrokerError(
                f"the Kafka JVM exited with {self.proc.returncode} during startup; "
                f"log tail ({self.log_path}):\n{self.log_tail()}"
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
            self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


@contextlib.contextmanager
def env_or_local_broker() -> Iterator[str]:
    """``KAFKA_BOOTSTRAP_SERVERS`` if set, else a throwaway local broker for the block, whose
    directory (topics, logs: up to hundreds of MB) is removed once the broker has stopped."""
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        yield os.environ["KAFKA_BOOTSTRAP_SERVERS"]
        return
    scratch = tempfile.TemporaryDirectory(prefix="specstream-kafka-", ignore_cleanup_errors=True)
    with scratch as workdir, LocalKafka(Path(workdir)) as local:  # the broker stops before the removal
        yield local.bootstrap


# --- a broker that outlives the CLI command that started it -------------------------------

