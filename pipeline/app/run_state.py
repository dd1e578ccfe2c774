"""Where a run stands, decided from its processes' newest heartbeats and its lag (pure).

The rules, in order (``specstream status`` shows the first that holds):

1. no heartbeat at all: ``unknown`` (not started yet, or a run from before heartbeats);
2. every trainer rank finished (the end of the stream): ``finished at T``, with the trainer's
   accounting (prompts, trained, missing, duplicates, ...);
3. every trainer rank stopped (``max_steps``, a signal): ``stopped at T``, with why;
4. a process whose newest heartbeat says ``failed``, and that no process of its role has taken
   over from since (a generator replaced under another worker id is a run going on): ``failed``,
   with its reason;
5. no process alive (alive: not ended, and heard from within :data:`SILENT_INTERVALS` of its own
   interval): ``stalled since T``, T its newest heartbeat;
6. a trainer rank silent while samples wait to be trained (lag > 0): ``stalled since T``;
7. otherwise ``running`` (noting generators that backpressure holds).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from pipeline.core.heartbeat import FINAL_STATES, process_key
from pipeline.core.messages import Heartbeat

__all__ = ("SILENT_INTERVALS", "RunState", "alive", "age_s", "decide_run_state")

#: A process not heard from for this many of its own heartbeat intervals is taken for dead.
SILENT_INTERVALS = 3

State = Literal["unknown", "running", "stalled", "finished", "stopped", "failed"]


@dataclass(frozen=True)
class RunState:
    """The run's state, since when (epoch seconds; None: not applicable), why, and (finished) the summary."""

    state: State
    since: float | None = None
    reason: str = ""
    summary: dict[str, int | float] = field(default_factory=dict)


def age_s(beat: Heartbeat, now: float) -> float:
    """Seconds since the process's newest heartbeat."""
    return max(0.0, now - beat.created_at)


def alive(beat: Heartbeat, now: float) -> bool:
    """Not ended, and heard from within ``SILENT_INTERVALS`` of its own interval."""
    return beat.state not in FINAL_STATES and age_s(beat, now) <= SILENT_INTERVALS * beat.interval_s


def _name(beat: Heartbeat) -> str:
    return process_key(beat.role, beat.id)


def _taken_over(failed: Heartbeat, beats: list[Heartbeat], now: float) -> bool:
    """Whether another process of the failed one's role was heard from since, alive or done."""
    later = [b for b in beats if b is not failed and b.role == failed.role and b.created_at > failed.created_at]
    return any(alive(b, now) or b.state in ("finished", "stopped") for b in later)


def decide_run_state(beats: Iterable[Heartbeat], *, now: float, lag: int) -> RunState:
    """The run's state from every process's newest heartbeat (see the module docstring)."""
    beats = sorted(beats, key=lambda b: (b.role, b.id))
    if not beats:
        return RunState("unknown", reason="no heartbeats: the run has not started, or it predates heartbeats")
    trainers = [b for b in beats if b.role == "trainer"]
    if trainers and all(b.state == "finished" for b in trainers):
        summary = next(
            (dict(b.counters) for b in trainers if "prompts" in b.counters), dict(trainers[0].counters)
        )
        return RunState("finished", max(b.created_at for b in trainers), "end of stream", summary)
    if trainers and all(b.state in FINAL_STATES for b in trainers):
        why = sorted({b.reason or b.state for b in trainers})
        return RunState("stopped", max(b.created_at for b in trainers), f"trainer stopped: {', '.join(why)}")
    failed = [b for b in beats if b.state == "failed" and not _taken_over(b, beats, now)]
    if failed:
        return RunState(
            "failed",
            max(b.created_at for b in failed),
            "; ".join(f"{_name(b)}: {b.reason or 'failed'}" for b in failed),
        )
    if not any(alive(b, now) for b in beats):
        last = max(beats, key=lambda b: b.created_at)
        return RunState(
            "stalled", last.created_at,
            f"no process alive; last heard: {_name(last)} ({last.state}) {age_s(last, now):.0f} s ago",
        )  # fmt: skip
    silent = [b for b in trainers if b.state not in FINAL_STATES and not alive(b, now)]
    if silent and lag > 0:
        return RunState(
            "stalled", max(b.created_at for b in silent),
            f"{', '.join(_name(b) for b in silent)} silent for {min(age_s(b, now) for b in silent):.0f} s "
            f"with {lag} samples waiting",
        )  # fmt: skip
    paused = [b for b in beats if b.role == "generator" and b.state == "paused" and alive(b, now)]
    return RunState("running", reason=f"{len(paused)} generators paused by backpressure" if paused else "")
