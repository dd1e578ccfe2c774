"""Interleaved generation + training against drain-then-fit, on the same workload, in one run.

Drain-then-fit generates every sample first and trains afterwards (what offline pipelines do);
the interleaved runtime trains while the generators produce. Both use the tiny target on CPU,
with one torch thread per side so generation and training each get a core of their own, and
the same data, batch shapes and broker. Reported: time to the first optimizer step and total
wall time, and their ratios (goal: total <= 0.7x, first step after about one trainer window).

    python benchmarks/bench_interleave.py --conversations 768 --hidden 512 --ttt-steps 1
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
import uuid
from pathlib import Path

import torch

from pipeline.app.config import RunConfig
from pipeline.app.config_file import parse_config
from pipeline.app.manifest import claim_run
from pipeline.app.runtime import build_online_run
from pipeline.app.settings import trainer_settings
from pipeline.devkit.chats import markov_conversations, write_jsonl
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


def make_config(root: Path, bootstrap: str, data: Path, target: Path, batch: int, ttt: int) -> RunConfig:
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
            "train": {"batch_size": batch, "lr": 3e-3, "ttt_steps": ttt, "draft_vocab_size": 128,
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


def drain_then_fit(config: RunConfig) -> tuple[float, float, float, float]:
    from pipeline.train.distributed import DistContext
    from pipeline.train.export import export_checkpoint
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
    export_checkpoint(result.checkpoint, online.model_spec(), str(Path(config.train.output_dir) / "export"))
    ended = time.time()
    return first_step_time(config) - started, ended - started, generated - started, ended - generated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=768)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512, help="target width (64: the tiny trained target)")
    parser.add_argument("--ttt-steps", type=int, default=1, help="training-time-test depth (balances the sides)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one core for generation, one for training
    root = Path(tempfile.mkdtemp(prefix="bench-interleave-"))
    target = wide_target(build_tiny_target(), args.hidden, root)
    data = root / "data.jsonl"
    write_jsonl(markov_conversations(args.conversations, seed=0), str(data))
    with broker() as bootstrap:
        drain_first, drain_total, gen_s, train_s = drain_then_fit(
            make_config(root, bootstrap, data, target, args.batch, args.ttt_steps)
        )
        inter_first, inter_total = interleaved(make_config(root, bootstrap, data, target, args.batch, args.ttt_steps))
    print(
        f"{args.conversations} conversations, batch {args.batch}, target hidden {args.hidden} on CPU, "
        f"TTT {args.ttt_steps}, 1 torch thread per side"
    )
    print(f"  drain-then-fit : first step {drain_first:6.1f} s, total {drain_total:6.1f} s "
          f"(source + generation {gen_s:.1f} s, training + export {train_s:.1f} s)")
    print(f"  interleaved    : first step {inter_first:6.1f} s, total {inter_total:6.1f} s")
    print(f"  ratio total    : {inter_total / drain_total:.2f}  (goal <= 0.7)")
    print(f"  ratio first    : {inter_first / drain_first:.2f}")


if __name__ == "__main__":
    main()
