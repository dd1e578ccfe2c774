"""Interleaved generation + training against drain-then-fit, on the same workload, in one run.

Drain-then-fit generates every sample first and trains afterwards (what offline pipelines do);
the interleaved runtime trains while the generators produce. Both use the tiny target on CPU,
with one torch thread per side so generation and training each get a core of their own, and
the same data, batch shapes and broker. Reported: time to the first optimizer step and total
wall time, and their ratios (goal: total <= 0.7x, first step after about one trainer window).

    python benchmarks/bench_interleave.py --conversations 384
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import torch

from pipeline.broker import LocalKafka
from pipeline.config import RunConfig, parse_config
from pipeline.generate.tiny import TINY_AUX_LAYER_IDS, build_tiny_target, markov_conversations, write_jsonl
from pipeline.runtime import build_online_run, claim_run, train_config_for


@contextlib.contextmanager
def broker() -> Iterator[str]:
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        yield os.environ["KAFKA_BOOTSTRAP_SERVERS"]
        return
    with LocalKafka(Path(tempfile.mkdtemp(prefix="bench-kafka-"))) as k:
        yield k.bootstrap


def make_config(root: Path, bootstrap: str, data: Path, target: Path, batch: int) -> RunConfig:
    run = f"bench-{uuid.uuid4().hex[:8]}"
    return parse_config(
        {
            "run_id": run,
            "broker": {"bootstrap_servers": bootstrap},
            "storage": {"root": str(root / run / "features"), "retention": "retain"},
            "data": {"path": str(data), "max_length": 256, "partitions": 4},
            "target": {"backend": "hf", "model": str(target), "aux_layer_ids": list(TINY_AUX_LAYER_IDS),
                       "batch_size": batch},
            "generate": {"high_watermark": 100000, "low_watermark": 99999},
            "train": {"batch_size": batch, "lr": 3e-3, "ttt_steps": 3, "draft_vocab_size": 128,
                      "save_interval": 1000, "prefetch": 4, "output_dir": str(root / run / "out")},
        }  # fmt: skip
    )


def first_step_time(config: RunConfig) -> float:
    with open(Path(config.train.output_dir) / "metrics.jsonl") as f:
        return float(json.loads(f.readline())["time"])


def interleaved(config: RunConfig) -> tuple[float, float]:
    started = time.time()
    build_online_run(config).run()
    return first_step_time(config) - started, time.time() - started


def drain_then_fit(config: RunConfig) -> tuple[float, float]:
    from pipeline.train.distributed import DistContext
    from pipeline.train.runner import run_trainer

    started = time.time()
    online = build_online_run(config)
    claim_run(online.transport, config)
    source = online.source_stage().run()
    workers = [online.generator(f"{config.run_id}-gen", list(range(config.data.partitions)))]
    threads = [threading.Thread(target=w.run) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    run_trainer(
        train_config_for(config, schedule_steps=max(1, source.prompts // config.global_batch)),
        settings=online.transport,
        storage_root=config.storage.root,
        model=online.model_spec(),
        dist=DistContext(),
        device="cpu",
    )
    return first_step_time(config) - started, time.time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=384)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)  # one core for generation, one for training
    target = build_tiny_target()
    root = Path(tempfile.mkdtemp(prefix="bench-interleave-"))
    data = root / "data.jsonl"
    write_jsonl(markov_conversations(args.conversations, seed=0), str(data))
    with broker() as bootstrap:
        drain_first, drain_total = drain_then_fit(make_config(root, bootstrap, data, target, args.batch))
        inter_first, inter_total = interleaved(make_config(root, bootstrap, data, target, args.batch))
    print(f"{args.conversations} conversations, batch {args.batch}, tiny target on CPU, 1 thread per side")
    print(f"  drain-then-fit : first step {drain_first:6.1f} s, total {drain_total:6.1f} s")
    print(f"  interleaved    : first step {inter_first:6.1f} s, total {inter_total:6.1f} s")
    print(f"  ratio total    : {inter_total / drain_total:.2f}  (goal <= 0.7)")
    print(f"  ratio first    : {inter_first / drain_first:.2f}")


if __name__ == "__main__":
    main()
