"""A transaction the broker ended on restart but left open on its partitions.

Kafka 4.3, restarted after a SIGKILL, ends transactions before its own listener is up and skips
the markers for partitions with no leader yet ("likely deleted already"): those partitions hold
the transaction open for ever. Every ``read_committed`` reader stops at it, and every stable
committed-offsets fetch of the group whose offsets it carried times out (CI met this as a resumed
run that never finished). Two real ways in, each ending differently at the coordinator:
- aborted: a producer's transaction is open when its broker is killed, and the broker stays down
  past the transaction's timeout;
- committed: a producer commits and its broker is killed at once; restarted, it completes the
  commit from its log (CI met this as a rolled-back offset commit: prompts produced twice, when
  the open transaction was aborted instead of committed).
"""

from __future__ import annotations

import logging
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.structs import OffsetAndMetadata

from pipeline.core.messages import encode
from pipeline.core.topics import RunTopics
from pipeline.storage import FeatureStore
from pipeline.stream import SampleStream
from pipeline.transport.broker import LocalKafka
from pipeline.transport.kafka import KafkaAdmin, KafkaSettings, PartitionReader
from tests.integration.test_data_plane import _closed, _commit, _stored_ref

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.slow]

TIMEOUT_MS = 5_000  # the dying producer's transaction timeout
DOWN_S = 10.0  # the fault itself: the broker stays down past that timeout
ATTEMPTS = 3  # the broker sometimes elects the partition's leader in time and writes its markers


@dataclass(frozen=True)
class Hanging:
    """A run whose ref on samples-0 and whose group's prompt offset sit in a hanging transaction."""

    local: LocalKafka
    topics: RunTopics
    store: FeatureStore
    group: str


@pytest.fixture
def hanging(tmp_path: Path) -> Iterator[Hanging]:
    """A broker whose run holds a hanging transaction: a ref on samples-0 and the prompt offset
    it consumed, both in a transaction that timed out (aborted) while the broker was down.

    Whether the broker skips the markers is a race inside the broker (its leader elections
    against the transaction's timeout); where it wins and writes them, the fault is made again
    on a fresh run, up to ``ATTEMPTS`` times, and the test fails only if it never happens.
    """
    yield from _broker_left_open(tmp_path, _killed_mid_transaction)


@pytest.fixture
def committed_hanging(tmp_path: Path) -> Iterator[Hanging]:
    """A broker killed right after a transaction's commit (a ref on samples-0 and the prompt offset
    it consumed): restarted, it completes the commit and leaves both partitions open. The kill
    landed before the markers were written in every try seen (12 of 12); where a broker writes
    them first, the fault is made again as for ``hanging``."""
    yield from _broker_left_open(tmp_path, _killed_after_commit)


Fault = Callable[[LocalKafka, KafkaProducer], None]  # what happens to a broker with a transaction in flight


def _broker_left_open(tmp_path: Path, fault: Fault) -> Iterator[Hanging]:
    local = LocalKafka(tmp_path / "kafka", heap_mb=384)
    local.start()
    try:
        seen: list[object] = []
        for _ in range(ATTEMPTS):
            made = _left_open(local, tmp_path, fault)
            if isinstance(made, Hanging):
                yield made
                return
            seen.append(made)
        pytest.fail(f"the broker wrote its markers in all {ATTEMPTS} attempts ({seen}): "
                    "the failure under test did not happen")  # fmt: skip
    finally:
        local.stop()


def _killed_mid_transaction(local: LocalKafka, producer: KafkaProducer) -> None:
    """SIGKILL with the transaction open, down past its timeout, restarted."""
    assert local.proc is not None
    local.proc.send_signal(signal.SIGKILL)
    local.proc.wait(60)
    producer.close(timeout=0)
    time.sleep(DOWN_S)  # the outage itself (the fault), not a synchronisation
    local.start()


