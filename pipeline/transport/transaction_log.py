"""How a transaction ended, read from its coordinator's own log (``__transaction_state``).

A transaction can end at its coordinator while a partition it wrote still holds it open: Kafka
4.3 on one node, killed right after a commit and restarted, completes the commit from its log
without the markers of partitions that had no leader while its old registration was fenced
(``KafkaAdmin.end_hanging_transactions``). The coordinator's present state
cannot say how that older transaction ended once its producer has gone on to others, and
guessing is not allowed: an abort of a committed transaction loses what it wrote (or rolls back
the offsets it committed, so its input is produced again). The coordinator's log keeps every
step of every transaction with the partitions it spanned, so the decision it made for this
partition can be read back. Pure decoding here; ``kafka.py`` fetches the records.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = (
    "TOPIC",
    "Status",
    "TransactionStep",
    "coordinator_partition",
    "decided",
    "decode_key",
    "decode_value",
)

TOPIC = "__transaction_state"


class Status(enum.IntEnum):
    """``TransactionState`` as the coordinator writes it to its log."""

    EMPTY = 0
    ONGOING = 1
    PREPARE_COMMIT = 2
    PREPARE_ABORT = 3
    COMPLETE_COMMIT = 4
    COMPLETE_ABORT = 5
    DEAD = 6
    PREPARE_EPOCH_FENCE = 7


@dataclass(frozen=True)
class TransactionStep:
    """One record of the log: a transactional id's producer and where its transaction stood."""

    producer_id: int
    producer_epoch: int
    status: int
    partitions: frozenset[tuple[str, int]]


def coordinator_partition(transactional_id: str, partition_count: int) -> int:
    """The partition of ``__transaction_state`` that holds ``transactional_id`` (Kafka's
    ``Utils.abs(transactionalId.hashCode()) % partitionCount``: Java's string hash over UTF-16
    code units, and an ``abs`` that maps the one int without a positive twin to 0)."""
    h = 0
    units = transactional_id.encode("utf-16-be")
    for i in range(0, len(units), 2):
        h = (31 * h + int.from_bytes(units[i : i + 2], "big")) & 0xFFFFFFFF
    signed = h - (1 << 32) if h >= 1 << 31 else h
    return (0 if signed == -(1 << 31) else abs(signed)) % partition_count


def decode_key(data: bytes | None) -> str | None:
    """The transactional id of a log record (key version 0); None for a key of another kind."""
    if not data or len(data) < 4 or struct.unpack_from(">h", data)[0] != 0:
        return None
    (length,) = struct.unpack_from(">h", data, 2)
    return data[4 : 4 + length].decode()


def decode_value(data: bytes | None) -> TransactionStep | None:
    """A log record's value (version 0, or the flexible version 1); None for a tombstone."""
    if not data:
        return None
    reader = _Reader(data)
    flexible = reader.int(">h") >= 1
    producer_id, producer_epoch = reader.int(">q"), reader.int(">h")
    reader.int(">i")  # the transaction's timeout
    status = reader.int(">b")
    partitions: set[tuple[str, int]] = set()
    for _ in range(reader.length(flexible)):
        topic = reader.string(flexible)
        partitions.update((topic, reader.int(">i")) for _ in range(reader.length(flexible)))
        if flexible:
            reader.skip_tagged()
    return TransactionStep(producer_id, producer_epoch, status, frozenset(partitions))


def decided(
    steps: Iterable[TransactionStep], topic: str, partition: int, producer_id: int, producer_epoch: int
) -> bool | None:
    """True if the coordinator committed the last transaction of this producer that spanned the
    partition, False if it aborted it, None if the log does not say (a later step of the same
    producer reopened the partition, or no prepared step names it)."""
    outcome: bool | None = None
    for step in steps:
        if step.producer_id != producer_id or step.producer_epoch < producer_epoch:
            continue
        if (topic, partition) not in step.partitions:
            continue
        if step.status == Status.PREPARE_COMMIT:
            outcome = True
        elif step.status == Status.PREPARE_ABORT:
            outcome = False
        elif step.status == Status.ONGOING:
            outcome = None  # a newer transaction spans it: its end decides, not an older one's
    return outcome


class _Reader:
    """Kafka's wire encoding: fixed-width big-endian ints, and in flexible versions unsigned
    varint lengths (plus one) and tagged fields."""

    def __init__(self, data: bytes) -> None:
        self._data, self._at = data, 0

    def int(self, fmt: str) -> int:
        (value,) = struct.unpack_from(fmt, self._data, self._at)
        self._at += struct.calcsize(fmt)
        return int(value)

    def _varint(self) -> int:
        shift = value = 0
        while True:
            byte = self._data[self._at]
            self._at += 1
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
            shift += 7

    def length(self, flexible: bool) -> int:
        """An array's length; a null array reads as empty."""
        return max(self._varint() - 1, 0) if flexible else max(self.int(">i"), 0)

    def string(self, flexible: bool) -> str:
        size = self._varint() - 1 if flexible else self.int(">h")
        text = self._data[self._at : self._at + size].decode()
        self._at += size
        return text

    def skip_tagged(self) -> None:
        for _ in range(self._varint()):
            self._varint()  # the tag
            self._at += self._varint()
