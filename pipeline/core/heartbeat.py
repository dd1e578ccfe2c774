"""Heartbeats: every process of a run says, every few seconds, that it lives, what it does and why.

A :class:`HeartbeatPublisher` runs beside a stage (source, generator worker, trainer rank) on its
own daemon thread with a plain producer: it publishes a :class:`~pipeline.core.messages.Heartbeat`
to the run's compacted heartbeats topic every ``interval_s`` and at once when the stage changes
state, and a final one (finished, stopped or failed with a one-line reason) when the stage ends.
Publishing never blocks or fails the stage: the broker is only touched on the publisher's thread,
its errors are logged (once per kind) and skipped, and closing waits a bounded time.

While the stage is paused or waiting, the publisher also logs one line per interval, so that a
stalled-looking process says why in its own log. :func:`read_heartbeats` is the reading side:
the newest heartbeat of every process (``specstream status``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Literal

from pipeline.core.errors import DecodeError, SpecstreamError
from pipeline.core.messages import Heartbeat, decode, encode, now
from pipeline.core.topics import Producer, RunTopics, Transport, read_to_end

__all__ = (
    "HEARTBEAT_TOPIC_CONFIG",
    "Role",
    "State",
    "FINAL_STATES",
    "process_key",
    "one_line",
    "HeartbeatPublisher",
    "read_heartbeats",
)

logger = logging.getLogger(__name__)

Role = Literal["source", "generator", "trainer"]
State = Literal["starting", "running", "paused", "waiting", "finished", "stopped", "failed"]
FINAL_STATES = frozenset({"finished", "stopped", "failed"})

#: Compacted so the topic holds about one record per process: short segments and a low dirty
#: ratio let the cleaner run within minutes, so ``status`` reads little even after days.
HEARTBEAT_TOPIC_CONFIG: Mapping[str, str] = {
    "cleanup.policy": "compact",
    "segment.ms": "600000",
    "min.cleanable.dirty.ratio": "0.1",
}
Counters = Mapping[str, int | float]


def process_key(role: str, process_id: str) -> str:
    """The record key of one process: stable across its heartbeats (compaction keeps the newest)."""
    return f"{role}/{process_id}"


def one_line(exc: BaseException) -> str:
    """An error as one line: its type and the first line of its message, bounded."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:1000] if text else type(exc).__name__


