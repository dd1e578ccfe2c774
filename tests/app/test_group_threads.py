"""Several trainer groups in one process: each on its own thread, one failure stops the others and
is raised, an outside stop reaches every group, one group alone runs on the calling thread."""

from __future__ import annotations

import threading

import pytest

from pipeline.app.group_threads import run_groups


def _until_stopped(seen: list[str], name: str):  # type: ignore[no-untyped-def]
    def train(stop: threading.Event) -> str:
        assert stop.wait(30), f"group {name} was never stopped"
        seen.append(name)
        return name

    return train


def test_every_group_runs_and_returns_its_result() -> None:
    results = run_groups({"a": lambda stop: 1, "b": lambda stop: 2}, threading.Event())
    assert results == {"a": 1, "b": 2}
    caller = threading.current_thread()
    assert run_groups({None: lambda stop: threading.current_thread() is caller}, threading.Event()) == {None: True}


def test_a_failing_group_stops_the_others_and_its_error_is_raised() -> None:
    seen: list[str] = []

    def fail(stop: threading.Event) -> str:
        raise RuntimeError("group b broke")

    with pytest.raises(RuntimeError, match="group b broke"):
        run_groups({"a": _until_stopped(seen, "a"), "b": fail}, threading.Event())
    assert seen == ["a"]  # it was stopped (and returned) before the error came back


def test_an_outside_stop_reaches_every_group() -> None:
    seen: list[str] = []
    stop = threading.Event()
    timer = threading.Timer(0.2, stop.set)
    timer.start()
    try:
        results = run_groups({"a": _until_stopped(seen, "a"), "b": _until_stopped(seen, "b")}, stop)
    finally:
        timer.cancel()
    assert results == {"a": "a", "b": "b"} and sorted(seen) == ["a", "b"]
