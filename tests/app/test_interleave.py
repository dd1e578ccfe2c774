"""The interleaved loop's three endings, with stand-in stages (the real ones run in integration)."""

from __future__ import annotations

import threading
import traceback

import pytest

from pipeline.app.interleave import ShutdownTimeout, run_interleaved

BOUND = 10.0  # every wait in these stand-ins is bounded


def test_trainer_first_stops_the_producers_cooperatively() -> None:
    stopped = threading.Event()

    def producer(stop: threading.Event) -> None:
        assert stop.wait(BOUND), "the producer was never told to stop"  # e.g. parked on a watermark
        stopped.set()

    result = run_interleaved([producer, producer], lambda stop: "trained 3 steps", join_timeout_s=BOUND)
    assert result.trainer == "trained 3 steps" and result.stopped_producers and stopped.is_set()


def test_producer_first_lets_the_trainer_drain() -> None:
    produced = threading.Event()

    def producer(stop: threading.Event) -> None:
        produced.set()  # published everything, closed every partition

    def trainer(stop: threading.Event) -> str:
        assert produced.wait(BOUND)
        return "drained"

    result = run_interleaved([producer], trainer, join_timeout_s=BOUND)
    assert result.trainer == "drained" and not result.stopped_producers


def test_producer_error_unblocks_the_trainer_and_is_reraised_with_its_traceback() -> None:
    trainer_stopped = threading.Event()

    def broken_capture(stop: threading.Event) -> None:
        raise RuntimeError("CUDA out of memory in capture")

    def trainer(stop: threading.Event) -> str:
        assert stop.wait(BOUND), "the trainer was left waiting for data"
        trainer_stopped.set()
        return "checkpointed"

    with pytest.raises(RuntimeError, match="out of memory") as info:
        run_interleaved([broken_capture], trainer, join_timeout_s=BOUND)
    assert trainer_stopped.is_set()
    frames = "".join(traceback.format_tb(info.value.__traceback__))
    assert "broken_capture" in frames  # the producer's own frame, not just the re-raise site


def test_external_stop_reaches_both_sides() -> None:
    external = threading.Event()

    def producer(stop: threading.Event) -> None:
        assert stop.wait(BOUND)

    def trainer(stop: threading.Event) -> str:
        external.set()  # SIGTERM arrives while training
        assert stop.wait(BOUND)
        return "stopped"

    assert run_interleaved([producer], trainer, stop=external, join_timeout_s=BOUND).trainer == "stopped"


def test_a_producer_that_ignores_stop_is_reported_not_waited_on() -> None:
    release = threading.Event()

    def stubborn(stop: threading.Event) -> None:
        release.wait(BOUND)

    with pytest.raises(ShutdownTimeout, match="producer-0"):
        run_interleaved([stubborn], lambda stop: None, join_timeout_s=0.5)
    release.set()


def test_trainer_error_still_stops_producers() -> None:
    stopped = threading.Event()

    def producer(stop: threading.Event) -> None:
        assert stop.wait(BOUND)
        stopped.set()

    def trainer(stop: threading.Event) -> None:
        raise ValueError("nan loss")

    with pytest.raises(ValueError, match="nan"):
        run_interleaved([producer], trainer, join_timeout_s=BOUND)
    assert stopped.is_set()