class HeartbeatPublisher:
    """One process's heartbeat, published from a background thread (see module docstring).

    ``counters()`` is called on the publisher's thread at every beat: it must only read (ints of
    the stage's live stats). ``interval_s`` None: disabled, every method is a no-op.
    """

    def __init__(
        self,
        transport: Transport,
        run_id: str,
        role: Role,
        process_id: str,
        interval_s: float | None,
        counters: Callable[[], Counters] = dict,
    ) -> None:
        self.transport = transport
        self.topics = RunTopics(run_id)
        self.role: Role = role
        self.process_id = process_id
        self.interval_s = interval_s
        self.counters = counters
        self.state: State = "starting"
        self.reason = ""
        self.started_at = now()
        self._since = time.monotonic()  # when the state last changed (for the waiting log lines)
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._producer: Producer | None = None
        self._warned: set[str] = set()
        self.published = 0

    @property
    def name(self) -> str:
        return process_key(self.role, self.process_id)

    def start(self) -> HeartbeatPublisher:
        """Start beating (idempotent); nothing here touches the broker."""
        if self.interval_s is not None and self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"heartbeat-{self.name}", daemon=True)
            self._thread.start()
        return self

    def set_state(self, state: State, reason: str = "") -> None:
        """A new state (published at once); the same state with another reason just updates it."""
        with self._lock:
            changed = state != self.state
            self.state, self.reason = state, reason
            if changed:
                self._since = time.monotonic()
        if changed:
            self._wake.set()

    def close(self, state: State = "finished", reason: str = "", timeout_s: float = 5.0) -> None:
        """Publish the final heartbeat and stop, waiting at most ``timeout_s`` for the broker."""
        with self._lock:
            self.state, self.reason = state, reason
        self._closing.set()
        self._wake.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout_s)
            if thread.is_alive():
                logger.warning(
                    "%s: final heartbeat not delivered in %.0f s; exiting without it", self.name, timeout_s
                )
                producer = self._producer
                if producer is not None:  # the thread is stuck on the broker: stop its producer here
                    producer.close(timeout_s=0)

    def fail(self, exc: BaseException) -> None:
        """The stage raised: the final heartbeat says failed, with the error's one line."""
        self.close("failed", one_line(exc))

    @contextlib.contextmanager
    def lifetime(self, stop: threading.Event | None = None) -> Iterator[HeartbeatPublisher]:
        """Beat while the block runs; its end is the final heartbeat: failed (it raised), stopped
        (``stop`` was set: a signal or the trainer's end) or finished."""
        self.start()
        try:
            yield self
        except BaseException as exc:
            self.close("failed", "interrupted" if isinstance(exc, KeyboardInterrupt) else one_line(exc))
            raise
        if stop is not None and stop.is_set():
            self.close("stopped", "stop requested")
        else:
            self.close("finished")

    # --- the publisher's thread ----------------------------------------------------------

    def _run(self) -> None:
        assert self.interval_s is not None
        try:
            while True:
                closing = self._closing.is_set()
                self._beat()
                if closing:
                    return
                self._log_waiting()
                self._wake.wait(self.interval_s)
                self._wake.clear()
        finally:
            if self._producer is not None:
                try:
                    self._producer.close(timeout_s=2.0)
                except Exception as exc:  # noqa: BLE001 - closing must not fail the stage
                    logger.debug("%s: closing the heartbeat producer: %s", self.name, exc)

    def _beat(self) -> None:
        try:
            if self._producer is None:
                with self.transport.admin() as admin:
                    admin.ensure_topics(
                        {self.topics.heartbeats: 1}, configs={self.topics.heartbeats: HEARTBEAT_TOPIC_CONFIG}
                    )
                self._producer = self.transport.plain_producer()
            value = encode(self.message())
            self._producer.send(self.topics.heartbeats, value, partition=0, key=self.name.encode())
            self._producer.flush(timeout_s=min(2.0, self.interval_s or 2.0), ride_out=False)
            self.published += 1
        except Exception as exc:  # noqa: BLE001 - a heartbeat must never fail the stage
            kind = type(exc).__name__
            log = logger.debug if kind in self._warned else logger.warning
            self._warned.add(kind)
            log("%s: heartbeat not published (%s); the stage goes on", self.name, one_line(exc))

    def message(self) -> Heartbeat:
        """The heartbeat as of now."""
        with self._lock:
            state, reason = self.state, self.reason
        try:
            counters = {str(k)[:64]: v for k, v in list(self.counters().items())[:32]}
        except Exception as exc:  # noqa: BLE001 - a counter read racing the stage: beat without them
            logger.debug("%s: counters not read: %s", self.name, exc)
            counters = {}
        assert self.interval_s is not None
        return Heartbeat(
            run_id=self.topics.run_id,
            role=self.role,
            id=self.process_id,
            host=socket.gethostname()[:255],
            pid=os.getpid(),
            state=state,
            reason=reason[:1000],
            counters=counters,
            interval_s=self.interval_s,
            started_at=self.started_at,
            created_at=now(),
        )

    def _log_waiting(self) -> None:
        """A paused or waiting stage says so every interval, with how long and why."""
        with self._lock:
            state, reason, since = self.state, self.reason, self._since
        if state in ("paused", "waiting"):
            logger.info("%s %s for %.0f s: %s", self.name, state, time.monotonic() - since, reason or "-")


def read_heartbeats(transport: Transport, run_id: str, *, timeout_s: float = 30.0) -> dict[str, Heartbeat]:
    """The newest heartbeat of every process of the run (empty: none yet, or an older run)."""
    topic = RunTopics(run_id).heartbeats
    with transport.admin() as admin:
        if admin.partition_count(topic) is None:
            return {}
    latest: dict[str, Heartbeat] = {}
    for record in read_to_end(transport, topic, [0], timeout_s=timeout_s):
        try:
            beat = decode(record.value or b"")
        except (DecodeError, SpecstreamError):
            continue
        if isinstance(beat, Heartbeat) and beat.run_id == run_id:
            key = process_key(beat.role, beat.id)
            if key not in latest or beat.created_at >= latest[key].created_at:
                latest[key] = beat
    return latest
