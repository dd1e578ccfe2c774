"""The data plane on a real broker: exactly once across processes, crashes and bad records."""

from __future__ import annotations

import threading

import pytest
import torch

from pipeline.core.messages import DeadLetter, EndOfStream, SampleRef, encode, now
from pipeline.core.progress import StreamItem, rank_partitions
from pipeline.core.topics import RunTopics
from pipeline.generate.synthetic import SyntheticTarget
from pipeline.source.publisher import PromptPublisher
from pipeline.storage import FeatureStore
from pipeline.stream import SampleStream
from pipeline.transport.kafka import KafkaAdmin, KafkaSettings, PlainProducer, TransactionalProducer
from tests.support import make_prompts, read_messages, spawn, wait_exit

pytestmark = pytest.mark.integration

HIDDEN = 64


def generator_args(kafka: KafkaSettings, run_id: str, storage: str, worker: str, partitions: str) -> list[str]:
    return [
        "generate", "--run-id", run_id, "--storage", storage, "--bootstrap", kafka.bootstrap_servers,
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


def test_bad_records_go_to_the_dlq_with_a_reason_and_the_stream_goes_on(kafka, run_topics, storage_root) -> None:
    run_id = run_topics.run_id
    store = FeatureStore(storage_root, run_id)
    target = SyntheticTarget(hidden_size=8)

    def stored_ref(name: str, **overrides) -> SampleRef:
        tensors = target.capture([([1, 2, 3, 4], [0, 1, 1, 1])])[0]
        stored = store.put(0, name, tensors)
        fields = dict(
            run_id=run_id, sample_id=name, prompt_id=name, producer_id="test", uri=stored.uri,
            nbytes=stored.nbytes, checksum=stored.checksum, num_tokens=4, tensors=stored.tensors,
            target=target.info, created_at=now(),
        )  # fmt: skip
        fields.update(overrides)
        return SampleRef(**fields)

    good_a = stored_ref("good-a")
    corrupt = stored_ref("corrupt")
    path = store.resolve(corrupt.uri)
    store.fs.pipe_file(path, b"\x00" * corrupt.nbytes)  # same size, garbage content
    bad_checksum = stored_ref("bad-checksum", checksum="crc32c:00000000")
    outside = stored_ref("outside", uri="../../../etc/passwd")
    good_b = stored_ref("good-b")

    producer = TransactionalProducer(kafka, f"{run_id}.test")
    producer.begin()
    for value in (encode(good_a), encode(corrupt), b"{not json", encode(bad_checksum), encode(outside), encode(good_b)):
        producer.send(run_topics.samples, 0, value)
    producer.send(run_topics.samples, 0, encode(EndOfStream(run_id=run_id, stage="generate", partition=0, count=6)))
    for p in (1, 2, 3):
        producer.send(run_topics.samples, p, encode(EndOfStream(run_id=run_id, stage="generate", partition=p, count=0)))
    producer.commit()
    producer.close()

    dlq = PlainProducer(kafka)
    stream = SampleStream(kafka, store, run_id, range(4), dlq=dlq, idle_timeout_s=60)
    items = list(stream)
    stream.close()
    dlq.close()
    assert [i.ref.sample_id for i in items] == ["good-a", "good-b"]
    assert stream.summary().missing == 0 and stream.dead_letters == 4

    letters = read_messages(kafka, run_topics.dlq, [0], until=lambda m: len(m) >= 4)
    reasons = {}
    for _, letter in letters:
        assert isinstance(letter, DeadLetter) and letter.source_topic == run_topics.samples
        reasons[letter.offset] = (letter.error, letter.reason)
    assert reasons[1][0] == "IntegrityError" and "checksum" in reasons[1][1]  # corrupt content
    assert reasons[2][0] == "DecodeError" and "JSON" in reasons[2][1]
    assert reasons[3][0] == "IntegrityError" and "checksum" in reasons[3][1]
    assert reasons[4][0] == "ConfinementError"


def test_malformed_prompt_goes_to_the_dlq_and_the_eos_counts_it(kafka, run_topics, storage_root) -> None:
    run_id = run_topics.run_id
    prompts = make_prompts(run_id, 6)
    producer = TransactionalProducer(kafka, f"{run_id}.test")
    producer.begin()
    for p in prompts[:3]:
        producer.send(run_topics.prompts, 0, encode(p))
    producer.send(run_topics.prompts, 0, b'{"schema": "specstream.prompt/1", "run_id": "' + run_id.encode() + b'"}')
    producer.send(run_topics.prompts, 0, encode(EndOfStream(run_id=run_id, stage="source", partition=0, count=4)))
    for p in (1, 2, 3):
        producer.send(run_topics.prompts, p, encode(EndOfStream(run_id=run_id, stage="source", partition=p, count=0)))
    producer.commit()
    producer.close()

    from pipeline.generate.worker import GeneratorConfig, GeneratorWorker

    store = FeatureStore(storage_root, run_id)
    worker = GeneratorWorker(
        kafka, store, SyntheticTarget(hidden_size=8), GeneratorConfig(run_id=run_id, worker_id="g", partitions=[0, 1, 2, 3])
    )
    stats = worker.run()
    assert (stats.refs, stats.dropped) == (3, 1)
    stream = SampleStream(kafka, store, run_id, range(4), idle_timeout_s=60)
    assert len(list(stream)) == 3
    stream.close()
    assert stream.dropped_upstream == 1
    letters = read_messages(kafka, run_topics.dlq, [0], until=lambda m: len(m) >= 1)
    letter = letters[0][1]
    assert isinstance(letter, DeadLetter) and letter.error == "DecodeError" and "prompt_id" in letter.reason


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
            target=target.info, created_at=now(),
        ))  # fmt: skip
    producer = TransactionalProducer(kafka, f"{run_id}.test")
    producer.begin()
    for ref in refs[:4] + [refs[1]] + refs[4:]:  # s1 published twice (at-least-once upstream)
        producer.send(run_topics.samples, 0, encode(ref))
    producer.send(run_topics.samples, 0, encode(EndOfStream(run_id=run_id, stage="generate", partition=0, count=7)))
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


def test_interrupt_unblocks_a_stream_waiting_for_data(kafka, run_topics, storage_root) -> None:
    stream = SampleStream(kafka, FeatureStore(storage_root, run_topics.run_id), run_topics.run_id, [0], idle_timeout_s=60)
    result: list[object] = []
    reader = threading.Thread(target=lambda: result.extend(stream))
    reader.start()
    stream.interrupt()
    reader.join(timeout=15)
    assert not reader.is_alive() and result == []
    stream.close()
