"""``specstream status``: where a run stands, per partition and per process, read from Kafka alone.

Produced and dropped counts come from the generators' committed offset metadata (exact, written
in the same transactions as the refs); consumed counts and the step come from the newest ledger
record; samples/s from the ledger's recent records; the dead letters, counted by reason, from the
DLQ; the prompt total from the source's counts; every process's state and last-seen age from its
newest heartbeat, and the run's state from those (:mod:`pipeline.app.run_state`). Nothing here
writes anything.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from pipeline.app.deadletters import ReasonCount, count_by_reason, read_dead_letters
from pipeline.app.manifest import read_manifest
from pipeline.app.run_state import RunState, age_s, alive, decide_run_state
from pipeline.core.errors import RunMismatchError
from pipeline.core.feedback import format_duration
from pipeline.core.heartbeat import FINAL_STATES, read_heartbeats
from pipeline.core.messages import Heartbeat, LedgerStep, decode
from pipeline.core.progress import PartitionCounters, read_source_counters
from pipeline.core.topics import RunTopics, Transport, read_to_end

__all__ = ("PartitionStatus", "RunStatus", "run_status", "render_status")

ROLES = ("source", "generator", "trainer")  # the order status lists processes in: the DAG's


@dataclass(frozen=True)
class PartitionStatus:
    """One partition: produced, dropped and consumed counts and whether it ended."""

    partition: int
    produced: int
    dropped: int
    generator_ended: bool
    consumed: int

    @property
    def backlog(self) -> int:
        return max(0, self.produced - self.consumed)


@dataclass(frozen=True)
class RunStatus:
    """Where a run stands, read from Kafka alone, as of ``now`` (epoch seconds)."""

    run_id: str
    partitions: list[PartitionStatus]
    step: int | None
    samples_per_s: float | None
    dead_letters: int
    letters_by_reason: list[ReasonCount] = field(default_factory=list)  # largest group first
    processes: list[Heartbeat] = field(default_factory=list)
    state: RunState = field(default_factory=lambda: RunState("unknown"))
    prompts: int = 0  # the source's committed prompts
    source_ended: bool = False  # every prompts partition has its end-of-stream marker
    now: float = 0.0
    epoch: int = 0  # the newest step's epoch (0: the online pass)
    epochs: int = 1  # the run's train.epochs (from its manifest)
    passes: int = 0  # sample passes trained so far, every epoch
    groups: dict[str, GroupProgress] = field(default_factory=dict)  # each trainer group's (``train_groups``)

    @property
    def produced(self) -> int:
        return sum(p.produced for p in self.partitions)

    @property
    def consumed(self) -> int:
        return sum(p.consumed for p in self.partitions)

    @property
    def lag(self) -> int:
        return sum(p.backlog for p in self.partitions)

    @property
    def eta_s(self) -> float | None:
        """Seconds to train what is left, at the recent rate (None: unknown or not running)."""
        if self.state.state != "running" or not self.source_ended or not self.samples_per_s:
            return None
        prompts = self.prompts - sum(p.dropped for p in self.partitions)
        left = prompts - self.consumed if self.epochs == 1 else prompts * self.epochs - self.passes
        return max(0.0, left / self.samples_per_s)

    def to_json(self) -> dict[str, Any]:
        """A stable machine-readable view (``status --json``)."""
        return {
            "run_id": self.run_id,
            "state": self.state.state,
            "since": self.state.since,
            "reason": self.state.reason,
            "summary": self.state.summary,
            "step": self.step,
            "epoch": self.epoch,
            "epochs": self.epochs,
            "passes": self.passes,
            "prompts": {"total": self.prompts, "source_ended": self.source_ended, "trained": self.consumed},
            "produced": self.produced,
            "consumed": self.consumed,
            "lag": self.lag,
            "samples_per_s": self.samples_per_s,
            "eta_s": self.eta_s,
            "dead_letters": self.dead_letters,
            "dead_letters_by_reason": [
                {"stage": r.stage, "error": r.error, "reason": r.reason, "count": r.count}
                for r in self.letters_by_reason
            ],
            "partitions": [
                {
                    "partition": p.partition,
                    "produced": p.produced,
                    "dropped": p.dropped,
                    "consumed": p.consumed,
                    "lag": p.backlog,
                    "generators_ended": p.generator_ended,
                }
                for p in self.partitions
            ],
            "processes": [
                {
                    "role": b.role,
                    "id": b.id,
                    "host": b.host,
                    "pid": b.pid,
                    "state": b.state,
                    "reason": b.reason,
                    "alive": alive(b, self.now),
                    "age_s": round(age_s(b, self.now), 3),
                    "interval_s": b.interval_s,
                    "started_at": b.started_at,
                    "last_seen": b.created_at,
                    "counters": dict(b.counters),
                }
                for b in self.processes
            ],
            "now": self.now,
            "groups": {name: g.to_json() for name, g in self.groups.items()},
        }


def _read_all(transport: Transport, topic: str, partition: int, start: int, timeout_s: float) -> list[bytes]:
    return [
        r.value or b""
        for r in read_to_end(transport, topic, [partition], start={partition: start}, timeout_s=timeout_s)
    ]


def _recent_steps(
    transport: Transport, topics: RunTopics, lookback: int, timeout_s: float
) -> list[LedgerStep]:
    with transport.admin() as admin:
        end = admin.end_offsets(topics.ledger, [0])[0]
    steps = []
    for value in _read_all(transport, topics.ledger, 0, max(0, end - lookback), timeout_s):
        try:
            message = decode(value)
        except Exception:  # noqa: BLE001 - a bad ledger record is not status's problem
            continue
        if isinstance(message, LedgerStep):
            steps.append(message)
    return steps


@dataclass(frozen=True)
class GroupProgress:
    """One trainer's progress from its ledger: the newest step, records consumed per partition, samples/s."""

    latest: LedgerStep | None
    consumed: dict[int, int]
    rate: float | None

    def to_json(self) -> dict[str, Any]:
        return {"step": self.latest.step if self.latest else None, "trained": sum(self.consumed.values()),
                "samples_per_s": self.rate}  # fmt: skip


