"""Interleaved generation + training against drain-then-fit, on the same workload and the same cores.

Drain-then-fit generates every sample first and trains afterwards (what offline pipelines do);
the interleaved runtime trains while the generators produce. Both use the same target on CPU, the
same data, batch shapes, broker and core count. ``torch.set_num_threads`` is process-wide, so each
side sets it for itself: the interleaved run gives each of its two sides (the generator thread and
the trainer) ``--threads / 2`` torch threads, so together they use ``--threads`` cores; each
drain-then-fit phase runs alone and gets all ``--threads``. One discarded warm-up of each side pays
the process's first imports and model loads; then the sides alternate, rotating which goes first.

Reported per side, min / median / max over the repeats: total wall time, time to the first
optimizer step, and the peak bytes of feature files on storage (sampled every 0.2 s); and the
ratios interleaved / drain-then-fit per repeat.

What interleaving buys: the first step after about one trainer window instead of after the whole
capture, feature storage bounded by the watermarks and retention instead of the whole dataset,
and no separate capture phase to schedule. It shortens the total only when generation and
training use different resources (the target on inference GPUs, the draft on training GPUs); on a
CPU machine both sides compete for the same cores, so a total ratio near 1 is the expected result.

    python benchmarks/bench_interleave.py --conversations 768 --hidden 512 --ttt-steps 1 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import torch
from _stats import alternate, print_ratios, print_spread, scratch, session  # benchmarks/, beside this file

from pipeline.app.config import RunConfig
from pipeline.app.config_file import parse_config
from pipeline.app.manifest import claim_run
from pipeline.app.runtime import build_online_run
from pipeline.app.settings import trainer_settings
from pipeline.devkit.chats import markov_conversations, write_jsonl
from pipeline.devkit.storage_peak import StoragePeak
from pipeline.devkit.target import TINY_AUX_LAYER_IDS, build_tiny_target
from pipeline.transport.broker import env_or_local_broker as broker


def wide_target(tiny: Path, hidden: int, scratch: Path) -> Path:
    """A randomly initialised 4-layer Llama of the given width with the tiny target's tokenizer.

    With the hidden-64 tiny target every torch op lasts microseconds, so both sides spend their
    time in Python and contend for the GIL instead of using a core each; wider matrices make the
    work what it is on real targets: kernels that release the GIL.
    """
    if hidden == 64:
        return tiny
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = scratch / f"target-h{hidden}"
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=8, vocab_size=512, max_position_embeddings=4096, tie_word_embeddings=False,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny).save_pretrained(out)
    return out


def make_config(
    root: Path, bootstrap: str, data: Path, target: Path, args: argparse.Namespace, *, drain: bool
) -> RunConfig:
    """The same run for both sides; drain-then-fit cannot have backpressure (nothing trains while
    it generates), so its watermark is out of reach; the interleaved run keeps the defaults."""
    run = f"bench-{uuid.uuid4().hex[:8]}"
    generate = {"high_watermark": 10**9, "low_watermark": 10**9 - 1} if drain else {}
    if not drain and args.high_watermark:
        generate = {"high_watermark": args.high_watermark, "low_watermark": args.high_watermark * 3 // 4}
    return parse_config(
        {
            "run_id": run,
            "broker": {"bootstrap_servers": bootstrap},
            "storage": {"root": str(root / run / "features"), "retention": args.retention},
            "data": {"path": str(data), "max_length": 256, "partitions": 4},
            "target": {
                "backend": "hf",
                "model": str(target),
                "aux_layer_ids": list(TINY_AUX_LAYER_IDS),
                "batch_size": args.batch,
            },
            "generate": generate,
            "train": {
                "batch_size": args.batch,
                "lr": 3e-3,
                "ttt_steps": args.ttt_steps,
                "draft_vocab_size": 128,
                "save_interval": args.save_interval,
                "prefetch": 4,
                "output_dir": str(root / run / "out"),
            },
        }
    )


def first_step_time(config: RunConfig) -> float:
    with open(Path(config.train.output_dir) / "metrics.jsonl") as f:
        return float(json.loads(f.readline())["time"])


def interleaved(config: RunConfig) -> dict[str, float]:
    started = time.time()
    with StoragePeak(config.storage.root) as peak:
        build_online_run(config).run()
    ended = time.time()
    return {
        "total_s": ended - started,
        "first_s": first_step_time(config) - started,
        "peak_mb": peak.peak / 1e6,
    }


def drain_then_fit(config: RunConfig) -> dict[str, float]:
    from pipeline.train.distributed import DistContext
    from pipeline.train.export import export_checkpoint
    from pipeline.train.runner import run_trainer

    started = time.time()
    with StoragePeak(config.storage.root) as peak:
        online = build_online_run(config)
        claim_run(online.transport, config)
        source = online.source_stage().run()
        workers = [online.generator(f"{config.run_id}-gen", list(range(config.data.partitions)))]
        threads = [threading.Thread(target=w.run) for w in workers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        generated = time.time()
        result = run_trainer(
            trainer_settings(config, schedule_steps=max(1, source.prompts // config.global_batch)),
            transport=online.transport,
            storage_root=config.storage.root,
            model=online.model_spec(),
            dist=DistContext(),
            device="cpu",
        )
        assert result.checkpoint is not None
        # the interleaved run() exports too: keep the work identical
        export_checkpoint(
            result.checkpoint, online.model_spec(), str(Path(config.train.output_dir) / "export")
        )
    ended = time.time()
    return {
        "total_s": ended - started, "first_s": first_step_time(config) - started, "peak_mb": peak.peak / 1e6,
        "generate_s": generated - started, "train_s": ended - generated,
    }  # fmt: skip


def side(
    run: Callable[[RunConfig], dict[str, float]], threads: int, config: Callable[[], RunConfig]
) -> Callable[[], dict[str, float]]:
    """One measured run with its torch thread count (process-wide: set before every run), its
    run directory removed afterwards (the features of 768 conversations at hidden 512: ~1 GB)."""

    def measured() -> dict[str, float]:
        torch.set_num_threads(threads)
        c = config()
        try:
            return run(c)
        finally:
            shutil.rmtree(Path(c.storage.root).parent, ignore_errors=True)

    return measured


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--conversations", type=int, default=768)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512, help="target width (64: the tiny trained target)")
    parser.add_argument(
        "--ttt-steps", type=int, default=1, help="training-time-test depth (balances the sides)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="pairs, rotated order")
    parser.add_argument(
        "--warmup-conversations", type=int, default=64, help="a discarded run of each side first (0: none)"
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2,
                        help="cores for the whole run: each drain phase gets all, each interleaved side half")  # fmt: skip
    parser.add_argument("--high-watermark", type=int, default=0,
                        help="interleaved: pause generation above this many untrained samples (0: the config default, 256)")  # fmt: skip
    parser.add_argument("--retention", choices=["delete", "retain"], default="delete")
    parser.add_argument(
        "--save-interval", type=int, default=24, help="steps; retention deletes at checkpoints"
    )
    args = parser.parse_args()
    with session("bench_interleave"), scratch("bench-interleave-") as root:
        target = wide_target(build_tiny_target(), args.hidden, root)
        data, warm = root / "data.jsonl", root / "warm.jsonl"
        write_jsonl(markov_conversations(args.conversations, seed=0), str(data))
        write_jsonl(markov_conversations(max(1, args.warmup_conversations), seed=1), str(warm))
        per_side = max(1, args.threads // 2)
        with broker() as bootstrap:

            def sides(path: Path) -> dict[str, Callable[[], dict[str, float]]]:
                return {
                    "drain-then-fit": side(drain_then_fit, args.threads,
                                           lambda: make_config(root, bootstrap, path, target, args, drain=True)),
                    "interleaved": side(interleaved, per_side,
                                        lambda: make_config(root, bootstrap, path, target, args, drain=False)),
                }  # fmt: skip

            if args.warmup_conversations:
                alternate(sides(warm), 1)
            results = alternate(sides(data), args.repeats, show="total_s", fmt="{:.1f} s")
        print(
            f"{args.conversations} conversations, batch {args.batch}, target hidden {args.hidden} on CPU, "
            f"TTT {args.ttt_steps}, {args.threads} cores: drain phases {args.threads} torch threads each, "
            f"interleaved {per_side} per side; retention {args.retention}, checkpoint every {args.save_interval} steps"
        )
        print_spread(results, "total_s", label="total wall time s", fmt="{:6.1f}")
        print_spread(results, "first_s", label="time to first step s", fmt="{:6.1f}")
        print_spread(results, "peak_mb", label="peak feature storage MB", fmt="{:7.0f}")
        drain = results["drain-then-fit"]
        generate_s = statistics.median(r["generate_s"] for r in drain)
        train_s = statistics.median(r["train_s"] for r in drain)
        print(f"  drain-then-fit phases s (median): generate {generate_s:.1f}, train + export {train_s:.1f}")
        for key, label in (("total_s", "total"), ("first_s", "first step"), ("peak_mb", "peak storage")):
            print_ratios(results, "drain-then-fit", key, label=label)


if __name__ == "__main__":
    main()
