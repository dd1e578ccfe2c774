"""What a fenced generator tells its operator: who took over, and that nothing is lost.

The broker fences a transactional producer in two ways, and the fix differs: the same
transactional id started again (a second process with this worker id, or this one stalled past
its transaction timeout and a restart took over), or the group moved the partitions away
(KIP-447's group metadata, checked when the transaction commits its offsets).
"""

from __future__ import annotations

from pipeline.core.topics import FencedError

__all__ = ("explain_fenced",)


def explain_fenced(exc: FencedError, worker_id: str, transactional_id: str) -> FencedError:
    """``exc`` said in the operator's terms, with the fix; ``same_id`` is kept."""
    me = f"generator {worker_id} was fenced"
    if exc.same_id:  # the broker bumped our producer epoch: a new instance, or its own timeout abort
        why = (f"another process with the same worker id started (transactional id {transactional_id}), "
               "or this one stalled longer than broker.transaction_timeout_ms")  # fmt: skip
        fix = "give each generator its own worker id; after a stall (paused, swapping), restart it"
    else:
        why = "the generators' group moved its partitions to the other workers"
        fix = "restart it to rejoin the group"
    return FencedError(f"{me}: {why}; the broker aborted its open transaction, nothing is lost ({fix})",
                       same_id=exc.same_id)  # fmt: skip
