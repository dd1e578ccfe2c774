"""An in-process broker with the Kafka layer's surface, for single-process runs and fast tests.

``MemoryBroker`` offers the same four factories as ``KafkaSettings`` (``admin``,
``transactional_producer``, ``plain_producer``, ``reader``) and the same semantics the pipeline
relies on: per-partition ordered logs, transactions whose records and consumed offsets become
visible together at commit (so an aborted transaction is never seen, like ``read_committed``),
group offsets with metadata, group membership with revocation, pause/resume, fencing of an
older producer with the same transactional id. It is not a Kafka emulator: no replication, no
retention, no wire protocol. Every semantic test also runs on the real broker.
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Unpack

from pipeline.core.errors import BrokerError, RunMismatchError
from pipeline.core.topic_plan import TopicPolicy, TopicSpec, run_topic_plan
from pipeline.core.topics import Committed, FencedError, ReaderOptions, Record, RunTopics, Start

__all__ = ("MemoryBroker", "StaleGeneration")


class StaleGeneration(FencedError):
    """A consume-transform-produce commit from before a rebalance (Kafka: ILLEGAL_GENERATION)."""


@dataclass
class _Topic:
    partitions: list[list[Record]]
    configs: dict[str, str] = field(default_factory=dict)
    topic_id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass
class _Group:
    members: list[str] = field(default_factory=list)
    generation: int = 0


class MemoryBroker:
    """Topics, groups and transactions in one process; thread-safe."""

    bootstrap_servers = "memory"
    rebalance_callbacks_may_wait = False

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._topics: dict[str, _Topic] = {}
        self._offsets: dict[tuple[str, str, int], Committed] = {}
        self._groups: dict[tuple[str, str], _Group] = {}
        self._epochs: dict[str, int] = {}
        self._ids = itertools.count()

    # --- the transport factories (same names as KafkaSettings) ---------------------------

    # The client tuning knobs (linger, timeouts, fetch sizes, client id) mean nothing in process;
    # they are accepted so that every transport has the signatures of the ``Transport`` protocol.

    def admin(self) -> _Admin:
        """Topic administration on this broker."""
        return _Admin(self)

    def transactional_producer(
        self,
        transactional_id: str,
        *,
        linger_ms: int = 5,
        transaction_timeout_ms: int = 60_000,
        writes: Collection[str] = (),
    ) -> _TxProducer:
        """A producer whose records and offsets commit together; fences an older one of this id."""
        return _TxProducer(self, transactional_id)

    def plain_producer(self, *, linger_ms: int = 5) -> _PlainProducer:
        """A producer whose records are visible at once (no transaction)."""
        return _PlainProducer(self)

    def reader(self, topic: str, **options: Unpack[ReaderOptions]) -> _Reader:
        """A committed-only reader of fixed partitions, or a member of ``group_id``."""
        return _Reader(self, topic, **options)

    # --- internals -----------------------------------------------------------------------

    def _topic(self, name: str) -> _Topic:
        try:
            return self._topics[name]
        except KeyError:
            raise BrokerError(f"unknown topic {name}") from None

    def _append(self, records: Iterable[tuple[str, int, bytes | None, bytes | None]]) -> None:
        """Append atomically (caller holds the lock) and wake readers."""
        stamp = int(time.time() * 1000)
        for topic, partition, key, value in records:
            log = self._topic(topic).partitions[partition]
            log.append(Record(topic, partition, len(log), key, value, stamp))
        self._lock.notify_all()

    def _assignment(self, group_id: str, topic: str, member: str) -> list[int]:
        group = self._groups.get((group_id, topic))
        if group is None or member not in group.members:
            return []
        n = len(self._topic(topic).partitions)
        index = group.members.index(member)
        return [p for p in range(n) if p % len(group.members) == index]


class _Admin:
    def __init__(self, broker: MemoryBroker) -> None:
        self._b = broker

    def __enter__(self) -> _Admin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        pass

    def topics(self) -> set[str]:
        return set(self._b._topics)

    def partition_count(self, topic: str) -> int | None:
        t = self._b._topics.get(topic)
        return None if t is None else len(t.partitions)

    def topic_id(self, topic: str) -> str | None:
        t = self._b._topics.get(topic)
        return None if t is None else t.topic_id

    def ensure_topics(
        self, specs: Mapping[str, int | TopicSpec], *, configs: Mapping[str, Mapping[str, str]] | None = None
    ) -> list[str]:
        created = []
        with self._b._lock:
            for name, spec in specs.items():
                n = spec.partitions if isinstance(spec, TopicSpec) else spec
                existing = self._b._topics.get(name)
                if existing is not None:
                    if len(existing.partitions) != n:
                        raise RunMismatchError(
                            f"topic {name} exists with {len(existing.partitions)} partitions, this run needs {n}: "
                            "use another run id, or delete the old run's topics"
                        )
                    continue
                self._b._topics[name] = _Topic([[] for _ in range(n)], dict((configs or {}).get(name, {})))
                created.append(name)
        return sorted(created)

    def ensure_run_topics(self, topics: RunTopics, partitions: int, policy: TopicPolicy | None = None) -> list[str]:
        """One process, nothing replicated or expired: only the partition counts of the plan matter."""
        return self.ensure_topics(run_topic_plan(topics, partitions, policy))

    def delete_topics(self, names: Iterable[str]) -> None:
        with self._b._lock:
            for name in names:
                self._b._topics.pop(name, None)

    def end_hanging_transactions(self, topics: Iterable[str], idle_s: float) -> list[str]:
        """In-process transactions end with their producer's commit or abort: none can hang."""
        return []

    def end_offsets(self, topic: str, partitions: Iterable[int], *, committed_only: bool = True) -> dict[int, int]:
        with self._b._lock:
            t = self._b._topic(topic)
            return {p: len(t.partitions[p]) for p in partitions}

    def group_offsets(self, group_id: str, topic: str) -> dict[int, Committed]:
        with self._b._lock:
            return {p: c for (g, t, p), c in self._b._offsets.items() if g == group_id and t == topic}


