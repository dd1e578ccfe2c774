"""Progress a person can watch: a bar on a terminal, plain periodic lines everywhere else.

Every layer reports progress through :class:`Progress` (``update`` / ``close``): the app layer
opens one with :func:`open_bar` and hands it down, so the devkit and the trainer loop show
progress without importing the app. On a terminal it is a tqdm bar with total and ETA; when the
stream is not a terminal (CI logs, ``nohup``, a pipe) it writes one plain line at the start, at
most one per ``interval_s`` and one at the end: no carriage returns in a log.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol, TextIO

from tqdm import tqdm

__all__ = ("Progress", "OpenProgress", "LineBar", "TqdmBar", "NullBar", "open_bar", "format_duration", "is_terminal")

#: Seconds between two plain progress lines (one line per half minute reads well in a log).
LINE_INTERVAL_S = 30.0


class Progress(Protocol):
    """What a long loop reports to: ``n`` more units done (with a few figures), then closed."""

    def update(self, n: int = 1, **figures: object) -> None: ...

    def close(self) -> None: ...


class OpenProgress(Protocol):
    """Opens a :class:`Progress` (the app's ``Phases.bar``): what a lower layer is handed."""

    def __call__(self, desc: str, *, total: int | None, unit: str) -> Progress: ...


def format_duration(seconds: float) -> str:
    """``0.4 s``, ``14 s``, ``2 min 41 s``, ``3 h 02 min``: a duration as people say it."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{whole // 60} min {whole % 60} s"
    return f"{whole // 3600} h {whole % 3600 // 60:02d} min"


def is_terminal(stream: TextIO) -> bool:
    """Whether ``stream`` is an interactive terminal (a closed or odd stream is not)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class NullBar:
    """Progress nobody watches (another rank, a disabled bar)."""

    def update(self, n: int = 1, **figures: object) -> None:
        pass

    def close(self) -> None:
        pass


class LineBar:
    """Progress as plain lines: the first update, then at most one per ``interval_s``, then the end.

    ``desc: 120/400 steps (30%), 2.1 steps/s, ETA 2 min 13 s, loss=1.234``; without a total the
    count and rate only ("to the end of the stream").
    """

    def __init__(
        self,
        stream: TextIO,
        desc: str,
        *,
        total: int | None,
        unit: str,
        initial: int = 0,
        interval_s: float = LINE_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream, self.desc, self.total, self.unit = stream, desc, total, unit
        self.n = initial
        self._interval_s = interval_s
        self._clock = clock
        self._first: tuple[float, int] | None = None
        self._last_line: float | None = None
        self._written = initial  # the count the last line showed
        self._figures: dict[str, object] = {}
        self._closed = False

    def update(self, n: int = 1, **figures: object) -> None:
        now = self._clock()
        self.n += n
        self._figures.update(figures)
        if self._first is None:
            self._first = (now, self.n)  # the rate's origin: when the first units were done
        if self._last_line is None or now - self._last_line >= self._interval_s:
            self._write(now)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.n != self._written:
            self._write(self._clock())

    def line(self, now: float) -> str:
        """The progress line at ``now``. The rate runs from the first update: the wait for the
        first unit (a model to load, data to arrive) would make every ETA after it wrong."""
        parts = [f"{self.desc}: {self.n}" + (f"/{self.total}" if self.total else "") + f" {self.unit}s"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        if self._first is not None and now > self._first[0] and self.n > self._first[1]:
            rate = (self.n - self._first[1]) / (now - self._first[0])
            parts.append(f"{rate:.2f} {self.unit}s/s")
            if self.total and self.n < self.total:
                parts.append(f"ETA {format_duration((self.total - self.n) / rate)}")
        parts.extend(f"{k}={v}" for k, v in self._figures.items())
        return ", ".join(parts)

    def _write(self, now: float) -> None:
        self.stream.write(self.line(now) + "\n")
        self.stream.flush()
        self._last_line = now
        self._written = self.n


class TqdmBar:
    """A tqdm bar (a terminal): total, rate and ETA; figures as its postfix."""

    def __init__(self, stream: TextIO, desc: str, *, total: int | None, unit: str, initial: int = 0) -> None:
        self._bar: tqdm[Any] = tqdm(
            total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, file=stream
        )

    def update(self, n: int = 1, **figures: object) -> None:
        if figures:
            self._bar.set_postfix({k: str(v) for k, v in figures.items()}, refresh=False)
        self._bar.update(n)

    def close(self) -> None:
        self._bar.close()


def open_bar(
    stream: TextIO, desc: str, *, total: int | None, unit: str, initial: int = 0, interval_s: float = LINE_INTERVAL_S
) -> TqdmBar | LineBar:
    """A tqdm bar when ``stream`` is a terminal, else plain periodic lines (see the module docstring)."""
    if is_terminal(stream):
        return TqdmBar(stream, desc, total=total, unit=unit, initial=initial)
    return LineBar(stream, desc, total=total, unit=unit, initial=initial, interval_s=interval_s)
