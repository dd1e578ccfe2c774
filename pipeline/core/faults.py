"""Deterministic fault injection for the crash tests: die (or stop) at a named point, on the n-th hit.

``SPECSTREAM_CRASH_AT="generate.before_commit:3"`` makes the process SIGKILL itself the third
time it reaches ``crash_point("generate.before_commit")``. SIGKILL, not an exception: no
``finally`` runs, no transaction is aborted politely, no file is closed, exactly as when a
machine dies. A third field names another signal: ``"generate.after_capture:2:SIGSTOP"`` freezes
the whole process there (a zombie, a stalled VM) until the test sends SIGCONT; the process says
so on stderr first, so the test knows when. Outside tests the variable is unset and a crash point
costs one dict lookup.
"""

from __future__ import annotations

import os
import signal
import sys
from collections import Counter
from collections.abc import Callable

__all__ = ("CRASH_ENV", "crash_point")

CRASH_ENV = "SPECSTREAM_CRASH_AT"
_hits: Counter[str] = Counter()


def _target() -> tuple[str, int, signal.Signals] | None:
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return None
    name, *rest = spec.split(":")
    nth = int(rest[0]) if rest else 1
    return name, nth, signal.Signals[rest[1]] if len(rest) > 1 else signal.SIGKILL


def crash_point(name: str, before_kill: Callable[[], None] | None = None) -> None:
    """Die here (SIGKILL, or the named signal) when the crash tests name this point; otherwise
    do nothing. A process stopped here (SIGSTOP) goes on from here once continued."""
    target = _target()
    if target is None or target[0] != name:
        return
    _hits[name] += 1
    if _hits[name] == target[1]:
        if before_kill is not None:
            before_kill()  # e.g. flush the producer so the doomed records really reach the log
        sig = target[2]
        if sig != signal.SIGKILL:
            print(f"crash point {name} (hit {target[1]}): {sig.name}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), sig)
