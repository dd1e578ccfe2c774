"""The data plane on a real broker: exactly once across processes, crashes and bad records."""

from __future__ import annotations

import logging
import threading

import pytest
import torch

from pipeline.core.errors import StreamError
from pipeline.core.messages import DeadLetter, EndOfStream, SampleRef, encode, now
from pipeline.core.progress import StreamItem, rank_partitions
from pipeline.core.topics import RunTopics
from pipeline.generate.synthetic import SyntheticTarget
from pipeline.source.publisher import PromptPublisher
from pipeline.storage import FeatureStore
from pipeline.core.partition_wait import Wait, ask_broker
from pipeline.stream import SampleStream
from pipeline.transport.kafka import KafkaAdmin, KafkaSettings, PlainProducer, TransactionalProducer
from tests.support import make_prompts, read_messages, spawn, wait_exit

pytestmark = pytest.mark.integration

HIDDEN = 64


def generator_args(kafka: KafkaSettings, run_id: str, storage: str, worker: str, partitions: str) -> list[str]:
    return [
        "generate", "--run-id", run_id, "--storage", storage, "--bootstrap", kafka.bootstrap_servers, "--backend", "synthetic",
        "--worker-id", worker, "--partitions", partitions, "--hidden-size", str(HIDDEN), "--dtype", "bfloat16",
        "--batch-size", "8", "--transaction-timeout-ms", "20000",
    ]  # fmt: skip