class _TxProducer:
    def __init__(self, broker: MemoryBroker, transactional_id: str) -> None:
        self._b = broker
        self.transactional_id = transactional_id
        with broker._lock:
            self._epoch = broker._epochs.get(transactional_id, -1) + 1
            broker._epochs[transactional_id] = self._epoch  # fences older instances
        self._pending: list[tuple[str, int, bytes | None, bytes | None]] = []
        self.in_transaction = False

    def _check_fenced(self) -> None:
        if self._b._epochs.get(self.transactional_id) != self._epoch:
            raise FencedError(f"producer {self.transactional_id} was fenced by a newer instance", same_id=True)

    def begin(self) -> None:
        self._check_fenced()
        self._pending = []
        self.in_transaction = True

    def send(self, topic: str, partition: int, value: bytes, key: bytes | None = None) -> None:
        if not self.in_transaction:
            raise BrokerError("send outside a transaction")
        self._b._topic(topic)  # unknown topics fail at send, as with allow_auto_create_topics=False
        self._pending.append((topic, partition, key, value))

    def flush(self, timeout: float | None = None) -> None:
        """Nothing to flush: records become visible only at commit."""

    def commit(self, offsets: Mapping[tuple[str, int], Committed] | None = None, group: object = None) -> None:
        with self._b._lock:
            self._check_fenced()
            self._check_generation(offsets, group)
            self._b._append(self._pending)
            if offsets:
                group_id = group if isinstance(group, str) else getattr(group, "group_id", None)
                if group_id is None:
                    raise BrokerError("offsets committed without a group")
                for (topic, partition), committed in offsets.items():
                    self._b._offsets[(group_id, topic, partition)] = committed
        self._pending = []
        self.in_transaction = False

    def _check_generation(self, offsets: Mapping[tuple[str, int], Committed] | None, group: object) -> None:
        """KIP-447: offsets committed with a group generation that has since changed are refused."""
        if not offsets or not isinstance(group, _GroupToken) or group.generation < 0:
            return
        for topic in {t for t, _ in offsets}:
            current = self._b._groups.get((group.group_id, topic))
            if current is not None and current.generation != group.generation:
                self.abort()
                raise StaleGeneration(
                    f"group {group.group_id} is at generation {current.generation}, this batch was "
                    f"planned at {group.generation}: its partitions moved; the transaction is aborted"
                )

    def abort(self) -> None:
        self._pending = []
        self.in_transaction = False

    def close(self, timeout_s: float = 10.0) -> None:
        self.abort()


class _PlainProducer:
    def __init__(self, broker: MemoryBroker) -> None:
        self._b = broker

    def send(self, topic: str, value: bytes, *, partition: int | None = None, key: bytes | None = None) -> None:
        with self._b._lock:
            self._b._append([(topic, partition or 0, key, value)])

    def flush(self, timeout_s: float = 30.0, *, ride_out: bool = True) -> None:
        pass

    def close(self, timeout_s: float = 10.0) -> None:
        pass


@dataclass(frozen=True)
class _GroupToken:
    group_id: str
    generation: int


