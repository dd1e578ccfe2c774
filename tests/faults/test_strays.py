"""Stray records and a real duplicate, injected from outside with a raw Kafka client during a run.

Every stage runs as its own process through ``specstream``; the strays are written with
kafka-python directly, as any other producer on the cluster could. The run must still end
``N of N prompts trained, 0 missing``, count the duplicate, dead-letter every stray with its
reason, and ``specstream audit`` must find nothing lost and nothing repeated.
"""

from __future__ import annotations

import json

import pytest
from kafka import KafkaProducer  # the outsider's client, on purpose

from pipeline.core.messages import DeadLetter, SampleRef, encode
from pipeline.core.topics import RunTopics
from pipeline.transport.kafka import KafkaSettings
from tests.integration.test_runtime import write_config
from tests.support import read_messages, spawn, wait_exit

pytestmark = [pytest.mark.integration, pytest.mark.faults]

CONVERSATIONS = 24  # 2 partitions x 12, batch 2: 12 optimizer steps and no tail


def _raw_producer(kafka: KafkaSettings, transactional_id: str | None = None) -> KafkaProducer:
    return KafkaProducer(bootstrap_servers=kafka.bootstrap_servers, transactional_id=transactional_id)


def _stray_samples(run_id: str) -> list[bytes]:
    """What another producer could write into a samples topic: each must be dead-lettered."""
    target = {"model_id": "x", "revision": "y", "num_layers": 4, "aux_layer_ids": [0, 1, 2], "hidden_size": 64,
              "vocab_size": 512, "dtype": "float32"}  # fmt: skip
    tensors = {"input_ids": {"dtype": "I64", "shape": [4]}, "loss_mask": {"dtype": "U8", "shape": [4]},
               "aux_hidden_states": {"dtype": "F32", "shape": [4, 192]},
               "final_hidden_states": {"dtype": "F32", "shape": [4, 64]}}  # fmt: skip
    ref = {"schema": "specstream.sample_ref/1", "run_id": run_id, "sample_id": "stray", "prompt_id": "stray",
           "producer_id": "outsider", "uri": "/etc/passwd", "nbytes": 10, "checksum": "crc32c:00000000",
           "num_tokens": 4, "tensors": tensors, "target": target, "created_at": 1.0, "seq": 0}  # fmt: skip
    huge = {**ref, "uri": "features/0/huge.safetensors",
            "tensors": {**tensors, "final_hidden_states": {"dtype": "F32", "shape": [10**9, 10**6]}}}  # fmt: skip
    unnumbered = {k: v for k, v in ref.items() if k != "seq"}
    # The numbered ones claim the partition's next number (0) before any generator wrote: each
    # fails a check, so the number stays open for the generator's own first ref.
    return [
        b"\x00\xffnot json at all",
        json.dumps({"schema": "specstream.unknown/1", "run_id": run_id}).encode(),
        json.dumps(ref).encode(),  # outside the storage root
        json.dumps({**unnumbered, "uri": "features/0/x.safetensors"}).encode(),  # no number: no generator's
        json.dumps({**ref, "uri": "features/0/missing.safetensors"}).encode(),  # a file that is not there
        json.dumps(huge).encode(),  # a [1e9, 1e6] tensor
        json.dumps({"schema": "specstream.end_of_stream/1", "run_id": run_id, "stage": "generate",
                    "partition": 0, "count": 0}).encode(),  # a marker that is nobody's
    ]  # fmt: skip


def _stray_prompts(run_id: str) -> list[bytes]:
    base = {"schema": "specstream.prompt/1", "run_id": run_id, "prompt_id": "stray", "loss_mask": [0, 1]}
    return [
        b"garbage",
        json.dumps({**base, "input_ids": [-1, 5]}).encode(),  # negative ids: refused by the schema
        json.dumps({**base, "input_ids": [10**6, 5]}).encode(),  # out of the vocabulary, unnumbered
    ]


def _wait_for_refs(kafka: KafkaSettings, topics: RunTopics, partition: int, timeout_s: float = 120) -> SampleRef:
    """The first own ref a generator committed to a partition (bounded poll of the topic)."""
    found = read_messages(
        kafka, topics.samples, [partition], timeout_s=timeout_s, skip_undecodable=True,
        until=lambda got: any(isinstance(m, SampleRef) and m.seq is not None and m.producer_id != "outsider"
                              for _, m in got),
    )  # fmt: skip
    return next(m for _, m in found if isinstance(m, SampleRef) and m.seq is not None and m.producer_id != "outsider")


