"""Deterministic fault injection for the crash tests: die at a named point, on the n-th hit.

``SPECSTREAM_CRASH_AT="generate.before_commit:3"`` makes the process SIGKILL itself the third
time it reaches ``crash_point("generate.before_commit")``. SIGKILL, not an exception: no
``finally`` runs, no transaction is aborted politely, no file is closed, exactly as when a
machine dies. Outside tests the variable is unset and a crash point costs one dict lookup.
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from collections.abc import Callable

__all__ = ("crash_point", "CRASH_ENV")

CRASH_ENV = "SPECSTREAM_CRASH_AT"
_hits: Counter[str] = Counter()


def _target() -> tuple[str, int] | None:
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return None
    name, _, nth = spec.rpartition(":")
    return (name, int(nth)) if name else (spec, 1)


def crash_point(name: str, before_kill: Callable[[], None] | None = None) -> None:
    """Die here (SIGKILL) when the crash tests name this point; otherwise do nothing."""
    target = _target()
    if target is None or target[0] != name:
        return
    _hits[name] += 1
    if _hits[name] == target[1]:
        if before_kill is not None:
            before_kill()  # e.g. flush the producer so the doomed records really reach the log
        os.kill(os.getpid(), signal.SIGKILL)
