"""The broker contract: a run's topic names, the record types, and the client protocols.

Everything above the transport layer talks to a broker through these protocols, so the same
stage code runs on Kafka (``pipeline.transport.kafka``) and in process
(``pipeline.transport.memory``). Nothing here imports a Kafka client. The helpers at the end
read what a stage needs (``read_to_end``) and wait for it, bounded, when the
stage that makes it has not started yet (``wait_for``, ``wait_for_topic``): stages may start in
any order.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol, TypedDict, TypeVar, Unpack

from pipeline.core.errors import ConfigError, SpecstreamError, StreamError

if TYPE_CHECKING:
    from pipeline.core.topic_plan import TopicPolicy, TopicSpec

__all__ = (
    "MAX_RECORD_BYTES",
    "EVAL_SUFFIX",
    "REGEN_SUFFIX",
    "RunTopics",
    "Record",
    "Committed",
    "Start",
    "TransportError",
    "FencedError",
    "Admin",
    "TransactionalProducer",
    "Producer",
    "Reader",
    "ReaderOptions",
    "Transport",
    "read_to_end",
    "wait_for",
    "wait_for_topic",
)

logger = logging.getLogger(__name__)

# Refs are ~1 KB; 8 MiB leaves room for long prompts (token ids) without ever carrying tensors.
MAX_RECORD_BYTES = 8 * 1024 * 1024

#: The eval set's sub-run id is the run id with this suffix (``RunTopics.eval``).
EVAL_SUFFIX = ".eval"

#: The sub-run that captures again, for later epochs, the samples a storage budget did not keep.
REGEN_SUFFIX = ".regen"

#: Where a reader starts: the group's committed offsets, the beginning, the end, or explicit offsets.
Start = Literal["committed", "earliest", "latest"]


class TransportError(SpecstreamError):
    """A broker call failed (the transport's own error, translated, is the ``__cause__``)."""

    def __init__(self, message: str, *, retriable: bool = False) -> None:
        super().__init__(message)
        self.retriable = retriable


class FencedError(TransportError):
    """Another instance took over: a producer with the same transactional id (``same_id``), or a
    newer group generation. The fenced instance must stop; its open transaction is aborted by the broker."""

    def __init__(self, message: str, *, same_id: bool = False) -> None:
        super().__init__(message)
        self.same_id = same_id


@dataclass(frozen=True)
class RunTopics:
    """Every run owns its topics, named after the run id; ``group`` names one of several trainer
    groups (``train_groups``), with its own ledger and consumer group (None: the run's only one)."""

    run_id: str
    group: str | None = None

    @property
    def prompts(self) -> str:
        return f"{self.run_id}.prompts"

    @property
    def samples(self) -> str:
        return f"{self.run_id}.samples"

    @property
    def ledger(self) -> str:
        return f"{self.run_id}.ledger" + (f".{self.group}" if self.group else "")

    @property
    def dlq(self) -> str:
        return f"{self.run_id}.dlq"

    @property
    def manifest(self) -> str:
        return f"{self.run_id}.manifest"

    @property
    def heartbeats(self) -> str:
        """Compacted, one partition: every process's newest heartbeat, keyed by ``<role>/<id>``."""
        return f"{self.run_id}.heartbeats"

    @property
    def generator_group(self) -> str:
        return f"{self.run_id}.generators"

    @property
    def source_group(self) -> str:
        """The source's own group: no consumer, its offsets' metadata hold the source's counts."""
        return f"{self.run_id}.source"

    @property
    def trainer_group(self) -> str:
        return f"{self.run_id}.trainers" + (f".{self.group}" if self.group else "")

    @property
    def eval(self) -> RunTopics:
        """The held-out eval set's topics: a sub-run ``<run>.eval`` of one partition, so its
        prompts, samples, counts and features never mix with the training ones."""
        return RunTopics(f"{self.run_id}{EVAL_SUFFIX}")

    @property
    def regen(self) -> RunTopics:
        """The regeneration sub-run ``<run>.regen`` (``storage.max_bytes``): trainer ranks publish
        there the prompts of the samples the budget did not keep, once per later epoch, and the
        generators capture them again through the same exactly-once path."""
        return RunTopics(f"{self.run_id}{REGEN_SUFFIX}")

    @property
    def eval_prompts(self) -> str:
        return self.eval.prompts

    @property
    def eval_samples(self) -> str:
        return self.eval.samples

    def all(self) -> list[str]:
        """Every topic of the run (for deletion and checks)."""
        return [self.prompts, self.samples, self.ledger, self.dlq, self.manifest, self.heartbeats]


@dataclass(frozen=True)
class Record:
    """One consumed record: where it sits and its raw bytes."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int = 0


@dataclass(frozen=True)
class Committed:
    """A committed group offset (the next offset to read) and the metadata stored with it."""

    offset: int
    metadata: str


class Admin(Protocol):
    """Topic administration and offset queries; a context manager that closes the client."""

    def __enter__(self) -> Admin: ...

    def __exit__(self, *exc: object) -> None: ...

    def close(self) -> None: ...

    def topics(self) -> set[str]: ...

    def partition_count(self, topic: str) -> int | None: ...

    def topic_id(self, topic: str) -> str | None: ...

    def ensure_topics(
        self, specs: Mapping[str, int | TopicSpec], *, configs: Mapping[str, Mapping[str, str]] | None = None
    ) -> list[str]: ...

    def ensure_run_topics(self, topics: RunTopics, partitions: int, policy: TopicPolicy | None = None) -> list[str]: ...

    def delete_topics(self, names: Iterable[str]) -> None: ...

    def end_offsets(
        self, topic: str, partitions: Iterable[int], *, committed_only: bool = True
    ) -> dict[int, int]: ...

    def group_offsets(self, group_id: str, topic: str) -> dict[int, Committed]: ...

    def end_hanging_transactions(self, topics: Iterable[str], idle_s: float) -> list[str]: ...


class TransactionalProducer(Protocol):
    """Records and consumed offsets that commit together or not at all."""

    transactional_id: str
    in_transaction: bool

    def begin(self) -> None: ...

    def send(self, topic: str, partition: int, value: bytes, key: bytes | None = None) -> object: ...

    def flush(self, timeout: float | None = 10.0) -> None: ...

    def commit(
        self, offsets: Mapping[tuple[str, int], Committed] | None = None, group: object = None
    ) -> None: ...

    def abort(self) -> None: ...

    def close(self, timeout_s: float = 10.0) -> None: ...


class Producer(Protocol):
    """Records that need no transaction (ledger, trainer-side dead letters, manifest)."""

    def send(
        self, topic: str, value: bytes, *, partition: int | None = None, key: bytes | None = None
    ) -> object: ...

    def flush(self, timeout_s: float = 30.0, *, ride_out: bool = True) -> None:
        """Wait for delivery; ``ride_out=False``: fail after ``timeout_s`` even when the broker is
        away (best-effort records, e.g. heartbeats, must not wait out an outage)."""
        ...

    def close(self, timeout_s: float = 10.0) -> None: ...


class Reader(Protocol):
    """A ``read_committed`` reader of one topic: fixed partitions, or a member of a group."""

    topic: str

    def assignment(self) -> list[int]: ...

    def poll(self, timeout_s: float, max_records: int | None = None) -> list[Record]: ...

    def seek(self, partition: int, offset: int) -> None: ...

    def position(self, partition: int) -> int: ...

    def pause(self, partitions: Iterable[int]) -> None: ...

    def resume(self, partitions: Iterable[int]) -> None: ...

    def paused(self) -> list[int]: ...

    def committed(self, partitions: Iterable[int] | None = None) -> dict[int, Committed]: ...

    def commit(self, offsets: Mapping[int, int], metadata: str = "") -> None: ...

    def group_metadata(self) -> object: ...

    def end_offsets(self, partitions: Iterable[int] | None = None) -> dict[int, int]: ...

    def reopen(self, positions: Mapping[int, int]) -> None:
        """A fresh client of the same partitions at ``positions``, nothing paused: the way out of
        a client that stopped delivering records the broker holds (fixed partitions only)."""
        ...

    def close(self) -> None: ...


class ReaderOptions(TypedDict, total=False):
    """How a reader is opened: fixed partitions or a group, where it starts, client tuning.

    The defaults live with each transport's reader; the in-process broker ignores the tuning.
    """

    partitions: Iterable[int] | None
    group_id: str | None
    start: Start | Mapping[int, int]
    max_poll_records: int
    max_poll_interval_ms: int
    session_timeout_ms: int
    on_assigned: Callable[[list[int]], None] | None
    on_revoked: Callable[[list[int]], None] | None
    #: Evicted from the group (session expired): unlike revocation, nothing may be committed.
    on_lost: Callable[[list[int]], None] | None
    client_id: str | None
    max_partition_fetch_bytes: int


class Transport(Protocol):
    """What components need from a broker: Kafka (``KafkaSettings``) or in-process (``MemoryBroker``)."""

    @property
    def bootstrap_servers(self) -> str:
        """Where the broker is (``"memory"`` for the in-process one), for messages and manifests."""
        ...

    @property
    def rebalance_callbacks_may_wait(self) -> bool:
        """Whether a rebalance callback may wait for other threads (Kafka runs it on the
        consumer's thread; the in-process broker under its own lock, where waiting would deadlock)."""
        ...

    def admin(self) -> Admin: ...

    def transactional_producer(
        self,
        transactional_id: str,
        *,
        linger_ms: int = 5,
        transaction_timeout_ms: int = 60_000,
        writes: Collection[str] = (),
    ) -> TransactionalProducer:
        """``writes``: the topics it publishes to, where a restarted broker may have left a
        transaction open that is ended before the producer writes."""
        ...

    def plain_producer(self, *, linger_ms: int = 5) -> Producer: ...

    def reader(self, topic: str, **options: Unpack[ReaderOptions]) -> Reader: ...


def read_to_end(
    transport: Transport,
    topic: str,
    partitions: Iterable[int],
    *,
    start: Start | Mapping[int, int] = "earliest",
    timeout_s: float = 60.0,
) -> Iterator[Record]:
    """Committed records from ``start`` up to the end offsets taken now: reading back a run's
    small topics (prompts count, ledger, manifest, DLQ). Bounded: a read that cannot reach the
    end within ``timeout_s`` raises ``StreamError`` rather than returning part of the topic."""
    partitions = sorted(set(partitions))
    reader = transport.reader(topic, partitions=partitions, start=start)
    try:
        ends = reader.end_offsets(partitions)
        deadline = time.monotonic() + timeout_s
        while any(reader.position(p) < ends[p] for p in partitions):
            if time.monotonic() > deadline:
                raise StreamError(f"reading {topic} to its end took longer than {timeout_s:.0f} s")
            yield from reader.poll(0.2)
    finally:
        reader.close()


T = TypeVar("T")


# --- bounded waits: the stages may start in any order ---------------------------------------


def wait_for(
    probe: Callable[[], T | None],
    *,
    timeout_s: float,
    stop: threading.Event | None = None,
    announce: Callable[[], object] | None = None,
    interval_s: float = 1.0,
) -> T | None:
    """``probe()``'s first answer that is not None, asked every ``interval_s`` for at most
    ``timeout_s``; ``announce()`` runs once, when the first answer was None. None: the time ran
    out, or ``stop`` was set (the caller tells which by ``stop.is_set()``)."""
    found = probe()
    if found is not None:
        return found
    if announce is not None and not (stop is not None and stop.is_set()):
        announce()
    deadline = time.monotonic() + timeout_s
    stopped = stop or threading.Event()
    while not stopped.wait(min(interval_s, max(0.0, deadline - time.monotonic()))):
        found = probe()
        if found is not None or time.monotonic() >= deadline:
            return found
    return None


def wait_for_topic(
    admin: Admin, topic: str, timeout_s: float, stop: threading.Event | None, key: str = "generate.wait_for_source_s"
) -> int:
    """The partition count of ``topic`` once it exists (0: ``stop`` was set while waiting);
    a ``ConfigError`` naming the topic and what to start when it does not appear in ``timeout_s``."""
    count = wait_for(
        lambda: admin.partition_count(topic) or None,
        timeout_s=timeout_s,
        stop=stop,
        announce=lambda: logger.warning("waiting up to %.0f s for topic %s (start the run's source)", timeout_s, topic),
    )
    if count is None and not (stop is not None and stop.is_set()):
        raise ConfigError(
            key,
            f"topic {topic} does not exist after waiting {timeout_s:.0f} s",
            "start the run's source (`specstream source --config FILE`), check run_id, or raise " + key,
        )
    return count or 0