def read_ranks(kafka: KafkaSettings, store: FeatureStore, run_id: str, world: int) -> list[SampleStream]:
    """Each rank in its own thread, reading p % world == rank, like trainer ranks."""
    streams = [SampleStream(kafka, store, run_id, rank_partitions(4, world, r), idle_timeout_s=60) for r in range(world)]
    results: list[list[StreamItem]] = [[] for _ in range(world)]
    errors: list[BaseException] = []

    def read(rank: int) -> None:
        try:
            results[rank].extend(streams[rank])
        except BaseException as exc:
            errors.append(exc)
        finally:
            streams[rank].close()

    threads = [threading.Thread(target=read, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
        assert not t.is_alive(), "a reader did not reach the end of stream"
    if errors:
        raise errors[0]
    for stream, items in zip(streams, results, strict=True):
        stream.items_read = items  # type: ignore[attr-defined]
    return streams


def test_two_producer_processes_two_ranks_exactly_once(kafka, run_topics, storage_root) -> None:
    run_id = run_topics.run_id
    prompts = make_prompts(run_id, 400)
    PromptPublisher(kafka, run_id, 4).publish(prompts)
    procs = [
        spawn(generator_args(kafka, run_id, storage_root, "gen-a", "0,1")),
        spawn(generator_args(kafka, run_id, storage_root, "gen-b", "2,3")),
    ]
    for proc in procs:
        code, out = wait_exit(proc)
        assert code == 0, out
        assert "200 samples" in out

    store = FeatureStore(storage_root, run_id)
    streams = read_ranks(kafka, store, run_id, world=2)
    expected = {p.prompt_id: p for p in prompts}
    reference = SyntheticTarget(hidden_size=HIDDEN, dtype="bfloat16")
    seen: list[str] = []
    for rank, stream in enumerate(streams):
        items = stream.items_read  # type: ignore[attr-defined]
        assert {i.partition for i in items} == set(rank_partitions(4, 2, rank))
        summary = stream.summary()
        assert (summary.expected, summary.used, summary.missing, summary.duplicates) == (200, 200, 0, 0)
        for item in items:
            seen.append(item.ref.prompt_id)
            prompt = expected[item.ref.prompt_id]
            want = reference.capture([(prompt.input_ids, prompt.loss_mask)])[0]
            for name, tensor in want.items():
                assert torch.equal(item.tensors[name], tensor), (item.ref.sample_id, name)
    assert sorted(seen) == sorted(expected)  # every prompt once, across both ranks


def test_sigkill_mid_transaction_then_restart_loses_and_duplicates_nothing(kafka, run_topics, storage_root) -> None:
    run_id = run_topics.run_id
    prompts = make_prompts(run_id, 120)
    PromptPublisher(kafka, run_id, 4).publish(prompts)
    args = generator_args(kafka, run_id, storage_root, "gen-a", "0,1,2,3")

    doomed = spawn(args, env={"SPECSTREAM_CRASH_AT": "generate.before_commit:3"})
    code, out = wait_exit(doomed)
    assert code == -9, f"expected SIGKILL, got {code}:\n{out}"
    with KafkaAdmin(kafka) as admin:
        written = admin.end_offsets(run_topics.samples, range(4), committed_only=False)
        visible = admin.end_offsets(run_topics.samples, range(4), committed_only=True)
    assert sum(written.values()) > sum(visible.values()), "the killed transaction's refs should be in the log"

    code, out = wait_exit(spawn(args))  # same worker id: fences the dead instance, aborts its transaction
    assert code == 0, out

    store = FeatureStore(storage_root, run_id)
    streams = read_ranks(kafka, store, run_id, world=1)
    items = streams[0].items_read  # type: ignore[attr-defined]
    assert sorted(i.ref.prompt_id for i in items) == sorted(p.prompt_id for p in prompts)
    summary = streams[0].summary()
    assert (summary.used, summary.missing, summary.duplicates, summary.expected) == (120, 0, 0, 120)


def _stored_ref(store: FeatureStore, run_id: str, name: str, **overrides) -> SampleRef:
    target = SyntheticTarget(hidden_size=8)
    stored = store.put(0, name, target.capture([([1, 2, 3, 4], [0, 1, 1, 1])])[0])
    fields = dict(
        run_id=run_id, sample_id=name, prompt_id=name, producer_id="test", uri=stored.uri,
        nbytes=stored.nbytes, checksum=stored.checksum, num_tokens=4, tensors=stored.tensors,
        target=target.info, created_at=now(),
    )  # fmt: skip
    fields.update(overrides)
    return SampleRef(**fields)


def _commit(kafka, run_topics, topic: str, values_by_partition: dict[int, list[bytes]]) -> None:
    producer = TransactionalProducer(kafka, f"{run_topics.run_id}.test")
    producer.begin()
    for p, values in values_by_partition.items():
        for value in values:
            producer.send(topic, p, value)
    producer.commit()
    producer.close()


def _closed(run_id: str, stage: str, p: int, count: int = 0) -> bytes:
    return encode(EndOfStream(run_id=run_id, stage=stage, partition=p, count=count, seq=count))


def test_bad_records_go_to_the_dlq_with_a_reason_and_never_break_the_count(kafka, run_topics, storage_root) -> None:
    """Records claiming the next number but failing a check are dead-lettered and the number stays
    open for the real record; garbage without a number is foreign. The count still holds."""
    run_id = run_topics.run_id
    store = FeatureStore(storage_root, run_id)
    good_a = _stored_ref(store, run_id, "good-a", seq=0)
    corrupt = _stored_ref(store, run_id, "corrupt", seq=1)
    store.fs.pipe_file(store.resolve(corrupt.uri), b"\x00" * corrupt.nbytes)  # same size, garbage content
    bad_checksum = _stored_ref(store, run_id, "bad-checksum", checksum="crc32c:00000000", seq=1)
    outside = _stored_ref(store, run_id, "outside", uri="../../../etc/passwd", seq=1)
    good_b = _stored_ref(store, run_id, "good-b", seq=1)
    values = [encode(good_a), encode(corrupt), b"{not json", encode(bad_checksum), encode(outside), encode(good_b)]
    _commit(kafka, run_topics, run_topics.samples, {
        0: [*values, _closed(run_id, "generate", 0, 2)], **{p: [_closed(run_id, "generate", p)] for p in (1, 2, 3)}
    })  # fmt: skip

    dlq = PlainProducer(kafka)
    stream = SampleStream(kafka, store, run_id, range(4), dlq=dlq, idle_timeout_s=60)
    items = list(stream)
    stream.close()
    dlq.close()
    assert [i.ref.sample_id for i in items] == ["good-a", "good-b"]
    summary = stream.summary()
    assert (summary.missing, summary.foreign, summary.expected, stream.dead_letters) == (0, 4, 2, 4)

    letters = read_messages(kafka, run_topics.dlq, [0], until=lambda m: len(m) >= 4)
    reasons = {}
    for _, letter in letters:
        assert isinstance(letter, DeadLetter) and letter.source_topic == run_topics.samples
        reasons[letter.offset] = (letter.error, letter.reason)
    assert reasons[1][0] == "IntegrityError" and "checksum" in reasons[1][1]  # corrupt content
    assert reasons[2][0] == "DecodeError" and "JSON" in reasons[2][1]
    assert reasons[3][0] == "IntegrityError" and "checksum" in reasons[3][1]
    assert reasons[4][0] == "ConfinementError"


def test_an_own_sample_that_fails_its_checks_is_missing_not_silently_skipped(kafka, run_topics, storage_root) -> None:
    run_id = run_topics.run_id
    store = FeatureStore(storage_root, run_id)
    lost = _stored_ref(store, run_id, "lost", seq=0)
    store.delete(lost.uri)  # the generator's file is gone (storage fault)
    kept = _stored_ref(store, run_id, "kept", seq=1)
    _commit(kafka, run_topics, run_topics.samples, {
        0: [encode(lost), encode(kept), _closed(run_id, "generate", 0, 2)],
        **{p: [_closed(run_id, "generate", p)] for p in (1, 2, 3)},
    })  # fmt: skip
    stream = SampleStream(kafka, store, run_id, range(4), idle_timeout_s=60)
    assert [i.ref.sample_id for i in stream] == ["kept"]
    stream.close()
    summary = stream.summary()
    assert (summary.expected, summary.used, summary.missing) == (2, 1, 1)


def test_a_malformed_prompt_is_dead_lettered_as_foreign_and_the_count_holds(kafka, run_topics, storage_root) -> None:
    run_id = run_topics.run_id
    prompts = [p.model_copy(update={"seq": i}) for i, p in enumerate(make_prompts(run_id, 3))]
    garbage = b'{"schema": "specstream.prompt/1", "run_id": "' + run_id.encode() + b'"}'
    _commit(kafka, run_topics, run_topics.prompts, {
        0: [encode(prompts[0]), encode(prompts[1]), garbage, encode(prompts[2]), _closed(run_id, "source", 0, 3)],
        **{p: [_closed(run_id, "source", p)] for p in (1, 2, 3)},
    })  # fmt: skip

    from pipeline.generate.worker import GeneratorConfig, GeneratorWorker

    store = FeatureStore(storage_root, run_id)
    worker = GeneratorWorker(
        kafka, store, SyntheticTarget(hidden_size=8), GeneratorConfig(run_id=run_id, worker_id="g", partitions=[0, 1, 2, 3])
    )
    stats = worker.run()
    assert (stats.refs, stats.dropped) == (3, 0)
    stream = SampleStream(kafka, store, run_id, range(4), idle_timeout_s=60)
    assert len(list(stream)) == 3
    stream.close()
    assert stream.dropped_upstream == 0 and stream.summary().missing == 0
    letters = read_messages(kafka, run_topics.dlq, [0], until=lambda m: len(m) >= 1)
    letter = letters[0][1]
    assert isinstance(letter, DeadLetter) and letter.error == "ForeignRecord" and "prompt_id" in letter.reason


def test_existing_topics_of_another_shape_are_refused(kafka, run_topics) -> None:
    from pipeline.core.errors import RunMismatchError

    with KafkaAdmin(kafka) as admin, pytest.raises(RunMismatchError, match="partitions"):
        admin.ensure_run_topics(RunTopics(run_topics.run_id), 8)


def test_source_restart_publishes_nothing_twice(kafka, run_topics) -> None:
    prompts = make_prompts(run_topics.run_id, 10)
    first = PromptPublisher(kafka, run_topics.run_id, 4).publish(prompts)
    again = PromptPublisher(kafka, run_topics.run_id, 4).publish(prompts)
    assert (first.published, again.published, again.skipped) == (10, 0, 10)
    records = read_messages(
        kafka, run_topics.prompts, range(4),
        until=lambda m: sum(isinstance(x, EndOfStream) for _, x in m) == 4, timeout_s=30,
    )  # fmt: skip
    assert len(records) == 14


def test_stream_state_resumes_exactly_and_keeps_deduplicating(kafka, run_topics, storage_root) -> None:
    """Stop mid-stream, resume from state(): the rest arrives once, a re-published dup is dropped."""
    run_id = run_topics.run_id
    store = FeatureStore(storage_root, run_id)
    target = SyntheticTarget(hidden_size=8)
    refs = []
    for i in range(6):
        stored = store.put(0, f"s{i}", target.capture([([i, 1, 2], [0, 1, 1])])[0])
        refs.append(SampleRef(
            run_id=run_id, sample_id=f"s{i}", prompt_id=f"p{i}", producer_id="t", uri=stored.uri,
            nbytes=stored.nbytes, checksum=stored.checksum, num_tokens=3, tensors=stored.tensors,
            target=target.info, created_at=now(), seq=i,
        ))  # fmt: skip
    producer = TransactionalProducer(kafka, f"{run_id}.test")
    producer.begin()
    for ref in refs[:4] + [refs[1]] + refs[4:]:  # s1 published twice (at-least-once upstream)
        producer.send(run_topics.samples, 0, encode(ref))
    producer.send(run_topics.samples, 0, _closed(run_id, "generate", 0, 6))
    producer.commit()
    producer.close()

    first = SampleStream(kafka, store, run_id, [0], idle_timeout_s=30)
    items = first.items()
    taken = [next(items).ref.sample_id for _ in range(3)]
    state = first.state()
    first.close()
    resumed = SampleStream(kafka, store, run_id, [0], state=state, idle_timeout_s=30)
    rest = [i.ref.sample_id for i in resumed]
    resumed.close()
    assert taken + rest == ["s0", "s1", "s2", "s3", "s4", "s5"]
    summary = resumed.summary()
    assert (summary.used, summary.duplicates, summary.missing) == (6, 1, 0)


def test_partitions_take_turns_and_an_ended_one_leaves_the_rotation(kafka, run_topics, storage_root) -> None:
    """The fixed order exact resume relies on: one sample per open partition per turn; a partition
    leaves the turns at its marker (an empty one at once), and a partition flooded far past the
    stream's buffer is read in turn all the same."""
    run_id = run_topics.run_id
    store = FeatureStore(storage_root, run_id)
    counts = {0: 5, 1: 2, 2: 0, 3: 9}
    _commit(kafka, run_topics, run_topics.samples, {
        p: [encode(_stored_ref(store, run_id, f"p{p}-{i}", seq=i)) for i in range(n)] + [_closed(run_id, "generate", p, n)]
        for p, n in counts.items()
    })  # fmt: skip
    stream = SampleStream(kafka, store, run_id, range(4), idle_timeout_s=30, max_buffered=2, max_poll_records=4)
    try:
        order = [(item.partition, item.ref.seq) for item in stream]
    finally:
        stream.close()
    assert order == [
        (0, 0), (1, 0), (3, 0), (0, 1), (1, 1), (3, 1), (0, 2), (3, 2), (0, 3), (3, 3), (0, 4), (3, 4),
        (3, 5), (3, 6), (3, 7), (3, 8),
    ]  # fmt: skip
    assert stream.summary().used == sum(counts.values())


def test_interrupt_unblocks_a_stream_waiting_for_data(kafka, run_topics, storage_root) -> None:
    stream = SampleStream(kafka, FeatureStore(storage_root, run_topics.run_id), run_topics.run_id, [0], idle_timeout_s=60)
    result: list[object] = []
    reader = threading.Thread(target=lambda: result.extend(stream))
    reader.start()
    stream.interrupt()
    reader.join(timeout=15)
    assert not reader.is_alive() and result == []
    stream.close()


def test_a_checkpoint_position_beyond_the_topic_is_an_error_not_a_silent_reset(
    kafka, run_topics, storage_root
) -> None:
    """Issue 9.13: a resumed stream whose offsets the topic does not hold (deleted and re-created,
    or expired) names the partition and both offsets instead of restarting from the beginning."""
    run_id = run_topics.run_id
    store = FeatureStore(storage_root, run_id)
    ref = _stored_ref(store, run_id, "only", seq=0)
    _commit(kafka, run_topics, run_topics.samples, {0: [encode(ref)]})
    state = SampleStream(kafka, store, run_id, [0], idle_timeout_s=5).state()
    state.positions[0] = 500  # what a checkpoint of a longer, older incarnation of the topic says
    stream = SampleStream(kafka, store, run_id, [0], state=state, idle_timeout_s=30)
    try:
        with pytest.raises(StreamError, match=r"partition 0: offset 500 asked, the log holds 0\.\.2"):
            next(stream.items())
    finally:
        stream.close()


def test_a_stream_waiting_behind_an_open_transaction_says_so(kafka, run_topics, storage_root, caplog) -> None:
    """A stalled partition names its cause from the broker's ends of it: nothing written, or a
    transaction left open (here a real one, its producer gone silent)."""
    run_id = run_topics.run_id
    store = FeatureStore(storage_root, run_id)
    with KafkaAdmin(kafka) as admin:
        assert ask_broker(admin, run_topics.samples, 0, 0).cause is Wait.NOTHING_WRITTEN
    silent = TransactionalProducer(kafka, f"{run_id}.silent", transaction_timeout_ms=60_000)
    silent.begin()
    silent.send(run_topics.samples, 0, encode(_stored_ref(store, run_id, "held", seq=0)))
    silent.flush()
    stream = SampleStream(kafka, store, run_id, [0], idle_timeout_s=3, stall_report_s=1)
    try:
        with caplog.at_level(logging.WARNING, logger="pipeline.stream"):
            with pytest.raises(StreamError, match=r"records 0\.\.0 are in a transaction still open"):
                next(stream.items())
        assert any("waiting" in r.message and "transaction still open" in r.message for r in caplog.records)
    finally:
        stream.close()
        silent.abort()
        silent.close()


def test_a_client_that_holds_back_committed_records_is_replaced(kafka, run_topics, storage_root, caplog) -> None:
    """A client that stops fetching a partition whose records the broker has committed (here its
    partition paused behind the stream's back) is replaced at the stream's positions: every sample
    arrives once, in order."""
    run_id = run_topics.run_id
    store = FeatureStore(storage_root, run_id)
    stream = SampleStream(kafka, store, run_id, [0, 1], idle_timeout_s=30, stall_report_s=1)
    stream._reader.pause([0])  # the client will not fetch partition 0; the stream does not know
    _commit(kafka, run_topics, run_topics.samples, {
        p: [encode(_stored_ref(store, run_id, f"p{p}-{i}", seq=i)) for i in range(3)] + [_closed(run_id, "generate", p, 3)]
        for p in (0, 1)
    })  # fmt: skip
    try:
        with caplog.at_level(logging.WARNING, logger="pipeline.stream"):
            order = [(item.partition, item.ref.seq) for item in stream]
    finally:
        stream.close()
    assert order == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)]
    assert any("replacing it" in r.message for r in caplog.records)
    assert stream.summary().used == 6
