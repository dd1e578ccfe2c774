"""``in_background``: one call on a daemon thread, its result or its error through a Future."""

from __future__ import annotations

import threading

import pytest

from pipeline.core.background import in_background


def test_the_result_comes_back_and_the_thread_is_a_named_daemon() -> None:
    seen: list[threading.Thread] = []

    def work(a: int, *, b: int) -> int:
        seen.append(threading.current_thread())
        return a + b

    assert in_background("adder", work, 2, b=3).result(timeout=10) == 5
    assert seen[0].name == "adder" and seen[0].daemon and seen[0] is not threading.current_thread()


def test_the_error_is_raised_where_the_result_is_taken() -> None:
    def fail() -> None:
        raise OSError("disk gone")

    future = in_background("failer", fail)
    with pytest.raises(OSError, match="disk gone"):
        future.result(timeout=10)
    assert isinstance(future.exception(), OSError)


def test_a_call_still_running_times_out_the_wait_not_the_call() -> None:
    release = threading.Event()
    future = in_background("waiter", release.wait, 30)
    with pytest.raises(TimeoutError):
        future.result(timeout=0.1)
    assert not future.done()
    release.set()
    assert future.result(timeout=10) is True
