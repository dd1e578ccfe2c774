"""The trainer's read path (issue 13.3): get + collate against reading into reused slots.

The sides, alternated (rotated order) in one process over the same stored files, several repeats:

- ``get``: ``FeatureStore.get`` (the file mapped, CRC over the mapping; before issue 13 a fresh
  buffer per sample) + ``collate`` (fresh zero-filled batch tensors, a copy of every hidden state)
  (+ on CUDA a pinned copy of the batch): the path without slots;
- ``slots``: :func:`pipeline.read_into.read_into` each sample's hidden states straight into its row
  of a reused (on CUDA pinned) batch buffer, CRC over each chunk as it lands, and the collate pads;
- ``plain``: read every file into one reused buffer (no checks, no tensors): what storage delivers
  to a reader that does nothing else, the ceiling;
- ``hinted`` (``--cold`` only): the plain reader asking for the next file while it reads this one
  (:func:`pipeline.read_into.will_read`, as the stream and the ``slots`` side do): the disk's rate
  with a request always queued, which a one-file-at-a-time reader does not reach.

Reported per side: CPU seconds per GB read (the process's CPU time, all threads) and GB/s, min /
median / max over repeats, the user-space bytes copied per sample (counted from the code path), and
one rank's deliverable samples/s through the real :class:`~pipeline.train.dataset.Prefetcher` over a
:class:`~pipeline.stream.SampleStream` (in-process broker), with and without slots, next to the plain
reader. By default files sit in the page cache (written just before): the figures are the
reader's CPU cost, which is what limits a rank when storage is fast. With ``--cold`` every file is
evicted from the page cache (fsync + ``posix_fadvise(DONTNEED)``) before every pass, so each side
reads from the device: the plain reader's rate is then what the storage delivers, and the
deliverable runs read each file once (``--stream`` is the number of files). A virtual disk's
cold rate drifts between passes, so each deliverable run is compared with a plain pass of the
same repeat. Each deliverable run starts with a few micro-batches of cached files, so the
measured files are read into batch buffers already allocated and faulted in, as in a long run
and as the plain reader's one reused buffer is; both rates count from their first micro-batch
(of files) to the last. The fresh prefetcher's time to its first micro-batch is printed apart.

    python benchmarks/bench_read_path.py --samples 16 --batch 4 --repeats 5
    python benchmarks/bench_read_path.py --samples 48 --batch 4 --repeats 8 --cold
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.core.messages import EndOfStream, SampleRef, TargetInfo, encode
from pipeline.core.topics import RunTopics
from pipeline.read_into import read_into, will_read
from pipeline.storage import FeatureStore
from pipeline.stream import SampleStream
from pipeline.train.collate import collate
from pipeline.train.dataset import MicroBatch, Prefetcher, StreamEnd, _pinned
from pipeline.train.slots import BatchSlots
from pipeline.transport.memory import MemoryBroker

from _stats import spread as min_median_max  # benchmarks/, beside this file

RUN = "bench-read"
#: Micro-batches of cached files each deliverable run starts with: the ring grows to its size in them.
WARMUP_BATCHES = 8


def target(hidden: int) -> TargetInfo:
    return TargetInfo(
        model_id="llama-3.1-8b-shape", revision="bench", num_layers=32, aux_layer_ids=[1, 15, 28],
        hidden_size=hidden, vocab_size=128256, dtype="bfloat16",
    )  # fmt: skip


def write_samples(
    root: Path, samples: int, tokens: int, hidden: int, first: int = 0
) -> tuple[FeatureStore, list[SampleRef]]:
    store = FeatureStore(str(root), RUN, durable=False)
    refs = []
    g = torch.Generator().manual_seed(first)
    for i in range(first, first + samples):
        stored = store.put(0, f"s{i}", {
            "input_ids": torch.randint(0, 128256, (tokens,), generator=g),
            "loss_mask": torch.ones(tokens, dtype=torch.uint8),
            "aux_hidden_states": torch.randn(tokens, 3 * hidden, generator=g).bfloat16(),
            "final_hidden_states": torch.randn(tokens, hidden, generator=g).bfloat16(),
        })  # fmt: skip
        refs.append(SampleRef(
            run_id=RUN, sample_id=f"s{i}", prompt_id=f"p{i}", producer_id="bench", uri=stored.uri,
            nbytes=stored.nbytes, checksum=stored.checksum, num_tokens=tokens, tensors=stored.tensors,
            target=target(hidden), created_at=0.0, seq=i,
        ))  # fmt: skip
    return store, refs


# --- the sides: each reads every sample once into batches of ``batch`` -------------------------


def get_side(store: FeatureStore, refs: list[SampleRef], batch: int, pin: bool) -> None:
    for start in range(0, len(refs) - batch + 1, batch):
        out = collate([store.get(r) for r in refs[start : start + batch]])
        if pin:
            out = _pinned(out)


def slots_side(store: FeatureStore, refs: list[SampleRef], batch: int, pin: bool, slots: BatchSlots) -> None:
    for start in range(0, len(refs) - batch + 1, batch):
        samples = []
        for k, ref in enumerate(refs[start : start + batch]):
            if start + k + 1 < len(refs):
                will_read(store, refs[start + k + 1])  # as the stream does: the next file, hinted
            slots.row = k
            samples.append(read_into(store, ref, slots.dest(ref)))
        out = collate(samples, out=slots.take())
        if pin:
            out = _pinned(out)  # a no-op on tensors already pinned


def plain(store: FeatureStore, refs: list[SampleRef], buffer: bytearray, hinted: bool = False) -> None:
    view = memoryview(buffer)
    for i, ref in enumerate(refs):
        if hinted and i + 1 < len(refs):
            will_read(store, refs[i + 1])
        with open(store.resolve(ref.uri), "rb", buffering=0) as f:
            got = 0
            while got < ref.nbytes:
                n = f.readinto(view[got : ref.nbytes])
                if not n:
                    break
                got += n


def evict(store: FeatureStore, refs: list[SampleRef]) -> None:
    """Drop the files from the page cache (written back first: dirty pages cannot be dropped)."""
    for ref in refs:
        fd = os.open(store.resolve(ref.uri), os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


@dataclass
class Figures:
    cpu_s_per_gb: list[float]
    gb_s: list[float]


def timed(run: Callable[[], None], gb: float, figures: Figures) -> None:
    cpu, wall = time.process_time(), time.perf_counter()
    run()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    figures.cpu_s_per_gb.append(cpu / gb)
    figures.gb_s.append(gb / wall)


# --- deliverable samples/s of one rank: the real prefetcher over the real stream ----------------


class _NoSlots:
    """A stream without ``read_into_slots``: the prefetcher falls back to get + collate."""

    def __init__(self, stream: SampleStream) -> None:
        self._s = stream
        self.dead_letters = self.dropped_upstream = 0

    def items(self):
        return self._s.items()

    def state(self):
        return self._s.state()

    def summary(self):
        return self._s.summary()

    def close(self) -> None:
        self._s.close()

    def interrupt(self) -> None:
        self._s.interrupt()


def deliverable(
    store: FeatureStore,
    refs: list[SampleRef],
    warmup: list[SampleRef],
    batch: int,
    pin: bool,
    use_slots: bool,
) -> tuple[float, float]:
    """Samples/s the prefetcher hands a training loop that drops each micro-batch at once, and the
    seconds from its start to the first micro-batch.

    ``warmup`` (cached files, whole micro-batches) goes first, so ``refs`` are read with the ring of
    batch buffers already grown and faulted in, as in a long run and as the plain reader's buffer
    is; the rate counts ``refs`` from their first micro-batch to the last, like :func:`plain_rate`.
    """
    broker = MemoryBroker()
    topics = RunTopics(RUN)
    broker.admin().ensure_run_topics(topics, 1)
    producer = broker.plain_producer()
    stream_refs = [*warmup, *refs]
    for i, ref in enumerate(stream_refs):  # a file may appear twice: each time as another sample
        ref = ref.model_copy(update={"sample_id": f"d{i}", "seq": i})
        producer.send(topics.samples, encode(ref), partition=0)
    count = len(stream_refs)
    producer.send(
        topics.samples,
        encode(EndOfStream(run_id=RUN, stage="generate", partition=0, count=count, seq=count)),
        partition=0,
    )
    stream = SampleStream(broker, store, RUN, [0], idle_timeout_s=60, poll_timeout_s=0.05)
    source = stream if use_slots else _NoSlots(stream)
    started = time.perf_counter()
    prefetcher = Prefetcher(source, batch_size=batch, depth=4, pin_memory=pin).start()
    delivered, arrivals = 0, []
    try:
        while True:
            got = prefetcher.get(60.0)
            if got is None:
                raise TimeoutError("no micro-batch within 60 s")
            if isinstance(got, StreamEnd):
                break
            assert isinstance(got, MicroBatch)
            delivered += len(got.samples)
            arrivals.append(time.perf_counter())
    finally:
        prefetcher.close()
    if use_slots and prefetcher._slots is None:
        raise RuntimeError("the stream did not read into slots")
    if delivered != count or len(warmup) % batch or len(refs) <= batch:
        raise RuntimeError(f"{delivered} of {count} samples delivered, in micro-batches of {batch}")
    first = len(warmup) // batch  # the first micro-batch of ``refs``
    return (len(refs) - batch) / (arrivals[-1] - arrivals[first]), arrivals[0] - started


def plain_rate(
    store: FeatureStore, refs: list[SampleRef], buffer: bytearray, batch: int, hinted: bool
) -> float:
    """A plain reader's samples/s as :func:`deliverable` counts them: after its first ``batch`` files
    (its first micro-batch's worth), to the last."""
    plain(store, refs[:batch], buffer, hinted)
    if hinted and len(refs) > batch:
        will_read(store, refs[batch])
    first = time.perf_counter()
    plain(store, refs[batch:], buffer, hinted)
    return (len(refs) - batch) / (time.perf_counter() - first)


def copied_bytes(ref: SampleRef, pin: bool) -> dict[str, int]:
    """User-space bytes written per sample on each path (a full-length sample: no padding)."""
    hidden = sum(
        ref.tensors[n].shape[0] * ref.tensors[n].shape[1] * 2
        for n in ("aux_hidden_states", "final_hidden_states")
    )
    # get maps the file (no copy; before issue 13 it read it into a fresh buffer: + ref.nbytes)
    get_bytes = hidden + hidden + (hidden if pin else 0)  # zero-fill + copy (+ pin)
    return {"get": get_bytes, "slots": ref.nbytes, "plain": ref.nbytes, "hinted": ref.nbytes}


def spread(values: list[float], fmt: str = "8.2f") -> str:
    return " / ".join(f"{v:{fmt}}" for v in min_median_max(values))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--stream", type=int, default=64, help="samples per deliverable-rate run (files reused)"
    )
    parser.add_argument("--pin", choices=("auto", "yes", "no"), default="auto", help="pinned batches (CUDA)")
    parser.add_argument(
        "--cold", action="store_true", help="evict the files before each pass (read the disk)"
    )
    args = parser.parse_args()
    pin = torch.cuda.is_available() if args.pin == "auto" else args.pin == "yes"
    root = Path(tempfile.mkdtemp(prefix="bench-read-path-"))
    try:
        store, refs = write_samples(root, args.samples, args.tokens, args.hidden)
        gb = sum(r.nbytes for r in refs) / 1e9
        slots = BatchSlots(args.batch, max_length=args.tokens, dtype=None, pin=pin, keep=2)
        buffer = bytearray(refs[0].nbytes)
        sides: dict[str, Callable[[], None]] = {
            "get": lambda: get_side(store, refs, args.batch, pin),
            "slots": lambda: slots_side(store, refs, args.batch, pin, slots),
            "plain": lambda: plain(store, refs, buffer),
        }
        if args.cold:  # the disk's rate with the next file always requested: a reader can beat "plain"
            sides["hinted"] = lambda: plain(store, refs, buffer, hinted=True)
        figures = {name: Figures([], []) for name in sides}
        if args.cold:  # each file once (a second read would be cached); the warm-up from other, cached files
            stream = refs
            warm_files = write_samples(root, 2 * args.batch, args.tokens, args.hidden, first=args.samples)[1]
        else:
            stream = warm_files = [refs[i % len(refs)] for i in range(args.stream)]
        warmup = [warm_files[i % len(warm_files)] for i in range(WARMUP_BATCHES * args.batch)]
        prepare = (lambda: evict(store, refs)) if args.cold else (lambda: None)
        for side in sides.values():
            side()  # warm: page cache, allocator, slots
        rates: dict[str, list[float]] = {n: [] for n in sides}  # deliverable, or plain passes: samples/s
        first_batch: dict[str, list[float]] = {"get": [], "slots": []}  # seconds from a fresh prefetcher
        for i in range(args.repeats):
            k = i % len(sides)
            names = list(sides)[k:] + list(sides)[:k]  # rotated: no side always first
            for name in names:
                prepare()
                timed(sides[name], gb, figures[name])
            for name in names:  # each deliverable run beside a plain pass: a virtual disk's rate drifts
                prepare()
                if name in first_batch:
                    rate, latency = deliverable(store, stream, warmup, args.batch, pin, name == "slots")
                    first_batch[name].append(latency)
                else:
                    rate = plain_rate(store, stream, buffer, args.batch, hinted=name == "hinted")
                rates[name].append(rate)
            print(
                f"repeat {i}: "
                + ", ".join(f"{n} {figures[n].cpu_s_per_gb[-1]:.3f} CPU s/GB" for n in sides)
                + "; samples/s " + ", ".join(f"{n} {rates[n][-1]:.1f}" for n in names)
                + f"; load {os.getloadavg()[0]:.2f}",
                flush=True,
            )
        copies = copied_bytes(refs[0], pin)
        mb = refs[0].nbytes / 1e6
        print(
            f"\n{args.samples} samples x {mb:.1f} MB ({args.tokens} tokens, hidden {args.hidden}, bf16), "
            f"batch {args.batch}, pinned {pin}, {'cold (from the device)' if args.cold else 'page cache'}, "
            f"{args.repeats} repeats, min / median / max; "
            f"load {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs"
        )
        print(f"  {'side':<6} {'CPU s per GB':>28} {'GB/s (wall)':>28} {'bytes copied/sample':>22}")
        for name, fig in figures.items():
            print(
                f"  {name:<6} {spread(fig.cpu_s_per_gb, '8.3f'):>28} {spread(fig.gb_s):>28} "
                f"{copies[name] / 1e6:>17.1f} MB ({copies[name] / refs[0].nbytes:.1f}x)"
            )
        ratio = [t / s for t, s in zip(figures["get"].cpu_s_per_gb, figures["slots"].cpu_s_per_gb)]
        print(f"  CPU per GB, get / slots: {spread(ratio)}")
        wall = [s / p for s, p in zip(figures["slots"].gb_s, figures["plain"].gb_s)]
        print(f"  GB/s, slots / plain, per repeat: {spread(wall)}")
        print(
            f"one rank's deliverable samples/s ({len(stream)} samples, prefetcher over the stream, depth 4, "
            f"after {WARMUP_BATCHES} micro-batches of cached files: its batch buffers warm), from the first "
            "micro-batch to the last; plain: after its first batch of files, to the last:"
        )
        labels = {"get": "get", "slots": "slots",
                  "plain": "plain reader (no checks, no batches), beside them",
                  "hinted": "plain reader hinting the next file"}  # fmt: skip
        for name in sides:
            print(f"  {labels[name]}: {spread(rates[name], '8.1f')}")
        for base in ("plain", "hinted") if "hinted" in sides else ("plain",):
            ratio = [s / p for s, p in zip(rates["slots"], rates[base])]
            print(f"  slots / {base}, per repeat: {spread(ratio)}"
                  + ("  (goal >= 1 where storage limits)" if base == "plain" else ""))  # fmt: skip
        print("seconds from a fresh prefetcher (new stream, new batch buffers) to its first micro-batch: "
              + ", ".join(f"{n} {spread(v, '6.3f')}" for n, v in first_batch.items()))  # fmt: skip
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
