"""Several trainer groups in one process (``specstream run``): one thread per group, one outcome.

Each group's trainer reads the same samples topic on its own (its own positions, ledger and
checkpoints), so they need nothing from each other while they run. What they share is how they
end: a group that fails stops the others (each checkpoints and returns, as on a signal) and its
error is raised here once all have returned; a stop from outside reaches every group. Every
wait is bounded by the trainers' own stop handling (a checkpoint, then return), as for one trainer.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import TypeVar

__all__ = ("run_groups",)

logger = logging.getLogger(__name__)

T = TypeVar("T")


def run_groups(
    trainers: Mapping[str | None, Callable[[threading.Event], T]], stop: threading.Event
) -> dict[str | None, T]:
    """Run each group's trainer (``trainers[name](stop)``) on its own thread; the results by group.

    One group alone runs here, on the calling thread, exactly as a run without groups."""
    if len(trainers) == 1:
        ((name, train),) = trainers.items()
        return {name: train(stop)}
    results: dict[str | None, T] = {}
    errors: list[BaseException] = []
    group_stop = threading.Event()
    done = threading.Event()

    def relay() -> None:  # an outside stop reaches every group
        while not done.is_set():
            if stop.wait(0.2):
                group_stop.set()
                return

    def one(name: str | None, train: Callable[[threading.Event], T]) -> None:
        try:
            results[name] = train(group_stop)
        except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread below
            logger.error("trainer group %s failed: %s: %s; stopping the other groups", name, type(exc).__name__, exc)
            errors.append(exc)
            group_stop.set()

    threads = [threading.Thread(target=one, args=item, name=f"trainer-{item[0]}", daemon=True)
               for item in trainers.items()]  # fmt: skip
    watcher = threading.Thread(target=relay, name="group-stop-relay", daemon=True)
    watcher.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done.set()
    watcher.join(timeout=1.0)
    if errors:
        raise errors[0]
    return results
