"""What a generator worker did: counts and timings, filled in live and returned by ``run``."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ("GeneratorStats",)


@dataclass
class GeneratorStats:
    """One worker's counts and timings, for its exit log, the benchmarks and the tests."""

    batches: int = 0
    refs: int = 0
    dropped: int = 0
    ended_partitions: list[int] = field(default_factory=list)
    capture_s: float = 0.0
    write_s: float = 0.0
    commit_s: float = 0.0
    tokens: int = 0
    nbytes: int = 0
    stale_batches: int = 0
    aborted_batches: int = 0
    rebalances: int = 0
    pauses: int = 0
    paused_s: float = 0.0  # closed pauses; an open one started at paused_since
    paused_since: float | None = None  # time.monotonic() when every owned partition paused; None: running
    max_backlog: int = 0
    reread: int = 0  # polled records dropped uncaptured to be read again (a reposition: rebalance, abort)
    wall_s: float = 0.0
    busy_s: float = 0.0  # from the first polled prompt to the last commit: steady-state time
