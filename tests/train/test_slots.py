"""Reading into reused batch buffers: the same batches as get + collate, and no held batch overwritten."""

from __future__ import annotations

import time
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pipeline.core.feature_encoding import FeatureDtype
from pipeline.core.messages import EndOfStream, SampleRef, TensorSpec, encode
from pipeline.core.topics import RunTopics
from pipeline.feature_codec import encode_features
from pipeline.storage import FeatureStore
from pipeline.stream import SampleStream, fetch_sample
from pipeline.train.collate import Batch, collate, copy_pending, mark_in_flight
from pipeline.train.dataset import MicroBatch, Prefetcher, StreamEnd
from pipeline.train.epochs import EpochedSource
from pipeline.train.slots import BatchSlots
from pipeline.transport.memory import MemoryBroker
from tests.train_support import TARGET_INFO, sample_tensors

RUN = "slots"


def publish(
    tmp_path: Path,
    lengths: list[int],
    dtype: torch.dtype,
    corrupt: tuple[int, ...] = (),
    storage: FeatureDtype = "as_captured",
) -> tuple[MemoryBroker, FeatureStore]:
    """Store one sample per length (captured in ``dtype``, stored as ``storage``), publish their
    refs and the end marker on partition 0."""
    broker, store = MemoryBroker(), FeatureStore(str(tmp_path), RUN, durable=False)
    topics = RunTopics(RUN)
    broker.admin().ensure_run_topics(topics, 1)
    producer = broker.plain_producer()
    target = TARGET_INFO.model_copy(update={"dtype": str(dtype).removeprefix("torch.")})
    for i, length in enumerate(lengths):
        tensors = sample_tensors(i, length)
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
        stored = store.put(0, f"s{i}", encode_features(tensors, storage))
        if i in corrupt:
            path = store.resolve(stored.uri)
            data = bytearray(Path(path).read_bytes())
            data[-3] ^= 0x10
            Path(path).write_bytes(bytes(data))
        ref = SampleRef(
            run_id=RUN, sample_id=f"s{i}", prompt_id=f"p{i}", producer_id="t", uri=stored.uri,
            nbytes=stored.nbytes, checksum=stored.checksum, num_tokens=length, tensors=stored.tensors,
            target=target, created_at=0.0, seq=i,
        )  # fmt: skip
        producer.send(topics.samples, encode(ref), partition=0)
    n = len(lengths)
    marker = EndOfStream(run_id=RUN, stage="generate", partition=0, count=n, seq=n)
    producer.send(topics.samples, encode(marker), partition=0)
    return broker, store


def stream(broker: MemoryBroker, store: FeatureStore) -> SampleStream:
    return SampleStream(broker, store, RUN, [0], idle_timeout_s=10, poll_timeout_s=0.05)


def reference(
    broker: MemoryBroker, store: FeatureStore, batch_size: int, max_length: int | None
) -> list[Batch]:
    """Today's path: get (a fresh buffer per sample) + collate (fresh zeroed batches)."""
    items = list(stream(broker, store).items())
    groups = [items[i : i + batch_size] for i in range(0, len(items) - batch_size + 1, batch_size)]
    return [collate([it.tensors for it in g], max_length=max_length) for g in groups]


def same(a: Batch, b: Batch) -> bool:
    return all(
        getattr(a, f.name).dtype == getattr(b, f.name).dtype
        and torch.equal(getattr(a, f.name), getattr(b, f.name))
        for f in fields(Batch)
    )


def drain(prefetcher: Prefetcher, on_batch=lambda mb: None) -> StreamEnd:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        got = prefetcher.get(0.5)
        if isinstance(got, StreamEnd):
            return got
        if isinstance(got, MicroBatch):
            on_batch(got)
    raise AssertionError("the prefetcher did not end within 60 s")


