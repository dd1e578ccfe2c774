"""Decoding the transaction coordinator's log, and what it says of a transaction left open.

The decoding runs for real against a broker's log in ``tests/faults/test_hanging_transaction.py``;
here the parts a broker run cannot pin down: Java's hash on every kind of string, both value
versions, and the rule that picks the step deciding a partition.
"""

from __future__ import annotations

import struct

import pytest

from pipeline.transport.transaction_log import (
    Status,
    TransactionStep,
    coordinator_partition,
    decided,
    decode_key,
    decode_value,
)


@pytest.mark.parametrize(
    ("transactional_id", "partition"),
    # from Java 17: (n == Integer.MIN_VALUE ? 0 : Math.abs(n)) % 50 with n = s.hashCode()
    [("hello", 22), ("polygenelubricants", 0), ("run.gen", 17), ("zzzzzzzzzz", 36),
     ("héllo-gen.été", 23), ("run-1.generate.3", 23)],  # fmt: skip
)
def test_the_coordinator_partition_is_the_one_kafka_picks(transactional_id: str, partition: int) -> None:
    assert coordinator_partition(transactional_id, 50) == partition


def _v0(pid: int, epoch: int, status: Status, partitions: dict[str, list[int]] | None) -> bytes:
    out = struct.pack(">hqhib", 0, pid, epoch, 60_000, status)
    if partitions is None:
        out += struct.pack(">i", -1)
    else:
        out += struct.pack(">i", len(partitions))
        for topic, ids in partitions.items():
            out += struct.pack(">h", len(topic)) + topic.encode() + struct.pack(">i", len(ids))
            out += b"".join(struct.pack(">i", i) for i in ids)
    return out + struct.pack(">qq", 1, 2)


def _v1(pid: int, epoch: int, status: Status, partitions: dict[str, list[int]]) -> bytes:
    out = struct.pack(">hqhib", 1, pid, epoch, 60_000, status) + bytes([len(partitions) + 1])
    for topic, ids in partitions.items():
        out += bytes([len(topic) + 1]) + topic.encode() + bytes([len(ids) + 1])
        out += b"".join(struct.pack(">i", i) for i in ids) + b"\x00"
    # timestamps, then one tagged field (ClientTransactionVersion, tag 2: 2 bytes)
    return out + struct.pack(">qq", 1, 2) + b"\x01\x02\x02\x00\x02"


def test_both_value_versions_decode_to_the_same_step() -> None:
    parts = {"run.samples": [0, 3], "__consumer_offsets": [7]}
    want = TransactionStep(1000, 4, Status.PREPARE_COMMIT,
                           frozenset({("run.samples", 0), ("run.samples", 3), ("__consumer_offsets", 7)}))  # fmt: skip
    assert decode_value(_v0(1000, 4, Status.PREPARE_COMMIT, parts)) == want
    assert decode_value(_v1(1000, 4, Status.PREPARE_COMMIT, parts)) == want
    assert decode_value(_v0(1000, 4, Status.EMPTY, None)).partitions == frozenset()
    assert decode_value(None) is None  # a tombstone


def test_a_key_names_its_transactional_id() -> None:
    assert decode_key(struct.pack(">hh", 0, 7) + b"run.gen") == "run.gen"
    assert decode_key(struct.pack(">hh", 1, 7) + b"run.gen") is None  # not a transaction log key
    assert decode_key(None) is None


def _step(status: Status, *partitions: int, pid: int = 5, epoch: int = 0) -> TransactionStep:
    return TransactionStep(pid, epoch, status, frozenset(("t", p) for p in partitions))


def test_the_last_prepared_step_naming_the_partition_decides() -> None:
    committed = [_step(Status.ONGOING, 0), _step(Status.PREPARE_COMMIT, 0), _step(Status.COMPLETE_COMMIT)]
    assert decided(committed, "t", 0, 5, 0) is True
    # later transactions of the same producer that never touched partition 0 do not decide it
    later = [_step(Status.ONGOING, 1), _step(Status.PREPARE_ABORT, 1), _step(Status.COMPLETE_ABORT)]
    assert decided(committed + later, "t", 0, 5, 0) is True
    # a transaction that timed out is aborted with the next epoch
    timed_out = [_step(Status.ONGOING, 0), _step(Status.PREPARE_ABORT, 0, epoch=1),
                 _step(Status.COMPLETE_ABORT, epoch=1)]  # fmt: skip
    assert decided(timed_out, "t", 0, 5, 0) is False


def test_what_the_log_does_not_decide_is_unknown() -> None:
    assert decided([], "t", 0, 5, 0) is None
    assert decided([_step(Status.PREPARE_COMMIT, 0, pid=6)], "t", 0, 5, 0) is None  # another producer
    assert decided([_step(Status.PREPARE_COMMIT, 0, epoch=0)], "t", 0, 5, 1) is None  # an older epoch
    reopened = [_step(Status.PREPARE_COMMIT, 0), _step(Status.COMPLETE_COMMIT), _step(Status.ONGOING, 0)]
    assert decided(reopened, "t", 0, 5, 0) is None  # a newer transaction spans it: not ended yet
