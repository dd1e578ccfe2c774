"""A group join that outlives the poll that started it is finished, never dropped or forgotten.

kafka-python 3.0.12 runs JoinGroup + SyncGroup as a task on its IO thread. ``poll`` waits for it
only until its own timeout; the next ``poll`` is meant to pick the task up again. Two paths lose
it, and both leave a member that owns nothing (or too little), with its heartbeats off until the
broker evicts it:

- **forgotten**: a rejoin asked for by a metadata change (partitions added, or a topic the first
  join did not know yet) has ``need_rejoin()`` answer from the metadata snapshot, which the
  leader's own assignment already reset. Once the poll that started the join has returned,
  nothing ever completes it: no ``on_partitions_assigned``, no heartbeat, no new join.
- **dropped**: a join task that *succeeded* while no poll waited is replaced by a fresh
  JoinGroup, which starts the next rebalance; a member whose polls are shorter than the round
  trip (``poll(0)`` while it holds work) never takes an assignment.

Both are seen on a real broker (tests/integration/test_group_join.py). The fix keeps the
library's own join loop and changes two answers it asks for: a join is still needed while one is
under way (``rejoining``: set when listeners were told of the revocation, cleared when the join
completes), and a task that already succeeded is offered as still pending, so the loop awaits its
result instead of replacing it.
"""

from __future__ import annotations

import logging
from typing import Any

__all__ = ("finish_unfinished_joins",)

logger = logging.getLogger(__name__)

#: The coordinator internals the fix reads and wraps (kafka-python 3.0).
_NEEDS = ("need_rejoin", "join_group_async", "rejoining", "_join_task")


class _Succeeded:
    """A join task that succeeded while no poll waited, offered to the join loop as pending:
    the loop then awaits it (it resolves at once) and applies its assignment."""

    is_done = False

    def __init__(self, task: Any) -> None:
        self._task = task

    def add_callback(self, f: Any, *args: Any, **kwargs: Any) -> _Succeeded:
        self._task.add_callback(f, *args, **kwargs)
        return self

    def add_errback(self, f: Any, *args: Any, **kwargs: Any) -> _Succeeded:
        self._task.add_errback(f, *args, **kwargs)
        return self

    def __await__(self) -> Any:
        return self._task.__await__()


def finish_unfinished_joins(consumer: Any) -> bool:
    """Fix the group join of this kafka-python consumer (module docstring); whether it applied.

    Applies per consumer (its coordinator's methods are wrapped on the instance), so no other
    kafka-python user in the process is touched. A client without these internals (another
    major version) is left as it is, with a warning.
    """
    coordinator = getattr(consumer, "_coordinator", None)
    if coordinator is None or not all(hasattr(coordinator, name) for name in _NEEDS):
        logger.warning("kafka-python's group coordinator changed: the join fix is not applied")
        return False
    library_need_rejoin = coordinator.need_rejoin
    library_join = coordinator.join_group_async

    def need_rejoin() -> bool:
        return bool(library_need_rejoin() or coordinator.rejoining)

    async def join_group_async(timeout_ms: Any = None) -> Any:
        task = coordinator._join_task
        if task is not None and task.is_done and task.exception is None:
            coordinator._join_task = _Succeeded(task)
        return await library_join(timeout_ms)

    coordinator.need_rejoin = need_rejoin
    coordinator.join_group_async = join_group_async
    return True