def _progress(transport: Transport, topics: RunTopics, lookback: int, timeout_s: float) -> GroupProgress:
    steps = _recent_steps(transport, topics, lookback=lookback, timeout_s=timeout_s)
    latest = steps[-1] if steps else None
    consumed: dict[int, int] = {}
    if latest is not None:
        for rank in latest.ranks:
            for position in rank.next_offsets:
                consumed[position.partition] = position.records
    rate = None
    if len(steps) >= 2 and steps[-1].created_at > steps[0].created_at:
        samples = sum(len(r.sample_ids) for s in steps[1:] for r in s.ranks)
        rate = samples / (steps[-1].created_at - steps[0].created_at)
    return GroupProgress(latest, consumed, rate)


def run_status(
    transport: Transport, run_id: str, *, timeout_s: float = 30.0, now: float | None = None, full: bool = True
) -> RunStatus:
    """Read the run's counters, ledger, DLQ and heartbeats (nothing is written). ``full=False``
    reads only the per-partition counts (the generators' commits and the newest ledger record):
    what a metrics scrape needs, at a fraction of the cost."""
    topics = RunTopics(run_id)
    with transport.admin() as admin:
        count = admin.partition_count(topics.samples)
        if count is None:
            raise RunMismatchError(
                f"run {run_id} has no topics on this broker (no {topics.samples}): check the run id, and that "
                "this is the broker the run uses"
            )
        commits = admin.group_offsets(topics.generator_group, topics.prompts)
        prefix = topics.ledger + "."  # several trainer groups: one ledger each (``train_groups``)
        names = sorted(t[len(prefix):] for t in admin.topics() if t.startswith(prefix))
    lookback = 64 if full else 1
    groups = {g: _progress(transport, RunTopics(run_id, g), lookback, timeout_s) for g in names}
    # the run's progress is its slowest group's, as the generators' backpressure sees it
    ours = min(groups.values(), key=lambda g: sum(g.consumed.values())) if groups else (
        _progress(transport, topics, lookback, timeout_s))  # fmt: skip
    latest, consumed, rate = ours.latest, ours.consumed, ours.rate
    partitions = []
    for p in range(count):
        c = PartitionCounters.from_metadata(commits[p].metadata) if p in commits else PartitionCounters()
        taken = consumed.get(p, 0)  # numbered records passed: an ended partition's marker took one too
        partitions.append(PartitionStatus(p, c.refs, c.dropped, c.ended, min(taken, c.refs) if c.ended else taken))
    if not full:
        return RunStatus(run_id, partitions, latest.step if latest else None, rate, 0, groups=groups)
    letters = read_dead_letters(transport, run_id, timeout_s=timeout_s)
    source = read_source_counters(transport, topics, count)
    beats = sorted(
        read_heartbeats(transport, run_id, timeout_s=timeout_s).values(),
        key=lambda b: (ROLES.index(b.role), b.id),
    )
    now = time.time() if now is None else now
    lag = sum(p.backlog for p in partitions)
    manifest = read_manifest(transport, topics)
    epochs = int((manifest.config or {}).get("train.epochs", 1)) if manifest is not None else 1
    return RunStatus(
        run_id, partitions, latest.step if latest else None, rate, len(letters),
        letters_by_reason=count_by_reason(letters), processes=beats, state=decide_run_state(beats, now=now, lag=lag),
        prompts=sum(c.prompts for c in source.values()),
        source_ended=bool(source) and all(c.ended for c in source.values()), now=now, groups=groups,
        epoch=latest.epoch if latest else 0, epochs=epochs,
        passes=latest.step * sum(len(r.sample_ids) for r in latest.ranks) if latest else 0,  # whole steps only
    )  # fmt: skip