@pytest.mark.parametrize(
    ("dtype", "storage"),
    [
        (torch.bfloat16, "as_captured"),
        (torch.float32, "as_captured"),
        (torch.float32, "bf16"),
        (torch.float32, "fp8_e4m3"),
    ],
)
@pytest.mark.parametrize("max_length", [None, 6])
def test_batches_read_in_place_equal_get_plus_collate(
    tmp_path: Path,
    dtype: torch.dtype,
    storage: FeatureDtype,
    max_length: int | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Stored as captured: read in place; stored compactly (``storage.dtype``): decoded as before."""
    lengths = [3, 9, 4, 5, 8, 2, 7, 6, 5, 3, 9, 4]  # longer than max_length: decoded and truncated instead
    broker, store = publish(tmp_path, lengths, dtype, storage=storage)
    expected = reference(broker, store, 3, max_length)
    served: list[object] = []
    dest = BatchSlots.dest
    monkeypatch.setattr(BatchSlots, "dest", lambda self, ref: served.append(dest(self, ref)) or served[-1])
    prefetcher = Prefetcher(stream(broker, store), batch_size=3, depth=2, max_length=max_length).start()
    got: list[MicroBatch] = []
    try:
        drain(prefetcher, got.append)
    finally:
        prefetcher.close()
    slots = prefetcher._slots
    assert slots is not None, "the local stream cannot read into slots"
    assert len(got) == len(expected) == 4
    for mb, batch in zip(got, expected):
        assert same(mb.batch, batch)
    read_in_place = sum(d is not None for d in served)
    if storage == "as_captured":  # every sample that fits a row: all, or those within max_length
        assert read_in_place == sum(n <= (max_length or 10**9) for n in lengths)
    else:
        assert read_in_place == 0


def test_a_corrupt_sample_is_dead_lettered_and_its_row_reused(tmp_path: Path) -> None:
    lengths = [4, 5, 6, 3, 7, 4, 5]
    broker, store = publish(tmp_path, lengths, torch.bfloat16, corrupt=(1, 4))
    expected = reference(broker, store, 2, None)
    source = stream(broker, store)
    prefetcher = Prefetcher(source, batch_size=2, depth=2).start()
    got: list[MicroBatch] = []
    try:
        end = drain(prefetcher, got.append)
    finally:
        prefetcher.close()
    assert end.dead_letters == 2 and end.summary.foreign == 2
    assert [s.sample_id for mb in got for s in mb.samples] == ["s0", "s2", "s3", "s5"]
    assert len(got) == len(expected) and all(same(mb.batch, b) for mb, b in zip(got, expected))


@pytest.mark.parametrize("hold", [1, 3, 100])
def test_buffer_reuse_never_changes_a_batch_still_held(tmp_path: Path, hold: int) -> None:
    """The consumer keeps its last ``hold`` micro-batches (a step's grad_accum) while the prefetch
    thread runs ahead: each one must still equal its reference when it is finally dropped."""
    lengths = [(i * 7) % 11 + 2 for i in range(40)]
    broker, store = publish(tmp_path, lengths, torch.bfloat16)
    expected = reference(broker, store, 2, None)
    prefetcher = Prefetcher(stream(broker, store), batch_size=2, depth=1).start()
    held: list[tuple[int, MicroBatch]] = []
    seen = {"n": 0}

    def on_batch(mb: MicroBatch) -> None:
        held.append((seen["n"], mb))
        seen["n"] += 1
        while len(held) > hold:
            index, old = held.pop(0)
            assert same(old.batch, expected[index]), f"micro-batch {index} changed while it was held"

    try:
        drain(prefetcher, on_batch)
    finally:
        prefetcher.close()
    assert seen["n"] == len(expected) == 20
    assert all(same(mb.batch, expected[i]) for i, mb in held)
    slots = prefetcher._slots
    assert slots is not None
    # As many buffers as are in use at once: the queue (1), the one filled, the held, the one handed over.
    if hold < 100:
        assert slots.allocated <= hold + 3 and slots.reused > 0 and slots.transient == 0
    else:  # all held: the ring grows to its cap (depth 1 + 10), then fresh buffers, never a held one
        assert slots.allocated == 11 and slots.transient == 20 - 11 and slots.reused == 0


class _Event:
    """Stands in for the CUDA event of a host-to-device copy out of a slot."""

    def __init__(self) -> None:
        self.done = False

    def query(self) -> bool:
        return self.done


def test_a_buffer_is_not_refilled_while_a_copy_out_of_it_may_run() -> None:
    spec = {
        "input_ids": TensorSpec(dtype="I64", shape=[4]),
        "loss_mask": TensorSpec(dtype="U8", shape=[4]),
        "aux_hidden_states": TensorSpec(dtype="BF16", shape=[4, 24]),
        "final_hidden_states": TensorSpec(dtype="BF16", shape=[4, 8]),
    }
    ref = SimpleNamespace(tensors=spec, target=SimpleNamespace(dtype="bfloat16"))
    slots = BatchSlots(1, max_length=4, dtype=None, pin=False, keep=1)

    def one_batch() -> torch.Tensor:
        assert slots.dest(ref) is not None
        out = slots.take()
        assert out is not None
        return out[0]

    first = one_batch()
    event = _Event()
    mark_in_flight(first, event)  # what Batch.to records after an asynchronous copy to a GPU
    assert copy_pending(first)
    assert one_batch() is not first and slots.transient == 1  # the copy may still read it
    event.done = True
    assert one_batch() is first and slots.reused == 1 and not copy_pending(first)
    held = slots.dest(ref)  # reuses it again; a view of it stays held (the trainer's batch)
    slots.take()
    assert one_batch() is not first and slots.transient == 2
    del held
    assert one_batch() is first and slots.reused == 3


def test_samples_the_slots_cannot_hold_as_stored_are_left_to_get() -> None:
    """Another dtype than the batch's, extra tensors (compact features' scales), too long: decoded."""

    def ref(
        length: int = 4, dtype: str = "BF16", captured: str = "bfloat16", **extra: TensorSpec
    ) -> SimpleNamespace:
        return SimpleNamespace(target=SimpleNamespace(dtype=captured), tensors={
            "input_ids": TensorSpec(dtype="I64", shape=[length]),
            "loss_mask": TensorSpec(dtype="U8", shape=[length]),
            "aux_hidden_states": TensorSpec(dtype=dtype, shape=[length, 24]),
            "final_hidden_states": TensorSpec(dtype=dtype, shape=[length, 8]),
            **extra,
        })  # fmt: skip

    slots = BatchSlots(2, max_length=4, dtype=torch.bfloat16, pin=False, keep=1)
    assert slots.dest(ref(dtype="F32")) is None
    assert slots.dest(ref(dtype="F8_E4M3")) is None
    assert slots.dest(ref(aux_scale=TensorSpec(dtype="F32", shape=[4]))) is None
    assert slots.dest(ref(length=5)) is None
    assert slots.dest(ref(captured="float32")) is None  # bf16 storage of a float32 capture: decoding casts
    got = slots.dest(ref(length=3))
    assert got is not None and got["aux_hidden_states"].shape == (3, 24)
    assert got["final_hidden_states"].dtype == torch.bfloat16


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA: pinned slots and row-wise copies to the GPU"
)
def test_pinned_slots_reach_the_gpu_unchanged_while_the_buffers_are_reused(tmp_path: Path) -> None:
    lengths = [(i * 5) % 9 + 2 for i in range(24)]
    broker, store = publish(tmp_path, lengths, torch.bfloat16)
    expected = reference(broker, store, 2, None)
    prefetcher = Prefetcher(stream(broker, store), batch_size=2, depth=2, pin_memory=True).start()
    on_gpu: list[Batch] = []

    def on_batch(mb: MicroBatch) -> None:
        assert mb.batch.aux_hidden_states.is_pinned()
        on_gpu.append(mb.batch.to("cuda"))  # the CPU batch is dropped at once: its buffer may be refilled

    try:
        drain(prefetcher, on_batch)
    finally:
        prefetcher.close()
    torch.cuda.synchronize()
    assert prefetcher._slots is not None and prefetcher._slots.reused > 0
    assert len(on_gpu) == len(expected)
    back = [got.to("cpu") for got in on_gpu]
    torch.cuda.synchronize()  # a non-blocking copy to the host is complete only now
    assert all(same(got, batch) for got, batch in zip(back, expected))


def test_later_epochs_read_into_the_slots_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lengths = [3, 6, 4, 5, 2, 7, 5, 4]
    broker, store = publish(tmp_path, lengths, torch.bfloat16)

    def epoched() -> EpochedSource:
        return EpochedSource(
            stream(broker, store),
            open_listing=lambda: SampleStream(broker, store, RUN, [0], idle_timeout_s=10, fetch=False),
            fetch=lambda ref: fetch_sample(store, ref),
            epochs=3,
            seed=5,
        )

    items = list(epoched().items())  # today's path: get + decode per sample
    expected = [collate([it.tensors for it in items[i : i + 2]]) for i in range(0, len(items), 2)]
    served: list[object] = []
    dest = BatchSlots.dest
    monkeypatch.setattr(BatchSlots, "dest", lambda self, ref: served.append(dest(self, ref)) or served[-1])
    prefetcher = Prefetcher(epoched(), batch_size=2, depth=1).start()
    got: list[MicroBatch] = []
    try:
        drain(prefetcher, got.append)
    finally:
        prefetcher.close()
    assert len(got) == len(expected) == 12
    assert all(same(mb.batch, batch) for mb, batch in zip(got, expected))
    assert sum(d is not None for d in served) == 3 * len(lengths)  # the online pass and both later epochs
