"""The user's local broker that outlives the command that started it (``specstream broker``).

One broker per ``$SPECSTREAM_HOME``: ``start_detached`` starts it (or finds the running one) under
a lock, so two concurrent starts share one JVM; ``stop_detached`` signals the recorded pid only
while it is still our Kafka JVM; the data and the address survive stop/start (see
``pipeline.transport.broker``). ``delete_detached_data`` forgets every topic on purpose.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import BrokerError
from pipeline.transport.broker import DEFAULT_PORTS, STOP_TIMEOUT_S, LocalKafka
from pipeline.transport.kafka_jars import KAFKA_VERSION, home_dir

__all__ = ("ORIGIN", "DetachedBroker", "detached_status", "start_detached", "stop_detached", "delete_detached_data")

#: Where the local broker's address comes from, as an error message names it.
ORIGIN = "`specstream broker start`"


@dataclass(frozen=True)
class DetachedBroker:
    """A broker started in the background: enough to find, check and stop it later."""

    pid: int
    bootstrap: str
    workdir: str
    version: str


def _state_file() -> Path:
    return home_dir() / "broker" / "state.json"


def _workdir() -> Path:
    return home_dir() / "broker" / "run"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_our_broker(pid: int, workdir: str) -> bool:
    """The pid is a live Kafka JVM over our work directory (pids are reused after a reboot)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return _alive(pid) and not Path("/proc/self").exists()  # no procfs: trust the pid
    return "kafka.Kafka" in cmdline and workdir in cmdline


@contextlib.contextmanager
def _start_lock() -> Iterator[None]:
    """One start at a time: two concurrent ``broker start`` must not both launch a JVM."""
    path = _mkdir(home_dir() / "broker") / "start.lock"
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def detached_status() -> DetachedBroker | None:
    """The broker started by ``specstream broker start``, if it still runs."""
    path = _state_file()
    try:
        state = DetachedBroker(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None
    if not _is_our_broker(state.pid, state.workdir):
        path.unlink(missing_ok=True)
        return None
    return state


def start_detached(version: str = KAFKA_VERSION, heap_mb: int = 512) -> DetachedBroker:
    """Start (or find) the user's local broker; it keeps running after this process exits.

    Its data and its address survive ``stop``/``start`` and machine restarts (see the module
    docstring), so runs, their topics and saved configs stay valid.
    """
    with _start_lock():
        running = detached_status()
        if running is not None:
            return running
        workdir = _mkdir(_workdir())
        broker = LocalKafka(
            workdir, version=version, heap_mb=heap_mb, attached=False, preferred_ports=DEFAULT_PORTS
        )
        broker.start()
        assert broker.proc is not None
        state = DetachedBroker(broker.proc.pid, broker.bootstrap, str(workdir), version)
        _state_file().write_text(json.dumps(state.__dict__))
        return state


def stop_detached() -> bool:
    """Stop the broker of ``specstream broker start`` (its data stays); False if none was running."""
    state = detached_status()
    if state is None:
        return False
    os.kill(state.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while _alive(state.pid) and time.monotonic() < deadline:
        time.sleep(0.2)  # waiting for another process to exit: no handle to wait() on
    if _alive(state.pid):
        os.kill(state.pid, signal.SIGKILL)
    _state_file().unlink(missing_ok=True)
    return True


def delete_detached_data() -> Path:
    """Forget every topic of the local broker (it must be stopped): a fresh start formats anew."""
    if detached_status() is not None:
        raise BrokerError("the local broker is running: `specstream broker stop` first")
    workdir = _workdir()
    shutil.rmtree(workdir, ignore_errors=True)
    return workdir


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
