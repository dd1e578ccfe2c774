"""The interleaved loop: producers on threads, the trainer on the main thread, no hang on any exit.

Three endings, all bounded:

- the trainer finishes first (``max_steps``): the producers get a cooperative stop; they finish
  or abort their open transaction and return, and nothing waits on a watermark any more;
- the producers finish first: they closed every partition with end-of-stream, so the trainer
  drains what is left and returns on its own;
- a producer raises: the trainer is asked to stop (it checkpoints and returns), the other
  producers are stopped, and the producer's exception is re-raised on the main thread with its
  original traceback.

An external stop (SIGINT/SIGTERM through the CLI) stops both sides the same way.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from pipeline.core.errors import SpecstreamError

__all__ = ("Producer", "InterleaveResult", "run_interleaved", "ShutdownTimeout")

logger = logging.getLogger(__name__)

T = TypeVar("T")
Producer = Callable[[threading.Event], object]


class ShutdownTimeout(SpecstreamError):
    """A stage did not stop within its bound: reported, never waited on forever."""


@dataclass(frozen=True)
class InterleaveResult(Generic[T]):
    """The trainer's result and how the producers ended."""

    trainer: T
    stopped_producers: bool  # True when the trainer ended first and the producers were stopped


class _ProducerThread(threading.Thread):
    def __init__(self, name: str, fn: Producer, stop: threading.Event, on_error: Callable[[BaseException], None]) -> None:
        super().__init__(name=name, daemon=True)
        self._fn = fn
        self._stop_event = stop  # not _stop: threading.Thread has a method of that name
        self._on_error = on_error
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._fn(self._stop_event)
        except BaseException as exc:  # handed to the main thread, re-raised there
            self.error = exc
            self._on_error(exc)


def run_interleaved(
    producers: Sequence[Producer],
    trainer: Callable[[threading.Event], T],
    *,
    stop: threading.Event | None = None,
    join_timeout_s: float = 120.0,
) -> InterleaveResult[T]:
    """Run ``producers`` on threads and ``trainer`` here; see the module docstring for endings."""
    stop = stop or threading.Event()
    producer_stop = threading.Event()
    trainer_stop = threading.Event()

    def producer_failed(exc: BaseException) -> None:
        logger.error("producer failed: %s: %s; stopping the trainer", type(exc).__name__, exc)
        trainer_stop.set()
        producer_stop.set()

    threads = [
        _ProducerThread(f"producer-{i}", fn, producer_stop, producer_failed) for i, fn in enumerate(producers)
    ]
    relay = threading.Thread(target=_relay, args=(stop, producer_stop, trainer_stop), name="stop-relay", daemon=True)
    relay.start()
    for t in threads:
        t.start()
    trainer_error: BaseException | None = None
    result: T | None = None
    try:
        result = trainer(trainer_stop)
    except BaseException as exc:
        trainer_error = exc
    finished_early = any(t.is_alive() for t in threads)
    producer_stop.set()  # the trainer is done: nothing may wait on it any more
    for t in threads:
        t.join(join_timeout_s)
    trainer_stop.set()  # also ends the relay thread
    relay.join(5.0)
    stuck = [t.name for t in threads if t.is_alive()]
    errors = [t.error for t in threads if t.error is not None]
    if errors:
        first = errors[0]
        if trainer_error is not None:
            first.__context__ = trainer_error
        raise first.with_traceback(first.__traceback__)
    if trainer_error is not None:
        raise trainer_error
    if stuck:
        raise ShutdownTimeout(f"{', '.join(stuck)} did not stop within {join_timeout_s:.0f} s of the stop request")
    return InterleaveResult(result, stopped_producers=finished_early)  # type: ignore[arg-type]


def _relay(external: threading.Event, producer_stop: threading.Event, trainer_stop: threading.Event) -> None:
    """Forward an external stop to both sides; exits when the run ends."""
    while not trainer_stop.is_set():
        if external.wait(0.2):
            producer_stop.set()
            trainer_stop.set()
            return
