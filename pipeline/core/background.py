"""One call on a thread of its own, its result or its error handed back through a ``Future``.

The stages start small pieces of work beside their main one (the eval set's publishing, its
capture, its first load) and take the result, or re-raise the error, on their own thread later:
:class:`concurrent.futures.Future` already says that (``result(timeout)``, ``exception()``,
``done()``). The thread is a daemon, unlike an executor's: a call stuck in a broker or a model
must not keep the process from exiting once the stage has given up on it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import ParamSpec, TypeVar

__all__ = ("in_background",)

P = ParamSpec("P")
T = TypeVar("T")


def in_background(name: str, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> Future[T]:
    """Start ``fn(*args, **kwargs)`` on a daemon thread called ``name``; its future."""
    future: Future[T] = Future()
    future.set_running_or_notify_cancel()

    def run() -> None:
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # handed to whoever takes the result
            future.set_exception(exc)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future