def test_strays_and_a_real_duplicate_neither_break_nor_pollute_a_run(kafka, run_id, tmp_path, tiny_target_dir) -> None:
    path = write_config(
        tmp_path, kafka, run_id, tiny_target_dir, conversations=CONVERSATIONS,
        data={"partitions": 2}, generate={"high_watermark": 8, "low_watermark": 6},
        train={"prefetch": 1, "save_interval": 100},
    )  # fmt: skip
    topics = RunTopics(run_id)
    with kafka.admin() as admin:
        admin.ensure_run_topics(topics, 2)
    outsider = _raw_producer(kafka)
    strays_per_partition = {"prompts": len(_stray_prompts(run_id)), "samples": len(_stray_samples(run_id))}
    for p in (0, 1):
        for value in _stray_prompts(run_id):
            outsider.send(topics.prompts, value=value, partition=p)
        for value in _stray_samples(run_id):
            outsider.send(topics.samples, value=value, partition=p)
    outsider.flush()

    code, out = wait_exit(spawn(["source", "--config", str(path)]), timeout_s=180)
    assert code == 0, out
    generator = spawn(["generate", "--config", str(path), "--worker-id", "g1"])
    try:
        # No trainer yet: backpressure holds the generator short of the end of stream. Commit one
        # of its refs a second time, through a second transactional producer: a real duplicate.
        first = _wait_for_refs(kafka, topics, 0)
        second_producer = _raw_producer(kafka, transactional_id=f"{run_id}.second-producer")
        second_producer.init_transactions()
        second_producer.begin_transaction()
        second_producer.send(topics.samples, value=encode(first), partition=0)
        second_producer.commit_transaction()
        second_producer.close()

        code, trained = wait_exit(spawn(["train", "--config", str(path)]), timeout_s=300)
        assert code == 0, trained
        assert f"{CONVERSATIONS} of {CONVERSATIONS} prompts trained, 0 missing, 1 duplicates dropped" in trained
        code, out = wait_exit(generator, timeout_s=120)
        assert code == 0, out
    finally:
        if generator.poll() is None:
            generator.kill()

    code, audit = wait_exit(spawn(["audit", "--config", str(path), "--json"]), timeout_s=120)
    assert code == 0, audit
    report = json.loads(audit[audit.index("{"):])
    totals = report["totals"]
    assert report["ok"] and report["lost"] == 0 and report["repeated"] == 0
    assert totals["prompts"] == totals["refs"] == totals["trained_once"] == CONVERSATIONS
    assert totals["duplicates"] == 1
    assert totals["foreign_prompts"] == 2 * strays_per_partition["prompts"]
    assert totals["foreign_samples"] == 2 * strays_per_partition["samples"]

    letters = read_messages(
        kafka, topics.dlq, [0], timeout_s=30, until=lambda got: len(got) >= 2 * sum(strays_per_partition.values())
    )
    # A replay meets the same strays and dead-letters them again, but into nothing of the live run's.
    with kafka.admin() as admin:
        dlq_before = admin.end_offsets(topics.dlq, [0])
    code, out = wait_exit(spawn(["replay", "--config", str(path), "--out", str(tmp_path / "replay")]), timeout_s=300)
    assert code == 0, out
    with kafka.admin() as admin:
        assert admin.end_offsets(topics.dlq, [0]) == dlq_before, "a replay wrote into the live run's DLQ"
    reasons = " | ".join(m.reason for _, m in letters if isinstance(m, DeadLetter))
    for expected in ("not a UTF-8 JSON document", "unknown schema", "without a sequence number",
                     "without its sequence number", "inside the run", "is missing", "final_hidden_states is declared",
                     "input_ids"):  # fmt: skip
        assert expected in reasons, reasons


def test_audit_of_a_clean_run_has_no_foreign_records(kafka, run_id, tmp_path, tiny_target_dir) -> None:
    """The control: the same run without strays audits clean with zero foreign records."""
    path = write_config(tmp_path, kafka, run_id, tiny_target_dir, conversations=8, data={"partitions": 2})
    code, out = wait_exit(spawn(["run", "--config", str(path)]), timeout_s=300)
    assert code == 0, out
    code, audit = wait_exit(spawn(["audit", "--config", str(path), "--json"]), timeout_s=120)
    assert code == 0, audit
    report = json.loads(audit[audit.index("{"):])
    assert report["ok"] and report["totals"]["foreign_samples"] == report["totals"]["foreign_prompts"] == 0
    assert report["totals"]["refs"] == 8 and report["steps"] > 0