def _killed_after_commit(local: LocalKafka, producer: KafkaProducer) -> None:
    """The commit returns, SIGKILL at once, restarted."""
    producer.commit_transaction()
    assert local.proc is not None
    local.proc.send_signal(signal.SIGKILL)
    local.proc.wait(60)
    producer.close(timeout=0)
    local.start()


def _left_open(local: LocalKafka, tmp_path: Path, fault: Fault) -> Hanging | list[object]:
    """One attempt at the fault on a fresh run: a transaction carrying a ref to samples-0 and the
    prompt offset it consumed, then ``fault``. The producers still active on samples-0 and the
    group offsets where the broker wrote its markers after all."""
    kafka = KafkaSettings(local.bootstrap)
    topics = RunTopics(f"hang{uuid.uuid4().hex[:8]}")
    group = f"{topics.run_id}.generators"
    with KafkaAdmin(kafka) as admin:
        admin.ensure_run_topics(topics, 1)
    store = FeatureStore(str(tmp_path / "features"), topics.run_id)
    producer = KafkaProducer(bootstrap_servers=local.bootstrap, transactional_id=f"{topics.run_id}.gen",
                             transaction_timeout_ms=TIMEOUT_MS)  # fmt: skip
    producer.init_transactions()
    producer.begin_transaction()
    producer.send(topics.samples, encode(_stored_ref(store, topics.run_id, "held", seq=0)), partition=0).get(30)
    consumed = {TopicPartition(topics.prompts, 0): OffsetAndMetadata(1, "", -1)}
    producer.send_offsets_to_transaction(consumed, group)
    fault(local, producer)
    samples_0 = TopicPartition(topics.samples, 0)
    held = _held_after_coordinator_ends(local.bootstrap, f"{topics.run_id}.gen", samples_0)
    ref, offsets = held[samples_0], [p for tp, ps in held.items() if tp != samples_0 for p in ps]
    if [p.current_transaction_start_offset for p in ref] != [0] or not any(
        p.producer_id == ref[0].producer_id and p.current_transaction_start_offset >= 0 for p in offsets
    ):  # both sides must hang: the markers are skipped (or not) per partition
        return [f"{tp}: {ps}" for tp, ps in held.items()]
    return Hanging(local, topics, store, group)


