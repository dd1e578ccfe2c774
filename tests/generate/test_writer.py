"""The writer thread without a broker: claim-check order, stale batches, aborts, failures."""

from __future__ import annotations

import threading
import time

import pytest

from pipeline.core.messages import SampleRef, decode
from pipeline.core.topics import Committed, TransportError
from pipeline.generate.synthetic import SyntheticTarget
from pipeline.generate.writer import BatchWriter, PlannedBatch, Publish, Sample
from pipeline.storage import FeatureStore
from tests.support import make_prompts


class FakeProducer:
    """Records the transaction calls; ``fail_commit`` makes the next commit raise."""

    def __init__(self, store: FeatureStore) -> None:
        self.store = store
        self.log: list[tuple] = []
        self.fail_commit: Exception | None = None
        self.fail_abort = False
        self.in_transaction = False
        self.commit_gate: threading.Event | None = None

    def begin(self) -> None:
        self.in_transaction = True
        self.log.append(("begin",))

    def send(self, topic: str, partition: int, value: bytes, key: bytes | None = None) -> None:
        message = decode(value) if topic.endswith(".samples") else value
        if isinstance(message, SampleRef):  # the claim check: the file exists before its ref
            assert self.store.exists(message.uri), message.uri
        self.log.append(("send", topic, partition, message))

    def commit(self, offsets=None, group=None) -> None:
        if self.commit_gate is not None:
            assert self.commit_gate.wait(10)
        if self.fail_commit is not None:
            exc, self.fail_commit = self.fail_commit, None
            raise exc
        self.in_transaction = False
        self.log.append(("commit", dict(offsets or {}), group))

    def abort(self) -> None:
        if self.fail_abort:
            raise TransportError("fenced")
        self.in_transaction = False
        self.log.append(("abort",))

    def close(self) -> None:
        pass


@pytest.fixture
def store(tmp_path) -> FeatureStore:
    return FeatureStore(str(tmp_path), "run", durable=False)


def make_batch(epoch: int, index: int, target: SyntheticTarget, n: int = 2) -> PlannedBatch:
    prompts = make_prompts("run", n * (index + 1))[-n:]
    captured = target.capture([(p.input_ids, p.loss_mask) for p in prompts])
    items: list[Publish | Sample] = [
        Sample(0, p, f"run.e000.{p.prompt_id}", t, seq=i)
        for i, (p, t) in enumerate(zip(prompts, captured, strict=True))
    ]
    items.append(Publish("run.dlq", 0, b'{"x": 1}'))
    return PlannedBatch(
        epoch=epoch, group="g", items=items,
        offsets={("run.prompts", 0): Committed(10 * (index + 1), '{"refs": 0}')}, refs={0: n},
    )  # fmt: skip


def make_writer(store: FeatureStore, producer: FakeProducer, epoch_of: list[int]) -> BatchWriter:
    target = SyntheticTarget(hidden_size=8)
    return BatchWriter(
        producer,  # type: ignore[arg-type]
        store,
        run_id="run", producer_id="w", epoch=0, target=target.info, samples_topic="run.samples",
        is_stale=lambda e: e != epoch_of[0],
    )  # fmt: skip


def wait_for(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)  # polling a condition with a deadline


def test_batches_commit_in_order_files_before_refs(store) -> None:
    producer = FakeProducer(store)
    writer = make_writer(store, producer, [0])
    writer.start()
    target = SyntheticTarget(hidden_size=8)
    for i in range(3):
        writer.submit(make_batch(0, i, target))
    assert writer.drain(10)
    writer.stop()
    commits = [entry[1][("run.prompts", 0)].offset for entry in producer.log if entry[0] == "commit"]
    assert commits == sorted(commits) and commits[-1] == 30  # in order, whatever was grouped
    assert writer.stats.refs == 6 and len(store.list(0)) == 6


def test_batches_queued_during_a_commit_share_the_next_transaction(store) -> None:
    producer = FakeProducer(store)
    writer = BatchWriter(
        producer, store, run_id="run", producer_id="w", epoch=0,  # type: ignore[arg-type]
        target=SyntheticTarget(hidden_size=8).info, samples_topic="run.samples", depth=3,
    )  # fmt: skip
    target = SyntheticTarget(hidden_size=8)
    for i in range(3):  # queued before the thread runs: as if a commit had been slow
        writer.submit(make_batch(0, i, target))
    writer.start()
    assert writer.drain(10)
    writer.stop()
    commits = [entry for entry in producer.log if entry[0] == "commit"]
    assert len(commits) == 1 and commits[0][1][("run.prompts", 0)].offset == 30
    refs = [e[3].sample_id for e in producer.log if e[0] == "send" and e[1] == "run.samples"]
    assert len(refs) == 6 and writer.stats.refs == 6


def test_a_stale_batch_is_dropped_without_writing_a_file(store) -> None:
    producer = FakeProducer(store)
    epoch = [1]
    writer = make_writer(store, producer, epoch)
    writer.write_now(make_batch(0, 0, SyntheticTarget(hidden_size=8)))  # polled before a rebalance
    assert producer.log == [] and store.list() == [] and writer.stats.stale_batches == 1


def test_a_refused_commit_aborts_and_makes_the_queued_batches_stale(store) -> None:
    producer = FakeProducer(store)
    producer.fail_commit = TransportError("CommitFailedError: generation mismatch")
    producer.commit_gate = threading.Event()
    writer = make_writer(store, producer, [0])
    writer.start()
    target = SyntheticTarget(hidden_size=8)
    writer.submit(make_batch(0, 0, target))
    wait_for(lambda: ("begin",) in producer.log)  # the first one is committing
    writer.submit(make_batch(0, 1, target))  # queued behind the doomed one, same epoch
    producer.commit_gate.set()
    assert writer.drain(10)
    writer.stop()
    assert [e[0] for e in producer.log].count("abort") == 1
    assert not any(e[0] == "commit" for e in producer.log)
    assert writer.take_reset() and not writer.take_reset()  # reported once
    assert writer.stats.aborted_batches == 1 and writer.stats.stale_batches == 1
    writer.raise_if_failed()  # an abort is not a failure


def test_a_storage_failure_stops_the_worker_with_that_error(store, monkeypatch) -> None:
    producer = FakeProducer(store)
    writer = make_writer(store, producer, [0])

    def broken(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(store, "put", broken)
    with pytest.raises(OSError, match="disk full"):
        writer.write_now(make_batch(0, 0, SyntheticTarget(hidden_size=8)))
    assert not any(e[0] in ("begin", "commit") for e in producer.log)


def test_an_abort_that_fails_is_fatal(store) -> None:
    producer = FakeProducer(store)
    producer.fail_commit = TransportError("ProducerFencedError")
    producer.fail_abort = True
    writer = make_writer(store, producer, [0])
    with pytest.raises(TransportError, match="ProducerFenced"):
        writer.write_now(make_batch(0, 0, SyntheticTarget(hidden_size=8)))
