"""E epochs from retained features against E online passes, on the same workload, in one run.

The baseline is what every online system does today (SpecForge, TorchSpec, ModelOpt streaming):
the target runs again for every epoch. Here it is one run of ``epochs: 1`` over the conversations
repeated E times, so the trainer takes the same number of steps on the same number of samples.
The subject is one run of ``epochs: E`` over the conversations once: the target runs once per
prompt, and epochs 1..E-1 read the retained features back in a fresh order. Both run in the same
process on the same broker, alternating (the order rotates every repeat), with the same torch
threads. Reported per side, min/median/max: target forwards (sequences counted at the HF
backend's capture), wall time, and the trainer's data-wait share of step time over the steps
after the online pass (the subject's reads from storage in shuffled order, with prefetch).

    python benchmarks/bench_epochs.py --conversations 256 --epochs 4 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import torch

from pipeline.app.config import RunConfig
from pipeline.app.config_file import parse_config
from pipeline.app.runtime import build_online_run
from pipeline.devkit.chats import markov_conversations, write_jsonl
from pipeline.devkit.target import TINY_AUX_LAYER_IDS, build_tiny_target
from pipeline.generate.hf import HFTarget
from pipeline.transport.broker import env_or_local_broker as broker


def count_forwards() -> Callable[[], int]:
    """Wrap the HF backend's capture so every sequence it runs through the target is counted."""
    original = HFTarget.capture
    lock, count = threading.Lock(), [0]

    def counting(self: HFTarget, prompts):  # type: ignore[no-untyped-def]
        with lock:
            count[0] += len(prompts)
        return original(self, prompts)

    HFTarget.capture = counting  # type: ignore[method-assign]

    def take() -> int:
        with lock:
            out, count[0] = count[0], 0
        return out

    return take


def make_config(root: Path, bootstrap: str, data: Path, target: Path, args: argparse.Namespace, epochs: int) -> RunConfig:
    run = f"bench-{uuid.uuid4().hex[:8]}"
    return parse_config(
        {
            "run_id": run,
            "broker": {"bootstrap_servers": bootstrap},
            "storage": {"root": str(root / run / "features"), "retention": "delete"},
            "data": {"path": str(data), "max_length": 256, "partitions": 4},
            "target": {"backend": "hf", "model": str(target), "aux_layer_ids": list(TINY_AUX_LAYER_IDS),
                       "batch_size": args.batch},
            "generate": {"high_watermark": 256, "low_watermark": 192},
            "train": {"batch_size": args.batch, "lr": 3e-3, "ttt_steps": args.ttt_steps, "draft_vocab_size": 128,
                      "save_interval": 1000, "prefetch": 4, "epochs": epochs, "output_dir": str(root / run / "out"),
                      "report_to": []},
        }  # fmt: skip
    )


def later_wait_share(config: RunConfig, first_pass_steps: int) -> float:
    """The data-wait share of step time over the steps after the online pass."""
    rows = [json.loads(line) for line in open(Path(config.train.output_dir) / "metrics.jsonl")]
    later = [r for r in rows if r["step"] > first_pass_steps]
    step_s = sum(r["step_s"] for r in later)
    return sum(r["data_wait_frac"] * r["step_s"] for r in later) / step_s if step_s else 0.0


def one_run(config: RunConfig, forwards: Callable[[], int], first_pass_steps: int) -> dict[str, float]:
    """One run to its end: target forwards, wall time, steps, later data wait; its files removed."""
    forwards()
    started = time.perf_counter()
    result = build_online_run(config).run()
    wall = time.perf_counter() - started
    assert result.reason == "end_of_stream", result.summary
    out = {"forwards": forwards(), "wall_s": wall, "steps": result.steps,
           "later_wait": later_wait_share(config, first_pass_steps)}  # fmt: skip
    shutil.rmtree(Path(config.storage.root).parent, ignore_errors=True)  # keep TMPDIR small
    return out


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    return "/".join(fmt.format(v) for v in (min(values), statistics.median(values), max(values)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--ttt-steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch threads, the same for both sides")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="bench-epochs-"))
    try:
        target = build_tiny_target()
        once, repeated = root / "once.jsonl", root / "repeated.jsonl"
        conversations = markov_conversations(args.conversations, seed=0)
        write_jsonl(conversations, str(once))
        write_jsonl(conversations * args.epochs, str(repeated))
        forwards = count_forwards()
        pass_steps = args.conversations // args.batch
        load = os.getloadavg()[0]
        sides: dict[str, list[dict[str, float]]] = {"online x E": [], "epochs: E": []}
        with broker() as bootstrap:
            runs = {
                "online x E": lambda: one_run(make_config(root, bootstrap, repeated, target, args, 1), forwards, pass_steps),
                "epochs: E": lambda: one_run(make_config(root, bootstrap, once, target, args, args.epochs), forwards, pass_steps),
            }
            for repeat in range(args.repeats):
                order = list(runs) if repeat % 2 == 0 else list(reversed(runs))
                for name in order:
                    sides[name].append(runs[name]())
        base, subject = sides["online x E"], sides["epochs: E"]
        print(f"{args.conversations} conversations x {args.epochs} epochs, batch {args.batch}, TTT {args.ttt_steps}, "
              f"tiny target on CPU, {args.threads} torch threads per run, {args.repeats} repeats (min/median/max); "
              f"load {load:.1f} at start, {os.getloadavg()[0]:.1f} at end, {os.cpu_count()} CPUs")  # fmt: skip
        for name, runs_ in sides.items():
            print(f"  {name:11}: target forwards {spread([r['forwards'] for r in runs_], '{:.0f}')}, "
                  f"steps {spread([r['steps'] for r in runs_], '{:.0f}')}, wall {spread([r['wall_s'] for r in runs_], '{:.1f}')} s, "
                  f"data wait after the first pass {spread([100 * r['later_wait'] for r in runs_])} %")  # fmt: skip
        ratios = [s["wall_s"] / b["wall_s"] for s, b in zip(subject, base, strict=True)]
        forward_ratio = statistics.median(s["forwards"] for s in subject) / statistics.median(b["forwards"] for b in base)
        print(f"  target forwards, epochs/online: {forward_ratio:.3f} (1/E = {1 / args.epochs:.3f})")
        print(f"  wall time, epochs/online      : {spread(ratios)} (goal <= 0.5 for E = 4)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