def _when(epoch: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch)) if epoch is not None else "-"


def _state_line(status: RunStatus) -> str:
    st = status.state
    if st.state == "finished":
        s = st.summary
        prompts, epochs = s.get("prompts", status.prompts), s.get("epochs", 1)
        of = f"{prompts:g} prompts" if epochs == 1 else f"{prompts * epochs:g} sample passes ({prompts:g} x {epochs:g} epochs)"
        counts = (
            f"{s.get('trained', s.get('samples', 0)):g} of {of} trained, "
            f"{s.get('missing', 0):g} missing, {s.get('duplicates', 0):g} duplicates dropped, "
            f"{s.get('tail', 0):g} tail samples not stepped, {s.get('dead_letters', 0):g} dead letters"
        )
        return f"state: finished at {_when(st.since)}: {counts}"
    if st.state in ("stalled", "stopped", "failed"):
        word = {"stalled": "since", "stopped": "at", "failed": "at"}[st.state]
        return f"state: {st.state} {word} {_when(st.since)}: {st.reason}"
    return f"state: {st.state}" + (f" ({st.reason})" if st.reason else "")


def _counters(counters: dict[str, int | float]) -> str:
    return " ".join(f"{k}={v:g}" for k, v in counters.items())


def render_status(status: RunStatus) -> str:
    """A plain-text view: the run's state, its totals, each partition and each process."""
    total = f"{status.prompts}" + ("" if status.source_ended else " so far")
    rate = f", {status.samples_per_s:.1f} samples/s" if status.samples_per_s else ""
    eta = f", ETA {format_duration(status.eta_s)}" if status.eta_s is not None else ""
    lines = [
        (
            f"run {status.run_id}: step {status.step if status.step is not None else '-'}"
            + (f" (epoch {status.epoch + 1} of {status.epochs})" if status.epochs > 1 else "") + ", "
            f"{status.consumed} of {status.produced} produced samples trained{rate}"
        ),
        _state_line(status),
        f"prompts: {total} from the source, {status.consumed} trained{eta}",
        *(f"trainer group {name}: step {g.latest.step if g.latest else '-'}, {sum(g.consumed.values())} of "
          f"{status.produced} produced samples trained" for name, g in status.groups.items()),  # fmt: skip
        f"{'partition':>9} {'produced':>9} {'dropped':>8} {'consumed':>9} {'lag':>6}  end of stream",
    ]
    for p in status.partitions:
        lines.append(
            f"{p.partition:>9} {p.produced:>9} {p.dropped:>8} {p.consumed:>9} {p.backlog:>6}  "
            f"{'generators done' if p.generator_ended else 'open'}"
        )
    if status.processes:
        w = max(len(f"{b.role}/{b.id}") for b in status.processes)
        lines.append(f"{'process':<{w}} {'host':<16} {'pid':>7} {'state':<9} {'seen':>8}  counters")
        for b in status.processes:
            silent = not alive(b, status.now) and b.state not in FINAL_STATES
            seen = f"{age_s(b, status.now):.0f} s" + (" silent" if silent else "")
            lines.append(
                f"{b.role + '/' + b.id:<{w}} {b.host[:16]:<16} {b.pid:>7} {b.state:<9} {seen:>8}  {_counters(b.counters)}"
            )
            if b.reason and b.state != "finished":
                lines.append(f"{'':<{w}} {b.state}: {b.reason}")
    else:
        lines.append("processes: no heartbeats (not started yet, or a run from before heartbeats)")
    lines.append(f"dead letters: {status.dead_letters}" + (" (`specstream dlq` lists them)" if status.dead_letters else ""))
    for r in status.letters_by_reason:
        lines.append(f"{r.count:>9}  {r.stage}: {r.error}: {r.reason}")
    return "\n".join(lines)
