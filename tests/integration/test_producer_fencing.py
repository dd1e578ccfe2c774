"""A fenced transactional producer never commits what it was fenced for, on the real broker.

- Fenced by a newer instance with its id: the old instance has a transaction open when the new
  one initialises, learns it is fenced from the broker's answer to its next produce request, and
  kafka-python refuses every send after that. That send must raise ``FencedError``, and the abort
  that follows must not re-initialise the id (it would fence the new instance in turn).
- Fenced by its consumer group (KIP-447): a commit with a generation the group has left is
  refused and aborted. Its consumed offsets must not ride along with the next transaction's
  (kafka-python 3.0.12 keeps them queued): that committed a revoked partition's position
  without the refs that went with it, and a run lost those samples (bench_scale, 64 partitions,
  16 generators).
"""

from __future__ import annotations

import time

import pytest

from pipeline.core.topics import Committed, FencedError, RunTopics, read_to_end
from pipeline.transport.kafka import KafkaSettings, PartitionReader, TransactionalProducer

pytestmark = pytest.mark.integration


def _send_until_refused(producer: TransactionalProducer, topic: str, attempts: int = 5) -> FencedError:
    """Send and flush until a send is refused; the first flush already carries the broker's answer."""
    for i in range(attempts):
        try:
            producer.send(topic, 0, f"old-{i}".encode())
        except FencedError as exc:
            return exc
        producer.flush(timeout=30)
    raise AssertionError(f"{attempts} sends after fencing were all accepted")


def test_a_producer_fenced_while_sending_stops_without_fencing_its_successor(
    kafka: KafkaSettings, run_topics: RunTopics
) -> None:
    topic = run_topics.samples
    transactional_id = f"{run_topics.run_id}.twin"
    old = TransactionalProducer(kafka, transactional_id)
    new = None
    try:
        old.begin()
        old.send(topic, 0, b"old-open")
        old.flush(timeout=30)
        new = TransactionalProducer(kafka, transactional_id)  # fences old, aborts its transaction

        refused = _send_until_refused(old, topic)
        assert refused.same_id, refused
        with pytest.raises(FencedError):
            old.abort()  # must not re-initialise the id

        new.begin()  # the new instance still owns the id
        new.send(topic, 0, b"new")
        new.commit()
        assert [r.value for r in read_to_end(kafka, topic, [0], timeout_s=60)] == [b"new"]
    finally:
        old.close(timeout_s=5)
        if new is not None:
            new.close(timeout_s=5)


def _split(first: list[int], second: list[int]) -> bool:
    """Whether two members hold every partition between them, none twice, each at least one."""
    return bool(first) and bool(second) and sorted(first + second) == [0, 1, 2, 3]


def _poll_until(readers: list[PartitionReader], done, timeout_s: float = 60) -> None:
    """Poll every member in turn until ``done()``: a rebalance completes only while all poll."""
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"the group did not settle in {timeout_s:.0f} s")
        for reader in readers:
            reader.poll(0.1)


def test_offsets_a_stale_generation_could_not_commit_never_ride_along_with_the_next_commit(
    kafka: KafkaSettings, run_topics: RunTopics
) -> None:
    prompts, group = run_topics.prompts, f"{run_topics.run_id}.generators"
    first = PartitionReader(kafka, prompts, group_id=group, start="earliest", session_timeout_ms=10_000)
    second = None
    producer = TransactionalProducer(kafka, f"{run_topics.run_id}.member")
    try:
        _poll_until([first], lambda: len(first.assignment()) == 4)
        stale = first.group_metadata()  # taken before the rebalance, like a batch's snapshot
        second = PartitionReader(kafka, prompts, group_id=group, start="earliest", session_timeout_ms=10_000)
        # Settled: the two hold disjoint halves (until its new assignment arrives, the first member
        # still reports all four, and a partition of both would be "kept" and "moved" at once).
        _poll_until([first, second], lambda: _split(first.assignment(), second.assignment()))
        moved, (kept, *_) = second.assignment()[0], first.assignment()

        producer.begin()  # a batch planned before the rebalance: refused by the group, aborted
        producer.send(run_topics.samples, moved, b"ref of a moved partition")
        with pytest.raises(FencedError) as refused:
            producer.commit({(prompts, moved): Committed(9, "stale")}, group=stale)
        assert not refused.value.same_id, refused.value
        producer.abort()

        producer.begin()  # the next batch, under the current generation, of a partition still ours
        producer.send(run_topics.samples, kept, b"ref of a kept partition")
        producer.commit({(prompts, kept): Committed(3, "current")}, group=first.group_metadata())

        committed = first.committed([moved, kept])
        assert committed.get(kept) == Committed(3, "current")
        assert moved not in committed, f"the refused commit's offset of partition {moved} was committed later"
        assert [r.value for r in read_to_end(kafka, run_topics.samples, [moved], timeout_s=60)] == []
    finally:
        producer.close(timeout_s=5)
        first.close()
        if second is not None:
            second.close()