def _held_after_coordinator_ends(
    bootstrap: str, transactional_id: str, tp: TopicPartition
) -> dict[TopicPartition, list]:
    """Once the coordinator has ended the transaction, the producers still active on ``tp`` and on
    every ``__consumer_offsets`` partition (as the stream's own check scans them)."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        deadline = time.monotonic() + 60
        while True:
            states = {row.transactional_id: row.state.value for rows in admin.list_transactions().values()
                      for row in rows}  # fmt: skip
            if states.get(transactional_id) in ("CompleteAbort", "CompleteCommit", "Empty"):
                break
            assert time.monotonic() < deadline, f"the coordinator did not end the transaction in 60 s: {states}"
            time.sleep(0.5)  # polling the coordinator, bounded by the deadline
        count = len(admin.describe_topics(["__consumer_offsets"])[0]["partitions"])
        partitions = [tp, *(TopicPartition("__consumer_offsets", p) for p in range(count))]
        return {p: list(states.active_producers) for p, states in admin.describe_producers(partitions).items()}
    finally:
        admin.close()


#: (fixture, how its coordinator ended the transaction, the refs a stream reads, the group's prompt offset)
ENDINGS = [
    pytest.param("hanging", "aborted", ["kept"], None, id="aborted"),
    # an abort here would lose the ref and roll the offset back (its prompt produced twice)
    pytest.param("committed_hanging", "committed", ["held", "kept"], 1, id="committed"),
]


@pytest.mark.parametrize(("fault", "ended", "refs", "offset"), ENDINGS)
def test_a_stream_waiting_on_a_transaction_left_open_ends_it_as_its_coordinator_did(
    request, caplog, fault: str, ended: str, refs: list[str], offset: int | None
) -> None:
    """The trainer's stream waits on samples-0, finds the transaction its coordinator ended, writes
    the markers the broker skipped (the coordinator's decision), and reads on: the committed ref
    before the later ones, the aborted one never; the group's offsets end with it."""
    left: Hanging = request.getfixturevalue(fault)
    local, topics, store = left.local, left.topics, left.store
    kafka = KafkaSettings(local.bootstrap)
    kept = encode(_stored_ref(store, topics.run_id, "kept", seq=len(refs) - 1))
    _commit(kafka, topics, topics.samples, {0: [kept, _closed(topics.run_id, "generate", 0, len(refs))]})
    stream = SampleStream(kafka, store, topics.run_id, [0], idle_timeout_s=60, stall_report_s=1)
    try:
        with caplog.at_level(logging.WARNING):
            got = [item.ref.sample_id for item in stream]
    finally:
        stream.close()
    assert got == refs
    said = [r.message for r in caplog.records if f"its coordinator had {ended} but left open" in r.message]
    assert any(f"{topics.samples}-0: records from offset 0 of producer" in m for m in said), said
    assert any("__consumer_offsets-" in m for m in said), said
    assert len(said) == len([r for r in caplog.records if "left open" in r.message])  # no other ending
    consumer = KafkaConsumer(bootstrap_servers=local.bootstrap, group_id=left.group, enable_auto_commit=False)
    try:  # a stable fetch: it timed out while the offsets were held in the open transaction
        assert consumer.committed(TopicPartition(topics.prompts, 0), timeout_ms=10_000) == offset
    finally:
        consumer.close()


@pytest.mark.parametrize(("fault", "ended", "refs", "offset"), ENDINGS)
def test_a_committed_offsets_fetch_held_by_a_transaction_left_open_ends_it(
    request, caplog, fault: str, ended: str, refs: list[str], offset: int | None
) -> None:
    """A generator resuming its partitions asks for the group's committed offsets: the fetch held
    by the transaction times out, the transaction is ended as its coordinator ended it, and the
    retry answers: after the prompt it consumed where it was committed, from the start where it
    was aborted (that offset was never committed: the prompt is read again)."""
    left: Hanging = request.getfixturevalue(fault)
    kafka = KafkaSettings(left.local.bootstrap, request_timeout_ms=5_000)
    with caplog.at_level(logging.WARNING):
        # it positions at the committed offsets
        reader = PartitionReader(kafka, left.topics.prompts, group_id=left.group, partitions=[0])
    try:
        committed = {p: c.offset for p, c in reader.committed([0]).items()}
        assert committed == ({} if offset is None else {0: offset})
        assert reader.position(0) == (offset or 0)
    finally:
        reader.close()
    said = f"its coordinator had {ended} but left open"
    assert any("__consumer_offsets-" in r.message and said in r.message for r in caplog.records)


def test_a_producer_ends_what_its_id_left_open_before_it_writes(committed_hanging, caplog) -> None:
    """The generator, restarted under the same transactional id, initialises: before it writes,
    the transaction its coordinator committed is committed where it was left open. Its next
    transaction, aborted, then takes only its own record (written into the open transaction, the
    abort marker would have aborted the committed ref with it: a sample lost)."""
    left = committed_hanging
    run_id, samples = left.topics.run_id, left.topics.samples
    kafka = KafkaSettings(left.local.bootstrap)
    with caplog.at_level(logging.WARNING):
        producer = kafka.transactional_producer(f"{run_id}.gen", writes=[samples])
    try:
        producer.begin()
        producer.send(samples, 0, encode(_stored_ref(left.store, run_id, "aborted", seq=1)))
        producer.abort()
    finally:
        producer.close()
    _commit(kafka, left.topics, samples, {0: [_closed(run_id, "generate", 0, 1)]})
    stream = SampleStream(kafka, left.store, run_id, [0], idle_timeout_s=60, stall_report_s=60)
    try:
        assert [item.ref.sample_id for item in stream] == ["held"]
    finally:
        stream.close()
    said = [r.message for r in caplog.records if "its coordinator had committed but left open" in r.message]
    assert any(f"{samples}-0: records from offset 0 of producer" in m for m in said), said