class _Reader:
    def __init__(
        self,
        broker: MemoryBroker,
        topic: str,
        *,
        partitions: Iterable[int] | None = None,
        group_id: str | None = None,
        start: Start | Mapping[int, int] = "committed",
        max_poll_records: int = 500,
        on_assigned: Callable[[list[int]], None] | None = None,
        on_revoked: Callable[[list[int]], None] | None = None,
        on_lost: Callable[[list[int]], None] | None = None,  # members are never evicted in-process
        **_tuning: object,  # the Kafka client's knobs (ReaderOptions): nothing to tune in process
    ) -> None:
        self._b = broker
        self.topic = topic
        self.group_id = group_id
        self._max = max_poll_records
        self._start = start
        self._on_assigned = on_assigned
        self._on_revoked = on_revoked
        self._positions: dict[int, int] = {}
        self._paused: set[int] = set()
        self._member = f"member-{next(broker._ids)}"
        self._subscribed = partitions is None
        self._generation = -1
        with broker._lock:
            broker._topic(topic)
            if self._subscribed:
                if group_id is None:
                    raise ValueError("a reader without partitions needs a group_id to subscribe")
                group = broker._groups.setdefault((group_id, topic), _Group())
                group.members.append(self._member)
                group.generation += 1
            else:
                self._assign(sorted(set(partitions or [])))

    def _assign(self, partitions: list[int]) -> None:
        committed = {p: c.offset for (g, t, p), c in self._b._offsets.items() if g == self.group_id and t == self.topic}
        log = self._b._topic(self.topic).partitions
        for p in partitions:
            if isinstance(self._start, Mapping):
                self._positions[p] = int(self._start.get(p, 0))
            elif self._start == "latest":
                self._positions[p] = len(log[p])
            elif self._start == "committed":
                self._positions[p] = committed.get(p, 0)
            else:
                self._positions[p] = 0

    def _rebalance(self) -> None:
        """Group mode: follow the group's current assignment, with revoke/assign callbacks."""
        group = self._b._groups[(self.group_id, self.topic)]  # type: ignore[index]
        if group.generation == self._generation:
            return
        wanted = self._b._assignment(self.group_id, self.topic, self._member)  # type: ignore[arg-type]
        revoked = sorted(set(self._positions) - set(wanted))
        if revoked and self._on_revoked:
            self._on_revoked(revoked)
        for p in revoked:
            self._positions.pop(p)
            self._paused.discard(p)
        added = sorted(set(wanted) - set(self._positions))
        self._start = "committed"
        self._assign(added)
        self._generation = group.generation
        if added and self._on_assigned:
            self._on_assigned(added)

    def assignment(self) -> list[int]:
        return sorted(self._positions)

    def poll(self, timeout_s: float, max_records: int | None = None) -> list[Record]:
        limit = max_records or self._max
        deadline = time.monotonic() + timeout_s
        with self._b._lock:
            while True:
                if self._subscribed:
                    self._rebalance()
                out = self._take(limit)
                remaining = deadline - time.monotonic()
                if out or remaining <= 0:
                    return out
                self._b._lock.wait(remaining)

    def _take(self, limit: int) -> list[Record]:
        """Round-robin over the unpaused partitions, a few records each, like small fetches."""
        log = self._b._topic(self.topic).partitions
        active = [p for p in sorted(self._positions) if p not in self._paused]
        out: list[Record] = []
        share = max(1, limit // max(1, len(active)))
        progress = True
        while len(out) < limit and progress:
            progress = False
            for p in active:
                take = log[p][self._positions[p] : self._positions[p] + min(share, limit - len(out))]
                if take:
                    out.extend(take)
                    self._positions[p] += len(take)
                    progress = True
                if len(out) >= limit:
                    break
        return out

    def seek(self, partition: int, offset: int) -> None:
        self._positions[partition] = offset

    def position(self, partition: int) -> int:
        return self._positions[partition]

    def pause(self, partitions: Iterable[int]) -> None:
        self._paused.update(partitions)

    def resume(self, partitions: Iterable[int]) -> None:
        self._paused.difference_update(partitions)

    def paused(self) -> list[int]:
        return sorted(self._paused)

    def reopen(self, positions: Mapping[int, int]) -> None:
        self._paused.clear()
        self._positions.update(positions)

    def committed(self, partitions: Iterable[int] | None = None) -> dict[int, Committed]:
        if self.group_id is None:
            return {}
        wanted = set(self.assignment() if partitions is None else partitions)
        with self._b._lock:
            return {
                p: c for (g, t, p), c in self._b._offsets.items() if g == self.group_id and t == self.topic and p in wanted
            }

    def commit(self, offsets: Mapping[int, int], metadata: str = "") -> None:
        with self._b._lock:
            for p, o in offsets.items():
                self._b._offsets[(self.group_id or "", self.topic, p)] = Committed(o, metadata)

    def group_metadata(self) -> object:
        return _GroupToken(self.group_id or "", self._generation)

    def end_offsets(self, partitions: Iterable[int] | None = None) -> dict[int, int]:
        with self._b._lock:
            log = self._b._topic(self.topic).partitions
            return {p: len(log[p]) for p in (self.assignment() if partitions is None else partitions)}

    def close(self) -> None:
        if self._subscribed:
            with self._b._lock:
                group = self._b._groups.get((self.group_id, self.topic))  # type: ignore[arg-type]
                if group is not None and self._member in group.members:
                    group.members.remove(self._member)
                    group.generation += 1
                    self._b._lock.notify_all()
