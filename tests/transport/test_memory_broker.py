"""The in-process broker keeps the semantics the pipeline relies on."""

from __future__ import annotations

import threading

import pytest

from pipeline.core.errors import RunMismatchError
from pipeline.core.topics import Committed, FencedError, RunTopics
from pipeline.transport.memory import MemoryBroker


@pytest.fixture
def broker() -> MemoryBroker:
    b = MemoryBroker()
    b.admin().ensure_run_topics(RunTopics("r"), 4)
    return b


def test_transaction_is_invisible_until_commit_and_aborts_leave_nothing(broker: MemoryBroker) -> None:
    reader = broker.reader("r.samples", partitions=[0], start="earliest")
    tx = broker.transactional_producer("t")
    tx.begin()
    tx.send("r.samples", 0, b"a")
    assert reader.poll(0) == []
    tx.commit({("r.prompts", 0): Committed(5, '{"refs": 1}')}, "g")
    assert [r.value for r in reader.poll(0)] == [b"a"]
    tx.begin()
    tx.send("r.samples", 0, b"doomed")
    tx.abort()
    assert reader.poll(0) == [] and broker.admin().end_offsets("r.samples", [0]) == {0: 1}
    assert broker.admin().group_offsets("g", "r.prompts") == {0: Committed(5, '{"refs": 1}')}


def test_a_new_instance_fences_the_old_one(broker: MemoryBroker) -> None:
    old = broker.transactional_producer("t")
    old.begin()
    old.send("r.samples", 0, b"zombie")
    broker.transactional_producer("t")
    with pytest.raises(FencedError, match="fenced"):
        old.commit()


def test_topics_of_another_shape_are_refused(broker: MemoryBroker) -> None:
    with pytest.raises(RunMismatchError):
        broker.admin().ensure_run_topics(RunTopics("r"), 8)


def test_group_members_split_partitions_and_revoke_on_join(broker: MemoryBroker) -> None:
    revoked: list[list[int]] = []
    a = broker.reader("r.prompts", group_id="g", on_revoked=revoked.append)
    a.poll(0)
    assert a.assignment() == [0, 1, 2, 3]
    b = broker.reader("r.prompts", group_id="g")
    a.poll(0)
    b.poll(0)
    assert a.assignment() == [0, 2] and b.assignment() == [1, 3] and revoked == [[1, 3]]
    b.close()
    a.poll(0)
    assert a.assignment() == [0, 1, 2, 3]


def test_reader_resumes_from_committed_offsets(broker: MemoryBroker) -> None:
    tx = broker.transactional_producer("t")
    tx.begin()
    for i in range(3):
        tx.send("r.prompts", 0, bytes([i]))
    tx.commit()
    broker.reader("r.prompts", partitions=[0], group_id="g").commit({0: 2}, "step=1")
    reader = broker.reader("r.prompts", partitions=[0], group_id="g")
    assert [r.offset for r in reader.poll(0)] == [2]
    assert reader.committed() == {0: Committed(2, "step=1")}


def test_pause_holds_records_back_and_poll_wakes_on_commit(broker: MemoryBroker) -> None:
    reader = broker.reader("r.samples", partitions=[0, 1], start="earliest")
    reader.pause([0])
    tx = broker.transactional_producer("t")

    def produce() -> None:
        tx.begin()
        tx.send("r.samples", 0, b"held")
        tx.send("r.samples", 1, b"free")
        tx.commit()

    threading.Thread(target=produce).start()
    got = reader.poll(10.0)
    assert [(r.partition, r.value) for r in got] == [(1, b"free")]
    reader.resume([0])
    assert [r.value for r in reader.poll(0)] == [b"held"]


def test_a_commit_planned_before_a_rebalance_is_fenced(broker: MemoryBroker) -> None:
    from pipeline.transport.memory import StaleGeneration

    a = broker.reader("r.prompts", group_id="g")
    a.poll(0)
    token = a.group_metadata()
    broker.reader("r.prompts", group_id="g").poll(0)  # a second member joins: generation moves on
    tx = broker.transactional_producer("t")
    tx.begin()
    tx.send("r.samples", 0, b"stale")
    with pytest.raises(StaleGeneration, match="moved"):
        tx.commit({("r.prompts", 0): Committed(1, "")}, token)
    assert broker.admin().end_offsets("r.samples", [0]) == {0: 0}
    assert broker.admin().group_offsets("g", "r.prompts") == {}
