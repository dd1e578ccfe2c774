"""Riding out a broker outage: retry what failed for a passing reason, up to one budget.

A broker restarted by its operator, a failover or a network blip must not end a multi-day run.
Every call that talks to the broker goes through :func:`ride_out`: a retriable
``TransportError`` (no connection, a timeout, a coordinator that moved) is retried with
backoff, and the process says so once (one warning line per outage, one info line when the
broker answers again). The clock is the process's, not the call's: every client of a process
talks to the same cluster, so an outage that one call has already waited out is not waited
again by the next. Past ``budget_s`` of continuous outage the call raises ``BrokerError`` with
one line that says what to do; the same command run again resumes exactly. A call that keeps
failing past ``budget_s`` while other calls are answered raises too, with its own line.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from pipeline.core.errors import BrokerError
from pipeline.core.topics import TransportError

__all__ = ("DEFAULT_OUTAGE_BUDGET_S", "OUTAGE", "Outage", "bounded", "ride_out")

logger = logging.getLogger(__name__)

#: How long a process waits for its broker to come back before it gives up (``broker.outage_budget_s``).
DEFAULT_OUTAGE_BUDGET_S = 180.0

_T = TypeVar("_T")


class Outage:
    """The process's view of the broker: answering, or unreachable since a moment."""

    def __init__(self, *, quiet_s: float = 2.0) -> None:
        self._lock = threading.Lock()
        self._since: float | None = None
        self._warned = False
        self._quiet_s = quiet_s  # a blip shorter than this (a fresh coordinator loading) is not reported

    @property
    def down_s(self) -> float:
        """How long the current outage has lasted (0 when the broker answers)."""
        with self._lock:
            return 0.0 if self._since is None else time.monotonic() - self._since

    def failed(self, error: BaseException, *, where: str, what: str, budget_s: float) -> None:
        """Note a failed call; past the budget, raise the one-line ``BrokerError``."""
        with self._lock:
            now = time.monotonic()
            if self._since is None:
                self._since = now
            down = now - self._since
            if not self._warned and down >= self._quiet_s:
                self._warned = True
                logger.warning(
                    "the Kafka broker at %s does not answer (%s: %s); waiting up to %.0f s for it "
                    "(broker.outage_budget_s)",
                    where, what, error, budget_s,
                )  # fmt: skip
        if down > budget_s:
            raise BrokerError(
                f"the Kafka broker at {where} has not answered for {down:.0f} s (broker.outage_budget_s is "
                f"{budget_s:.0f}; last error in {what}: {error}): start it again (or raise the budget), then run "
                "the same command: it resumes exactly"
            ) from error

    def answered(self, where: str) -> None:
        """Note a call that succeeded: an outage, if any, is over."""
        with self._lock:
            since, self._since = self._since, None
            warned, self._warned = self._warned, False
        if since is not None and warned:
            logger.warning("the Kafka broker at %s answers again after %.0f s", where, time.monotonic() - since)


#: One per process: every client of a process talks to the same cluster.
OUTAGE = Outage()


def ride_out(
    call: Callable[[], _T],
    *,
    what: str,
    where: str,
    budget_s: float,
    also_retry: tuple[type[BaseException], ...] = (),
) -> _T:
    """``call()``, retried with backoff while it fails with a retriable ``TransportError``
    (or one of ``also_retry``) and the outage is shorter than ``budget_s``."""
    delay = 0.25
    failing_since: float | None = None  # this call's own clock: other clients may be answered meanwhile
    while True:
        try:
            result = call()
        except TransportError as exc:
            if not exc.retriable:
                raise
            OUTAGE.failed(exc, where=where, what=what, budget_s=budget_s)
            failing_since = _still_within(failing_since, exc, where=where, what=what, budget_s=budget_s)
        except also_retry as exc:
            OUTAGE.failed(exc, where=where, what=what, budget_s=budget_s)
            failing_since = _still_within(failing_since, exc, where=where, what=what, budget_s=budget_s)
        else:
            OUTAGE.answered(where)
            return result
        time.sleep(delay)  # backoff between attempts at an unreachable broker
        delay = min(delay * 2, 5.0)



def _still_within(since: float | None, error: BaseException, *, where: str, what: str, budget_s: float) -> float:
    """When this call began failing; past ``budget_s`` a ``BrokerError``. The process's clock
    restarts whenever another client is answered, so a call that fails for a reason of its own
    (a fetch held by a transaction nobody will end was seen) would otherwise retry for ever."""
    now = time.monotonic()
    if since is None:
        return now
    if now - since > budget_s:
        raise BrokerError(
            f"{what} has failed for {now - since:.0f} s while the Kafka broker at {where} answers other calls "
            f"(broker.outage_budget_s is {budget_s:.0f}; last error: {error}): run the same command again, it "
            "resumes exactly; if this recurs, the broker's log says why that call fails"
        ) from error
    return since

def bounded(call: Callable[[], _T], *, what: str, timeout_s: float) -> _T:
    """``call()`` with a deadline of our own, for a client call that can block forever.

    kafka-python 3.0's blocking calls wait on its IO thread without a deadline of their own; after
    a broker restart a committed-offsets fetch was seen never to return (a resumed run hung
    there for minutes). Past ``timeout_s`` this raises a retriable ``TransportError``, so
    :func:`ride_out` tries again and, past the outage budget, the process stops with one line
    instead of hanging. The abandoned call's thread is a daemon: it ends with the process.
    """
    box: dict[str, object] = {}
    done = threading.Event()

    def run() -> None:
        try:
            box["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = exc
        finally:
            done.set()

    threading.Thread(target=run, name=f"bounded: {what}", daemon=True).start()
    if not done.wait(timeout_s):
        raise TransportError(f"{what}: no answer from the Kafka client in {timeout_s:.0f} s", retriable=True)
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]
