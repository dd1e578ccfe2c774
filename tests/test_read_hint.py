"""will_read: the next sample's file is requested from the disk while this one is read and checked."""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
import time
from pathlib import Path

import pytest
import torch

import pipeline.read_into as read_into_module
from pipeline.core.messages import EndOfStream, SampleRef, encode
from pipeline.core.topics import RunTopics
from pipeline.read_into import will_read
from pipeline.storage import FeatureStore
from pipeline.stream import SampleStream
from pipeline.transport.memory import MemoryBroker
from tests.test_storage import ref_for, sample

pytestmark = pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="posix_fadvise is Linux's")
_libc = ctypes.CDLL(None, use_errno=True)


def resident(path: str) -> bool:
    """Whether the file's last page is in the page cache (mincore over a mapping: it reads nothing,
    where a RWF_NOWAIT read that misses would itself start the kernel's readahead)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        mapping = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)  # touches no page
    anchor = ctypes.c_char.from_buffer(mapping)
    try:
        pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vector = (ctypes.c_ubyte * pages)()
        if _libc.mincore(ctypes.c_void_p(ctypes.addressof(anchor)), ctypes.c_size_t(size), vector) != 0:
            raise OSError(ctypes.get_errno(), "mincore failed")
        return bool(vector[pages - 1] & 1)
    finally:
        del anchor
        mapping.close()


def evict(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def wait_resident(path: str, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if resident(path):
            return True
        time.sleep(0.01)  # polling the page cache, with a deadline: nothing to wait on
    return False


@pytest.fixture()
def local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FeatureStore:
    monkeypatch.setattr(read_into_module, "HINT_MIN_BYTES", 0)  # the tiny test files are hinted too
    return FeatureStore(str(tmp_path), "run1")


def evicted(store: FeatureStore, count: int) -> list[SampleRef]:
    """``count`` stored samples, none of them in the page cache (skips where eviction is a no-op)."""
    refs = []
    for i in range(count):
        stored = store.put(0, f"s{i}", sample(6 + i))
        refs.append(ref_for(store, stored, sample_id=f"s{i}", num_tokens=6 + i, seq=i))
        evict(store.resolve(stored.uri))
        if resident(store.resolve(stored.uri)):
            pytest.skip("this filesystem keeps files in memory (tmpfs): nothing to evict")
    return refs


def test_a_hint_brings_an_evicted_file_into_the_page_cache(local: FeatureStore) -> None:
    (ref,) = evicted(local, 1)
    will_read(local, ref)
    assert wait_resident(local.resolve(ref.uri))


@pytest.mark.parametrize(
    "change",
    [{"uri": "../other/x.safetensors"}, {"uri": "features/0/missing.safetensors"}, {"run_id": "run2"},
     {"uri": "features/0/fifo"}],  # fmt: skip
)
def test_a_hint_for_a_ref_read_into_refuses_is_ignored_and_never_blocks(
    local: FeatureStore, change: dict
) -> None:
    (ref,) = evicted(local, 1)
    os.mkfifo(local.resolve("features/0/fifo"))  # opening it for reading without O_NONBLOCK would hang
    hinting = threading.Thread(target=will_read, args=(local, ref.model_copy(update=change)), daemon=True)
    hinting.start()
    hinting.join(timeout=10)
    assert not hinting.is_alive()
    assert not resident(local.resolve(ref.uri))  # the file the ref named before the change: untouched


def test_the_stream_hints_the_next_sample_before_handing_out_this_one(local: FeatureStore) -> None:
    refs = evicted(local, 3)
    broker = MemoryBroker()
    topics = RunTopics("run1")
    broker.admin().ensure_run_topics(topics, 1)
    producer = broker.plain_producer()
    for ref in refs:
        producer.send(topics.samples, encode(ref), partition=0)
    marker = EndOfStream(run_id="run1", stage="generate", partition=0, count=len(refs), seq=len(refs))
    producer.send(topics.samples, encode(marker), partition=0)
    stream = SampleStream(broker, local, "run1", [0], idle_timeout_s=10, poll_timeout_s=0.05)
    items = stream.items()
    first = next(items)
    assert first.ref.sample_id == "s0" and torch.equal(first.tensors["input_ids"], torch.arange(6))
    assert wait_resident(local.resolve(refs[1].uri))  # requested while s0 was read: before its turn
    assert not resident(local.resolve(refs[2].uri))  # one ahead, no more
    assert [item.ref.sample_id for item in items] == ["s1", "s2"]
    assert stream.summary().partitions_ended == 1
    stream.close()
