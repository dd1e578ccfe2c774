"""Flow control against the partition count: one generator feeding one trainer over 4 vs 64 partitions.

Issue 13 item 4: at 64 partitions the backpressure share per partition (high watermark 256 / 64 =
4) is below the generator's batch of 8. This runs, alternately in one process, each run on a
broker of its own, a synthetic generator (the real worker, default watermarks) and a trainer
stand-in that reads every samples partition round-robin (the real ``SampleStream``), spends
``--compute-ms`` per sample and reports its progress in the ledger once per step, as the
trainer does. Per point and repeat: samples/s from the first sample read to the last, the
trainer's share of time waiting for data, the worker's batches (mean size), pauses and prompts
read twice. Prints min/median/max.

    python benchmarks/bench_partitions.py --samples 512 --repeats 3 --partitions 4 64
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

from pipeline.core.messages import LedgerStep, PartitionOffset, Prompt, RankProgress, StepMetrics, encode, now
from pipeline.core.messages import prompt_id_for
from pipeline.core.topics import RunTopics
from pipeline.generate.backpressure import TrainerWindow, Watermarks
from pipeline.generate.synthetic import SyntheticTarget
from pipeline.generate.worker import GeneratorConfig, GeneratorWorker
from pipeline.source.publisher import PromptPublisher
from pipeline.storage import FeatureStore
from pipeline.stream import SampleStream
from pipeline.transport.broker import LocalKafka
from pipeline.transport.kafka import KafkaAdmin, KafkaSettings, PlainProducer


def prompts(run_id: str, count: int) -> list[Prompt]:
    out = []
    for i in range(count):
        ids = [(i * 31 + j * 17 + 3) % 512 for j in range(32)]
        out.append(Prompt(run_id=run_id, prompt_id=prompt_id_for(i, ids), input_ids=ids, loss_mask=[1] * 32))
    return out


def trainer(kafka: KafkaSettings, store: FeatureStore, run_id: str, args: argparse.Namespace, partitions: int) -> dict[str, float]:
    """Read every partition round-robin, ``compute_ms`` per sample, one ledger record per step."""
    ledger = PlainProducer(kafka)
    stream = SampleStream(kafka, store, run_id, range(partitions), idle_timeout_s=120)
    seen, waited, first, last = 0, 0.0, 0.0, 0.0
    try:
        it = iter(stream)
        while True:
            asked = time.perf_counter()
            try:
                next(it)
            except StopIteration:
                break
            got = time.perf_counter()
            if seen:
                waited += got - asked
            else:
                first = got
            seen += 1
            time.sleep(args.compute_ms / 1000)  # the step's compute, not synchronisation
            last = time.perf_counter()
            if seen % args.step == 0 or seen == args.samples:
                state = stream.state()
                ledger.send(f"{run_id}.ledger", encode(LedgerStep(
                    run_id=run_id, step=seen // args.step, epoch=0, lr=0.0, created_at=now(),
                    metrics=StepMetrics(loss=0.0, ploss=[0.0], acc=[0.0]),
                    ranks=[RankProgress(rank=0, sample_ids=[], next_offsets=[
                        PartitionOffset(partition=p, offset=state.positions[p], records=state.consumed(p))
                        for p in range(partitions)
                    ])],
                )), partition=0)  # fmt: skip
                ledger.flush()
    finally:
        stream.close()
        ledger.close()
    span = max(last - first, 1e-9)
    return {"samples": seen, "rate": (seen - 1) / span, "wait": waited / span}


def one_run(bootstrap: str, root: Path, partitions: int, args: argparse.Namespace) -> dict[str, float]:
    kafka = KafkaSettings(bootstrap)
    run_id = f"bp{partitions}-{os.urandom(3).hex()}"
    with KafkaAdmin(kafka) as admin:
        admin.ensure_run_topics(RunTopics(run_id), partitions)
    PromptPublisher(kafka, run_id, partitions).publish(prompts(run_id, args.samples))
    store = FeatureStore(str(root), run_id, durable=False)
    worker = GeneratorWorker(kafka, store, SyntheticTarget(hidden_size=args.hidden), GeneratorConfig(
        run_id=run_id, worker_id="g0", batch_size=args.batch_size,
        backpressure=Watermarks(high=args.high, low=args.high * 3 // 4, check_interval_s=args.check_interval),
        trainer=TrainerWindow(world_size=1, batch_size=args.step, prefetch=args.step),
    ))  # fmt: skip
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    try:
        out = trainer(kafka, store, run_id, args, partitions)
    finally:
        stop.set()
        thread.join(timeout=60)
    s = worker.stats
    out.update(batches=s.batches, mean_batch=s.refs / max(s.batches, 1), pauses=s.pauses,
               reread=getattr(s, "reread", getattr(s, "trimmed", 0)))  # fmt: skip
    shutil.rmtree(root / run_id, ignore_errors=True)
    return out


def spread(values: list[float]) -> str:
    return f"{min(values):7.1f} {statistics.median(values):7.1f} {max(values):7.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--partitions", type=int, nargs="+", default=[4, 64])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8, help="the generator's batch")
    ap.add_argument("--high", type=int, default=256, help="backpressure high watermark (the default)")
    ap.add_argument("--step", type=int, default=8, help="samples per trainer step (one ledger record each)")
    ap.add_argument("--compute-ms", type=float, default=5.0, help="trainer compute per sample")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--check-interval", type=float, default=0.5, help="backpressure.check_interval_s")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-partitions-"))
    results: dict[int, list[dict[str, float]]] = {p: [] for p in args.partitions}
    try:
        for r in range(args.repeats):
            order = args.partitions if r % 2 == 0 else list(reversed(args.partitions))
            for p in order:  # alternated, rotated: neither point always runs first
                # A fresh broker per run: one that still hosts the earlier runs' topics completes
                # transactions over many partitions slower (CONCURRENT_TRANSACTIONS retries), so
                # whichever point ran later paid for the others.
                with LocalKafka(work / f"broker-{r}-{p}") as local:
                    res = one_run(local.bootstrap, work / "features", p, args)
                shutil.rmtree(work / f"broker-{r}-{p}", ignore_errors=True)
                results[p].append(res)
                print(f"repeat {r} partitions {p}: {res['samples']:.0f} of {args.samples}, "
                      f"{res['rate']:.1f} samples/s, wait {res['wait']:.0%}, samples/transaction {res['mean_batch']:.1f}, "
                      f"pauses {res['pauses']:.0f}, re-read {res['reread']:.0f}", flush=True)  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"load average {os.getloadavg()[0]:.2f}; min / median / max over {args.repeats} repeats")
    for p, runs in results.items():
        print(f"partitions {p:3d}: samples/s {spread([x['rate'] for x in runs])}  data wait % "
              f"{spread([100 * x['wait'] for x in runs])}  samples/transaction {spread([x['mean_batch'] for x in runs])}  "
              f"pauses {spread([x['pauses'] for x in runs])}  re-read {spread([x['reread'] for x in runs])}")  # fmt: skip
    if len(args.partitions) == 2:
        a, b = (results[p] for p in args.partitions)
        ratios = [y["rate"] / x["rate"] for x, y in zip(a, b, strict=True)]
        print(f"ratio {args.partitions[1]}/{args.partitions[0]} partitions samples/s: "
              f"{min(ratios):.2f} {statistics.median(ratios):.2f} {max(ratios):.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
