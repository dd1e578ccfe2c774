"""Data-plane benchmark: the claim-check path against raw I/O and raw kafka-python, in one run.

1. Bytes: N samples of the Llama-3.1-8B shape (1024 tokens, hidden 4096, bf16: 3*4096 aux + 4096
   final hidden states, ~33.6 MB each) through store.put + transactional ref publish + read_committed
   consume + get + verify, against the same bytes through plain file write (+fsync) + read.
2. Refs: small sample-ref records through our transactional producer and read_committed reader
   (with strict encode/decode), against raw kafka-python (idempotent producer, default consumer).

Ratios, not absolute timings, are the result: both sides run in the same process on the same disk
and broker. Uses KAFKA_BOOTSTRAP_SERVERS if set, else starts the local broker.

    python benchmarks/bench_dataplane.py --samples 16 --refs 20000

3. Object storage (``--storage s3://bucket/prefix``, no broker): the feature store's put + get +
   verify on that URL against the same on local disk, alternating, min/median/max MB/s. Against a
   local emulator (moto's server mode, ``--endpoint-url http://127.0.0.1:PORT``) the absolute
   figure is the emulator's (one Python process, in memory), not S3's: it shows the path works and
   what it costs on top of the transfer, not what a real bucket sustains.

    python -m moto.server -H 127.0.0.1 -p 5555 &
    AWS_ACCESS_KEY_ID=x AWS_SECRET_ACCESS_KEY=x python benchmarks/bench_dataplane.py \
        --storage s3://bench/features --endpoint-url http://127.0.0.1:5555 --samples 8 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import torch
from kafka import KafkaConsumer, KafkaProducer, TopicPartition  # the raw baseline only

from pipeline.core.messages import EndOfStream, SampleRef, TargetInfo, decode, encode, now
from pipeline.core.topics import RunTopics
from pipeline.storage import FeatureStore, SafetensorsLayout
from pipeline.stream import SampleStream
from pipeline.transport.broker import env_or_local_broker as broker
from pipeline.transport.kafka import KafkaAdmin, KafkaSettings, PartitionReader, TransactionalProducer

TARGET = TargetInfo(
    model_id="llama-3.1-8b-shape", revision="bench", num_layers=32, aux_layer_ids=[1, 15, 28],
    hidden_size=4096, vocab_size=128256, dtype="bfloat16",
)  # fmt: skip




def make_sample(tokens: int, hidden: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(0, 128256, (tokens,), generator=g),
        "loss_mask": torch.ones(tokens, dtype=torch.uint8),
        "aux_hidden_states": torch.randn(tokens, 3 * hidden, generator=g).bfloat16(),
        "final_hidden_states": torch.randn(tokens, hidden, generator=g).bfloat16(),
    }


def bench_bytes(bootstrap: str, samples: int, tokens: int, hidden: int, root: Path) -> dict[str, float]:
    from safetensors.torch import save

    settings = KafkaSettings(bootstrap)
    run_id = f"bench-{uuid.uuid4().hex[:8]}"
    topics = RunTopics(run_id)
    with KafkaAdmin(settings) as admin:
        admin.ensure_run_topics(topics, 1)
    tensors = [make_sample(tokens, hidden, i) for i in range(samples)]
    payloads = [save(t) for t in tensors]  # the raw side writes the same bytes
    nbytes = sum(len(p) for p in payloads)

    # raw: plain write + fsync + read back, the same bytes
    raw_dir = root / "raw"
    raw_dir.mkdir(parents=True)
    started = time.perf_counter()
    for i, data in enumerate(payloads):
        with open(raw_dir / f"{i}.bin", "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    raw_write_s = time.perf_counter() - started
    for i in range(samples):
        (raw_dir / f"{i}.bin").read_bytes()
    raw_s = time.perf_counter() - started

    # specstream: put (temp+fsync+rename) -> transactional ref -> read_committed -> get+verify
    store = FeatureStore(str(root / "store"), run_id)
    # Clients are created once per process in a real run: their setup is not part of the path.
    producer = TransactionalProducer(settings, f"{run_id}.bench")
    stream = SampleStream(settings, store, run_id, [0], idle_timeout_s=60)
    started = time.perf_counter()
    producer.begin()
    for i, t in enumerate(tensors):
        stored = store.put(0, f"s{i}", t)
        ref = SampleRef(
            run_id=run_id, sample_id=f"s{i}", prompt_id=f"p{i}", producer_id="bench", uri=stored.uri,
            nbytes=stored.nbytes, checksum=stored.checksum, num_tokens=tokens, tensors=stored.tensors,
            target=TARGET, created_at=now(), seq=i,
        )  # fmt: skip
        producer.send(topics.samples, 0, encode(ref))
    marker = EndOfStream(run_id=run_id, stage="generate", partition=0, count=samples, seq=samples)
    producer.send(topics.samples, 0, encode(marker))
    producer.commit()
    ours_write_s = time.perf_counter() - started
    got = sum(1 for _ in stream)
    ours_s = time.perf_counter() - started
    producer.close()
    stream.close()
    assert got == samples
    return {
        "bytes": nbytes, "raw_s": raw_s, "ours_s": ours_s,
        "raw_write_s": raw_write_s, "ours_write_s": ours_write_s,
    }  # fmt: skip


def bench_store(root_url: str, options: dict, tensors: list[dict[str, torch.Tensor]]) -> float:
    """Seconds for put + get (which verifies size, checksum and header) of every sample, then cleanup."""
    store = FeatureStore(root_url, f"bench-{uuid.uuid4().hex[:8]}", storage_options=options)
    started = time.perf_counter()
    for i, t in enumerate(tensors):
        stored = store.put(0, f"s{i}", t)
        ref = SampleRef(
            run_id=store.run_id, sample_id=f"s{i}", prompt_id=f"p{i}", producer_id="bench", uri=stored.uri,
            nbytes=stored.nbytes, checksum=stored.checksum, num_tokens=t["input_ids"].numel(),
            tensors=stored.tensors, target=TARGET, created_at=now(),
        )  # fmt: skip
        store.get(ref)
    elapsed = time.perf_counter() - started
    for uri in store.list():
        store.delete(uri)
    return elapsed


def storage_main(args: argparse.Namespace) -> None:
    """``--storage``: put+get+verify MB/s on the URL next to local disk, alternating, min/median/max."""
    options = json.loads(args.storage_options)
    if args.endpoint_url:
        options.setdefault("client_kwargs", {})["endpoint_url"] = args.endpoint_url
    if args.storage.startswith("s3://") and args.endpoint_url:
        import s3fs  # lazy: the s3 extra, only for an s3:// URL

        s3fs.S3FileSystem(**options).makedirs(args.storage.split("://", 1)[1].split("/", 1)[0], exist_ok=True)
    tensors = [make_sample(args.tokens, args.hidden, i) for i in range(args.samples)]
    mb = sum(SafetensorsLayout.of(t).nbytes for t in tensors) / 1e6
    local, remote = [], []
    for i in range(args.repeats):  # alternate so drift in machine load hits both
        root = tempfile.mkdtemp(prefix="bench-store-")
        try:
            local.append(mb / bench_store(root, {}, tensors))
        finally:
            shutil.rmtree(root, ignore_errors=True)
        remote.append(mb / bench_store(args.storage, options, tensors))
        print(f"repeat {i}: local {local[-1]:.1f} MB/s, {args.storage} {remote[-1]:.1f} MB/s", flush=True)
    print(f"put + get + verify, {args.samples} samples x {mb / args.samples:.1f} MB, {args.repeats} repeats "
          "(MB/s min / median / max)")
    for name, runs in (("local disk", local), (args.storage, remote)):
        print(f"  {name:<28}: {min(runs):8.1f} / {statistics.median(runs):8.1f} / {max(runs):8.1f}")
    if args.endpoint_url:
        print(f"  ({args.endpoint_url} is a local emulator: its absolute figure is the emulator's, not S3's)")


def bench_refs(bootstrap: str, refs: int, per_txn: int) -> dict[str, float]:
    settings = KafkaSettings(bootstrap)
    run_id = f"bench-{uuid.uuid4().hex[:8]}"
    topics = RunTopics(run_id)
    raw_topic = f"{run_id}.raw"
    with KafkaAdmin(settings) as admin:
        admin.ensure_run_topics(topics, 1)
        admin.ensure_topics({raw_topic: 1})
    template = SampleRef(
        run_id=run_id, sample_id="x", prompt_id="p", producer_id="bench", uri="features/0/x.safetensors",
        nbytes=33_554_432, checksum="crc32c:01234567", num_tokens=1024,
        tensors={"aux_hidden_states": {"dtype": "BF16", "shape": [1024, 12288]},
                 "final_hidden_states": {"dtype": "BF16", "shape": [1024, 4096]},
                 "input_ids": {"dtype": "I64", "shape": [1024]}, "loss_mask": {"dtype": "U8", "shape": [1024]}},
        target=TARGET, created_at=now(),
    )  # fmt: skip
    raw_values = [encode(template.model_copy(update={"sample_id": f"s{i}"})) for i in range(refs)]

    # raw kafka-python: default (idempotent) producer, default consumer, bytes only
    started = time.perf_counter()
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    for value in raw_values:
        producer.send(raw_topic, value=value, partition=0)
    producer.flush()
    producer.close()
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False)
    consumer.assign([TopicPartition(raw_topic, 0)])
    seen = 0
    while seen < refs:
        for batch in consumer.poll(timeout_ms=500).values():
            seen += len(batch)
    consumer.close()
    raw_s = time.perf_counter() - started

    # ours: build + encode each ref, transactions of per_txn, read_committed + strict decode
    started = time.perf_counter()
    tx = TransactionalProducer(settings, f"{run_id}.bench")
    for start in range(0, refs, per_txn):
        tx.begin()
        for i in range(start, min(refs, start + per_txn)):
            tx.send(topics.samples, 0, encode(template.model_copy(update={"sample_id": f"s{i}"})))
        tx.commit()
    tx.close()
    reader = PartitionReader(settings, topics.samples, partitions=[0], start="earliest")
    seen = 0
    while seen < refs:
        for record in reader.poll(0.5):
            decode(record.value or b"")
            seen += 1
    reader.close()
    ours_s = time.perf_counter() - started
    return {"refs": refs, "raw_s": raw_s, "ours_s": ours_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--refs", type=int, default=20000)
    parser.add_argument("--refs-per-transaction", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="pairs run; the median ratio is reported")
    parser.add_argument("--storage", help="an fsspec URL (s3://bucket/prefix): benchmark the feature store there")
    parser.add_argument("--endpoint-url", help="the S3 endpoint (a local emulator such as moto's server)")
    parser.add_argument("--storage-options", default="{}", help="fsspec storage options as JSON")
    args = parser.parse_args()
    if args.storage:
        storage_main(args)
        return
    bytes_runs, ref_runs = [], []
    with broker() as bootstrap:
        for i in range(args.repeats):  # alternate both sides so drift in machine load hits both
            root = Path(tempfile.mkdtemp(prefix="bench-dataplane-"))
            try:
                bytes_runs.append(bench_bytes(bootstrap, args.samples, args.tokens, args.hidden, root))
            finally:
                shutil.rmtree(root, ignore_errors=True)
            ref_runs.append(bench_refs(bootstrap, args.refs, args.refs_per_transaction))
            print(f"repeat {i}: bytes ratio {bytes_runs[-1]['raw_s'] / bytes_runs[-1]['ours_s']:.2f}, "
                  f"refs ratio {ref_runs[-1]['raw_s'] / ref_runs[-1]['ours_s']:.2f}", flush=True)
    b = sorted(bytes_runs, key=lambda x: x["raw_s"] / x["ours_s"])[len(bytes_runs) // 2]
    r = sorted(ref_runs, key=lambda x: x["raw_s"] / x["ours_s"])[len(ref_runs) // 2]
    mb = b["bytes"] / 1e6
    print(f"median of {args.repeats} alternating repeats")
    print(f"bytes: {args.samples} samples x {mb / args.samples:.1f} MB")
    print(f"  raw write+fsync+read : {mb / b['raw_s']:8.1f} MB/s")
    print(f"  specstream end to end: {mb / b['ours_s']:8.1f} MB/s")
    print(f"  ratio                : {b['raw_s'] / b['ours_s']:.2f}  (goal >= 0.8)")
    print(
        f"  phases (s)           : write raw {b['raw_write_s']:.2f} / ours {b['ours_write_s']:.2f}, "
        f"read raw {b['raw_s'] - b['raw_write_s']:.2f} / ours {b['ours_s'] - b['ours_write_s']:.2f}"
    )
    print(f"refs: {r['refs']} records")
    print(f"  raw kafka-python     : {r['refs'] / r['raw_s']:8.0f} refs/s")
    print(f"  transactional + read_committed + strict codec: {r['refs'] / r['ours_s']:8.0f} refs/s")
    print(f"  ratio                : {r['raw_s'] / r['ours_s']:.2f}  (goal >= 0.5 and >= 2000 refs/s)")


if __name__ == "__main__":
    main()
