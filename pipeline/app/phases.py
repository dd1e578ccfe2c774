"""What a long command tells a person while it works: a line per phase, bars, and the summary.

A command makes one :class:`Phases` at its start. ``with phases.phase("target", "building the
tiny target..."):`` prints the start line and times the phase; ``phases.bar(...)`` opens a
progress bar (tqdm on a terminal, plain periodic lines in a log: see
:mod:`pipeline.core.feedback`) that lower layers update without importing the app; and
``phases.summary()`` reports the wall time of the whole command, process start-up included,
with what each phase took: ``done in 2 min 41 s: broker 14 s, target 72 s, training 71 s``.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from pipeline.core.feedback import LINE_INTERVAL_S, LineBar, TqdmBar, format_duration, is_terminal, open_bar
from pipeline.transport import background_broker, kafka_jars

__all__ = ("Phase", "Phases", "Watch", "process_age_s", "quiet_library_bars", "assemble_jars", "local_broker_phase")


def process_age_s() -> float:
    """Seconds since this process started (interpreter start-up and imports included); 0 where
    the system does not say (no procfs)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def quiet_library_bars(stream: TextIO) -> None:
    """Off a terminal, the libraries' own tqdm bars (transformers' "Loading weights") would write
    carriage returns into the log: switch them off (before they are imported, or after)."""
    if is_terminal(stream):
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name, switch in (("huggingface_hub.utils", "disable_progress_bars"), ("transformers.utils.logging", "disable_progress_bar")):
        module = sys.modules.get(name)  # already imported: its switch, as the variable is read at import
        if module is not None:
            getattr(module, switch)()


@dataclass
class Phase:
    """One running phase; set ``done`` to print a closing line ("<done> after 14 s")."""

    name: str
    done: str | None = None


class Watch:
    """Feeds a bar from counters read on demand; thread-safe (a poller and the workers tick it)."""

    def __init__(self, bar: TqdmBar | LineBar, read: Callable[[], dict[str, int]], finished: Callable[[], bool]) -> None:
        self._bar, self._read, self._finished = bar, read, finished
        self._lock = threading.Lock()
        self._shown = 0
        self.closed = False

    def tick(self) -> None:
        """Show the counters now; close the bar once the work is finished."""
        with self._lock:
            if self.closed:
                return
            counts = self._read()
            now = sum(counts.values())
            if now != self._shown:
                self._bar.update(now - self._shown, **counts)
                self._shown = now
            if self._finished():
                self._close()

    def close(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        if not self.closed:
            self.closed = True
            self._bar.close()


class Phases:
    """A command's phases, timed, with their lines on ``stream`` (default stderr)."""

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        age_s: float | None = None,
        interval_s: float = LINE_INTERVAL_S,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        if stream is None:
            quiet_library_bars(self.stream)
        self._clock = clock
        self.started = clock() - (process_age_s() if age_s is None else age_s)
        self.durations: dict[str, float] = {}
        self.interval_s = interval_s

    def say(self, line: str) -> None:
        """One line, flushed (a log shows it at once)."""
        self.stream.write(line + "\n")
        self.stream.flush()

    @contextlib.contextmanager
    def phase(self, name: str, start: str | None = None) -> Iterator[Phase]:
        """Print ``start`` (default "<name>..."), time the block; its time adds to ``name``."""
        self.say(start or f"{name}...")
        began = self._clock()
        handle = Phase(name)
        try:
            yield handle
        finally:
            took = self._clock() - began
            self.durations[name] = self.durations.get(name, 0.0) + took
            if handle.done:
                self.say(f"{handle.done} after {format_duration(took)}")

    def bar(self, desc: str, *, total: int | None, unit: str, initial: int = 0) -> TqdmBar | LineBar:
        """A progress bar on this stream; a lower layer takes it as :class:`~pipeline.core.feedback.Progress`."""
        return open_bar(self.stream, desc, total=total, unit=unit, initial=initial, interval_s=self.interval_s)

    @contextlib.contextmanager
    def watch(
        self,
        desc: str,
        *,
        total: int | None,
        unit: str,
        read: Callable[[], dict[str, int]],
        finished: Callable[[], bool] = lambda: False,
        every_s: float = 1.0,
    ) -> Iterator[Watch]:
        """A bar over counters that report no progress themselves (each generator's samples): a
        thread reads them every ``every_s`` while the block runs (the bar shows their sum, each one
        as a figure); it closes when ``finished()`` says so at a tick, or when the block ends."""
        watch = Watch(self.bar(desc, total=total, unit=unit), read, finished)
        stop = threading.Event()

        def poll() -> None:
            while not stop.wait(every_s) and not watch.closed:
                watch.tick()

        thread = threading.Thread(target=poll, name=f"watch-{desc}", daemon=True)
        thread.start()
        try:
            yield watch
        finally:
            stop.set()
            thread.join(every_s + 5.0)
            watch.tick()
            watch.close()

    @property
    def wall_s(self) -> float:
        """The whole command's wall time so far, from the process start."""
        return self._clock() - self.started

    def summary(self, head: str = "done") -> str:
        """``done in 2 min 41 s: broker 14 s, target 72 s, training 71 s, export 1 s``."""
        parts = ", ".join(f"{name} {format_duration(s)}" for name, s in self.durations.items())
        return f"{head} in {format_duration(self.wall_s)}" + (f": {parts}" if parts else "")


def assemble_jars(
    phases: Phases, version: str = kafka_jars.KAFKA_VERSION, *, force: bool = False, tools: bool = True
) -> Path:
    """The broker's jars (and Kafka's command-line tools), assembled from Maven Central with a start
    and a done line when missing. ``tools=False``: an install that can start the broker will do (a
    broker start never needs Maven for the tools)."""
    libs = kafka_jars.libs_dir(version)
    ready = kafka_jars.tools_ready if tools else kafka_jars.libs_ready
    if ready(libs, version) and not force:
        return libs
    start = f"assembling the Kafka {version} broker jars and tools from Maven Central (once)..."
    with phases.phase("jars", start) as step:
        libs = kafka_jars.install(version, force=force)
        size = sum(f.stat().st_size for f in libs.iterdir() if f.is_file())
        step.done = f"Kafka jars in {libs} ({size / 1e6:.0f} MB)"
    return libs


def local_broker_phase(phases: Phases) -> str:
    """The local broker's address: the running one, or one started with its phase lines (the jars
    first when they are missing)."""
    running = background_broker.detached_status()
    if running is not None:
        phases.say(f"local Kafka broker at {running.bootstrap} (stop it with `specstream broker stop`)")
        return running.bootstrap
    assemble_jars(phases, tools=False)
    start = "starting the local Kafka broker (it keeps running: `specstream broker stop` stops it)..."
    with phases.phase("broker", start) as step:
        state = background_broker.start_detached()
        step.done = f"broker ready at {state.bootstrap}"
    return state.bootstrap
