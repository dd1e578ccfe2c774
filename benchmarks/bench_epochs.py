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
import shutil
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

from _stats import alternate, print_ratios, print_spread, scratch, session  # benchmarks/, beside this file


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
    with open(Path(config.train.output_dir) / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
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
    title = (f"{args.conversations} conversations x {args.epochs} epochs, batch {args.batch}, TTT {args.ttt_steps}, "
             f"tiny target on CPU, {args.threads} torch threads per run")  # fmt: skip
    with session(title), scratch("bench-epochs-") as root, broker() as bootstrap:
        target = build_tiny_target()
        once, repeated = root / "once.jsonl", root / "repeated.jsonl"
        conversations = markov_conversations(args.conversations, seed=0)
        write_jsonl(conversations, str(once))
        write_jsonl(conversations * args.epochs, str(repeated))
        forwards = count_forwards()
        pass_steps = args.conversations // args.batch

        def side(data: Path, epochs: int) -> Callable[[], dict[str, float]]:
            return lambda: one_run(make_config(root, bootstrap, data, target, args, epochs), forwards, pass_steps)

        results = alternate({"online x E": side(repeated, 1), "epochs: E": side(once, args.epochs)}, args.repeats,
                            show="wall_s", fmt="{:.1f}")  # fmt: skip
        print_spread(results, "forwards", label="target forwards (counted at the HF capture)", fmt="{:8.0f}")
        print_spread(results, "wall_s", label="wall time, s", fmt="{:8.1f}")
        print_spread(results, "later_wait", label="data-wait share after the first pass", fmt="{:8.4f}")
        print_ratios(results, "online x E", "forwards", goal=f"1/E = {1 / args.epochs:.3f}")
        print_ratios(results, "online x E", "wall_s", goal="<= 0.5 for E = 4 where target and trainer cost alike")


if __name__ == "__main__":
    main()
