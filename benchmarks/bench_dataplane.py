"""Data-plane benchmark: the claim-check path against raw I/O, the formats the field uses, and raw
kafka-python, side by side in one process.

1. Bytes: N samples of the Llama-3.1-8B shape (1024 tokens, hidden 4096, bf16: 3*4096 aux + 4096
   final hidden states, ~33.6 MB each), written durably and read back, one row per way of doing it
   (a function per row in ``BYTE_ROWS``, so a new row is one function):

   - ``raw``: the same safetensors bytes, plain: written in 1 MiB pieces from the tensors' own
     memory, the kernel asked to start writing each piece back as it lands (as the put does:
     ``pipeline/durable_write.py``), + fsync, read back with ``readinto`` into one reused buffer
     (no verification, no atomic rename, no directory fsync): the baseline, the best a plain
     writer and reader do;
   - ``raw-unhinted`` (on request): the same without the writeback hints (the last table's baseline);
   - ``raw-bytes`` (on request, ``--rows``): the baseline of earlier tables, the file built as one
     bytes object, written, and read back into a fresh one;
   - ``specstream``: put (temp + fsync + rename + directory fsync, CRC-32C while writing) +
     transactional ref + read_committed consume + get (size, CRC-32C and header verified);
   - ``specstream-store``: put + get + verify, no Kafka (the same scope as the peers below);
   - ``torch.save``: ``torch.save`` to the file + fsync, ``torch.load(weights_only=True)``;
   - ``save_file``: safetensors ``save_file`` + fsync, ``load_file``;
   - ``safe_open``: the same file, read with ``safe_open`` (mmap) + ``get_tensor`` per tensor.

   The peers get the same durability (the file fsynced, then its directory: a new file's name
   survives a crash only once the directory is synced, which specstream's put does after its
   rename) and the same verification as far as their API allows: a CRC-32C over every tensor's
   bytes computed on write and checked on read (specstream's covers the header too). They skip
   the atomic rename (a crash can leave a partial file under the final name).
   Rows run alternately in rotated order; min / median / max MB/s and ratios per repeat.
2. Refs: small sample-ref records through our transactional producer and read_committed reader
   (with strict encode/decode), against raw kafka-python (idempotent producer, default consumer).

Both sides of every ratio run in the same process on the same disk and broker. Uses
KAFKA_BOOTSTRAP_SERVERS if set, else starts the local broker (removed at exit).

    python benchmarks/bench_dataplane.py --samples 16 --repeats 3
    python benchmarks/bench_dataplane.py --rows raw specstream --refs 0

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
import struct
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import crc32c
import numpy as np
import torch
from _stats import alternate, print_ratios, print_spread, scratch, session  # benchmarks/, beside this file
from kafka import KafkaConsumer, KafkaProducer, TopicPartition  # the raw baseline only

from pipeline.core.messages import EndOfStream, SampleRef, TargetInfo, decode, encode, now
from pipeline.core.topics import RunTopics
from pipeline.durable_write import start_writeback
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


@dataclass
class Case:
    """What every byte row gets: the same samples (tensors and their safetensors bytes), a fresh
    directory of its own (removed after the row) and the broker."""

    tensors: list[dict[str, torch.Tensor]]
    payloads: list[bytes]
    root: Path
    bootstrap: str

    @property
    def nbytes(self) -> int:
        return sum(len(p) for p in self.payloads)


def _timed(write: Callable[[], None], read: Callable[[], None]) -> dict[str, float]:
    started = time.perf_counter()
    write()
    wrote = time.perf_counter()
    read()
    ended = time.perf_counter()
    return {"s": ended - started, "write_s": wrote - started, "read_s": ended - wrote}


def _ref(run_id: str, i: int, stored, tokens: int) -> SampleRef:
    return SampleRef(
        run_id=run_id, sample_id=f"s{i}", prompt_id=f"p{i}", producer_id="bench", uri=stored.uri,
        nbytes=stored.nbytes, checksum=stored.checksum, num_tokens=tokens, tensors=stored.tensors,
        target=TARGET, created_at=now(), seq=i,
    )  # fmt: skip


def tensor_crc(tensors: dict[str, torch.Tensor]) -> int:
    """CRC-32C over every tensor's bytes, in name order: the peers' stand-in for a file checksum."""
    crc = 0
    for name in sorted(tensors):
        crc = crc32c.crc32c(tensors[name].contiguous().view(torch.uint8).numpy(), crc)
    return crc


def _check(tensors: dict[str, torch.Tensor], expected: int) -> None:
    if tensor_crc(tensors) != expected:
        raise AssertionError("checksum mismatch on read")


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def raw_chunks(tensors: dict[str, torch.Tensor], payload: bytes) -> list[memoryview]:
    """The safetensors file ``payload`` as the header's bytes and then each tensor's own memory, in
    file order: what a plain writer hands the kernel without building the file in memory first."""
    (size,) = struct.unpack("<Q", payload[:8])
    header = json.loads(payload[8 : 8 + size])
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
    chunks = [memoryview(payload)[: 8 + size]]
    chunks += [memoryview(tensors[name].contiguous().view(torch.uint8).numpy()) for name in names]
    if sum(c.nbytes for c in chunks) != len(payload):
        raise AssertionError("the tensors do not tile the safetensors file")
    return chunks


#: The raw writer's piece: on this machine 16 files written in 1 MiB pieces took 0.38 s (median of 7)
#: against 0.42 s as one ``write`` per file: the best plain writer writes in pieces.
WRITE_PIECE = 1 << 20


def _write_all(fd: int, chunks: list[memoryview], *, hint: bool = True) -> None:
    """Write ``chunks`` in order, ``WRITE_PIECE`` bytes a call, until every byte is written; with
    ``hint``, ask the kernel to start writing each piece back as it is written (as the put does)."""
    written = 0
    for chunk in chunks:
        view = chunk.cast("B")
        while view:
            done = os.write(fd, view[:WRITE_PIECE])
            if hint:
                start_writeback(fd, written, done)
            written += done
            view = view[done:]


def row_raw(case: Case, *, hint: bool = True) -> dict[str, float]:
    """The same bytes, plain: written in 1 MiB pieces from the tensors' memory, each hinted to
    writeback, + fsync, read back with ``readinto`` into one reused, already faulted-in buffer;
    nothing verified (the baseline). The best a plain writer and reader do."""
    parts = [raw_chunks(t, data) for t, data in zip(case.tensors, case.payloads, strict=True)]
    buffer = np.ones(max(len(data) for data in case.payloads), dtype=np.uint8)  # every page touched

    def write() -> None:
        for i, chunks in enumerate(parts):
            fd = os.open(case.root / f"{i}.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                _write_all(fd, chunks, hint=hint)
                os.fsync(fd)
            finally:
                os.close(fd)

    def read() -> None:
        for i, data in enumerate(case.payloads):
            with open(case.root / f"{i}.bin", "rb", buffering=0) as f:
                view = memoryview(buffer)[: len(data)]
                while view:
                    got = f.readinto(view)
                    if not got:
                        raise AssertionError(f"{i}.bin is short")
                    view = view[got:]

    return _timed(write, read)


def row_raw_bytes(case: Case) -> dict[str, float]:
    """The file built as one bytes object: write + fsync, read back into a fresh bytes object."""

    def write() -> None:
        for i, data in enumerate(case.payloads):
            with open(case.root / f"{i}.bin", "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())

    def read() -> None:
        for i in range(len(case.payloads)):
            (case.root / f"{i}.bin").read_bytes()

    return _timed(write, read)


def row_specstream(case: Case) -> dict[str, float]:
    """put -> transactional ref -> read_committed consume -> get + verify, end to end."""
    settings = KafkaSettings(case.bootstrap)
    run_id = f"bench-{uuid.uuid4().hex[:8]}"
    topics = RunTopics(run_id)
    with KafkaAdmin(settings) as admin:
        admin.ensure_run_topics(topics, 1)
    store = FeatureStore(str(case.root / "store"), run_id)
    # Clients are created once per process in a real run: their setup is not part of the path.
    producer = TransactionalProducer(settings, f"{run_id}.bench")
    stream = SampleStream(settings, store, run_id, [0], idle_timeout_s=60)
    # Nor is a new producer's first transaction on a new topic (the topic's metadata, its first
    # AddPartitionsToTxn): one is aborted here, and a read_committed reader never sees its record.
    producer.begin()
    producer.send(topics.samples, 0, b"warm-up")
    producer.abort()
    samples = len(case.tensors)

    def write() -> None:
        producer.begin()
        for i, t in enumerate(case.tensors):
            producer.send(
                topics.samples, 0, encode(_ref(run_id, i, store.put(0, f"s{i}", t), len(t["input_ids"])))
            )
        producer.send(topics.samples, 0, encode(EndOfStream(run_id=run_id, stage="generate", partition=0,
                                                             count=samples, seq=samples)))  # fmt: skip
        producer.commit()

    def read() -> None:
        assert sum(1 for _ in stream) == samples

    try:
        return _timed(write, read)
    finally:
        producer.close()
        stream.close()
        with KafkaAdmin(settings) as admin:
            admin.delete_topics([topics.prompts, topics.samples, topics.ledger, topics.dlq, topics.manifest])


def row_specstream_store(case: Case) -> dict[str, float]:
    """put + get + verify through the feature store alone (no Kafka: the peers' scope)."""
    store = FeatureStore(str(case.root / "store"), f"bench-{uuid.uuid4().hex[:8]}")
    refs: list[SampleRef] = []

    def write() -> None:
        refs.extend(
            _ref(store.run_id, i, store.put(0, f"s{i}", t), len(t["input_ids"]))
            for i, t in enumerate(case.tensors)
        )

    def read() -> None:
        for ref in refs:
            store.get(ref)

    return _timed(write, read)


def _peer(case: Case, save: Callable[[dict[str, torch.Tensor], Path], None],
          load: Callable[[Path], dict[str, torch.Tensor]]) -> dict[str, float]:  # fmt: skip
    """A peer format: save + fsync (file, directory) with a CRC-32C of the tensors; load + CRC check."""
    crcs: list[int] = []

    def write() -> None:
        for i, t in enumerate(case.tensors):
            crcs.append(tensor_crc(t))
            save(t, case.root / f"{i}.bin")
            _fsync_path(case.root / f"{i}.bin")
            _fsync_path(case.root)  # the new name: equal durability with specstream's put

    def read() -> None:
        for i, crc in enumerate(crcs):
            _check(load(case.root / f"{i}.bin"), crc)

    return _timed(write, read)


def row_torch_save(case: Case) -> dict[str, float]:
    """torch.save / torch.load(weights_only=True) of the same tensor dict."""
    return _peer(case, lambda t, p: torch.save(t, p), lambda p: torch.load(p, weights_only=True))


def row_save_file(case: Case) -> dict[str, float]:
    """safetensors save_file / load_file."""
    from safetensors.torch import load_file, save_file

    return _peer(case, lambda t, p: save_file(t, str(p)), lambda p: load_file(str(p)))


def row_safe_open(case: Case) -> dict[str, float]:
    """safetensors save_file, read with safe_open (mmap) + get_tensor per tensor."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    def load(path: Path) -> dict[str, torch.Tensor]:
        with safe_open(str(path), framework="pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - not a dict

    return _peer(case, lambda t, p: save_file(t, str(p)), load)


#: name -> row; ``raw`` is the baseline every ratio is taken against.
BYTE_ROWS: dict[str, Callable[[Case], dict[str, float]]] = {
    "raw": row_raw,
    "raw-unhinted": lambda case: row_raw(case, hint=False),
    "raw-bytes": row_raw_bytes,
    "specstream": row_specstream,
    "specstream-store": row_specstream_store,
    "torch.save": row_torch_save,
    "save_file": row_save_file,
    "safe_open": row_safe_open,
}


#: Rows run only when ``--rows`` names them: the baselines of earlier tables.
OPT_IN_ROWS = ("raw-unhinted", "raw-bytes")


def bench_bytes(bootstrap: str, args: argparse.Namespace, work: Path) -> None:
    """Every chosen row once per repeat, rotated; MB/s and ratios to raw with their spread."""
    tensors = [make_sample(args.tokens, args.hidden, i) for i in range(args.samples)]
    from safetensors.torch import save

    payloads = [save(t) for t in tensors]  # the raw side writes the same bytes specstream does
    mb = sum(len(p) for p in payloads) / 1e6

    def side(name: str) -> Callable[[], dict[str, float]]:
        def run() -> dict[str, float]:
            root = work / f"{name}-{uuid.uuid4().hex[:6]}"
            root.mkdir()
            try:
                out = BYTE_ROWS[name](Case(tensors, payloads, root, bootstrap))
            finally:
                shutil.rmtree(root, ignore_errors=True)
                os.sync()  # the deletion's journal work (and discards) is not the next row's to pay
            return {**out, "mbps": mb / out["s"]}

        return run

    print(f"bytes: {args.samples} samples x {mb / args.samples:.1f} MB, rows {', '.join(args.rows)}, "
          f"{args.repeats} repeats (rotated order, {args.warmup} warm-up round)", flush=True)  # fmt: skip
    results = alternate({name: side(name) for name in args.rows}, args.repeats, warmup=args.warmup, show="mbps",
                        fmt="{:.0f} MB/s")  # fmt: skip
    print_spread(results, "mbps", label="write + fsync + read (+ verify) MB/s", fmt="{:7.1f}")
    print_spread(results, "write_s", label="write phase s", fmt="{:7.2f}")
    print_spread(results, "read_s", label="read phase s", fmt="{:7.2f}")
    if "raw" in results:
        print_ratios(results, "raw", "mbps", label="throughput", goal="specstream >= 0.95")
    if "specstream-store" in results and len(results) > 2:
        print_ratios(results, "specstream-store", "s", label="time (> 1: slower than specstream's store)")


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
    print(
        f"put + get + verify, {args.samples} samples x {mb / args.samples:.1f} MB, {args.repeats} repeats "
        "(MB/s min / median / max)"
    )
    for name, runs in (("local disk", local), (args.storage, remote)):
        print(f"  {name:<28}: {min(runs):8.1f} / {statistics.median(runs):8.1f} / {max(runs):8.1f}")
    if args.endpoint_url:
        print(f"  ({args.endpoint_url} is a local emulator: its absolute figure is the emulator's, not S3's)")


def _ref_values(run_id: str, refs: int) -> list[bytes]:
    template = SampleRef(
        run_id=run_id, sample_id="x", prompt_id="p", producer_id="bench", uri="features/0/x.safetensors",
        nbytes=33_554_432, checksum="crc32c:01234567", num_tokens=1024,
        tensors={"aux_hidden_states": {"dtype": "BF16", "shape": [1024, 12288]},
                 "final_hidden_states": {"dtype": "BF16", "shape": [1024, 4096]},
                 "input_ids": {"dtype": "I64", "shape": [1024]}, "loss_mask": {"dtype": "U8", "shape": [1024]}},
        target=TARGET, created_at=now(),
    )  # fmt: skip
    return [encode(template.model_copy(update={"sample_id": f"s{i}"})) for i in range(refs)]


def refs_raw(bootstrap: str, refs: int) -> dict[str, float]:
    """raw kafka-python: default (idempotent) producer, default consumer, bytes only."""
    topic = f"bench-{uuid.uuid4().hex[:8]}.raw"
    with KafkaAdmin(KafkaSettings(bootstrap)) as admin:
        admin.ensure_topics({topic: 1})
    values = _ref_values("bench", refs)
    started = time.perf_counter()
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    for value in values:
        producer.send(topic, value=value, partition=0)
    producer.flush()
    producer.close()
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    consumer.assign([TopicPartition(topic, 0)])
    seen = 0
    while seen < refs:
        for batch in consumer.poll(timeout_ms=500).values():
            seen += len(batch)
    consumer.close()
    elapsed = time.perf_counter() - started
    with KafkaAdmin(KafkaSettings(bootstrap)) as admin:
        admin.delete_topics([topic])
    return {"s": elapsed, "refs_per_s": refs / elapsed}


def refs_ours(bootstrap: str, refs: int, per_txn: int) -> dict[str, float]:
    """build + encode each ref, transactions of per_txn, read_committed + strict decode."""
    settings = KafkaSettings(bootstrap)
    run_id = f"bench-{uuid.uuid4().hex[:8]}"
    topics = RunTopics(run_id)
    with KafkaAdmin(settings) as admin:
        admin.ensure_run_topics(topics, 1)
    template = SampleRef.model_validate_json(_ref_values(run_id, 1)[0])
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
    elapsed = time.perf_counter() - started
    with KafkaAdmin(settings) as admin:
        admin.delete_topics([topics.prompts, topics.samples, topics.ledger, topics.dlq, topics.manifest])
    return {"s": elapsed, "refs_per_s": refs / elapsed}


def bench_refs(bootstrap: str, args: argparse.Namespace) -> None:
    """Raw kafka-python and ours, alternating, refs/s and the ratio with their spread."""
    print(f"refs: {args.refs} records, {args.repeats} repeats (rotated order)", flush=True)
    results = alternate(
        {"raw kafka-python": lambda: refs_raw(bootstrap, args.refs),
         "transactional + read_committed + strict codec": lambda: refs_ours(bootstrap, args.refs, args.refs_per_transaction)},
        args.repeats, show="refs_per_s", fmt="{:.0f} refs/s",
    )  # fmt: skip
    print_spread(results, "refs_per_s", label="refs/s", fmt="{:8.0f}")
    print_ratios(results, "raw kafka-python", "refs_per_s", label="refs/s", goal=">= 0.5 and >= 2000 refs/s")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument(
        "--rows", nargs="+", default=[r for r in BYTE_ROWS if r not in OPT_IN_ROWS], choices=list(BYTE_ROWS),
        help="byte rows to run (raw-unhinted, raw-bytes: earlier tables' baselines, on request)"
    )
    parser.add_argument("--refs", type=int, default=20000, help="0: skip the refs comparison")
    parser.add_argument("--refs-per-transaction", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of every row, rotated order")
    parser.add_argument("--warmup", type=int, default=0, help="discarded rounds of the byte rows first")
    parser.add_argument(
        "--storage", help="an fsspec URL (s3://bucket/prefix): benchmark the feature store there"
    )
    parser.add_argument("--endpoint-url", help="the S3 endpoint (a local emulator such as moto's server)")
    parser.add_argument("--storage-options", default="{}", help="fsspec storage options as JSON")
    args = parser.parse_args()
    with session("bench_dataplane"):
        if args.storage:
            storage_main(args)
            return
        with broker() as bootstrap, scratch("bench-dataplane-") as work:
            bench_bytes(bootstrap, args, work)
            if args.refs:
                bench_refs(bootstrap, args)


if __name__ == "__main__":
    main()
