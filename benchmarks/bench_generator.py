"""Generator benchmark: the worker's tokens/s against the bare model forward on the same batches.

One run, one process, one target, one disk and broker: the ratio is the result, not the absolute
numbers. For each shape it measures, on identical batches of equal-length prompts:

1. ``forward``: ``HFTarget.forward`` alone (the padded forward with the aux-layer hooks, the
   hidden states copied to the CPU) - the compute the generator cannot avoid;
2. ``pipelined``: the generator worker end to end (poll, capture, safetensors files with fsync,
   refs + offsets in one Kafka transaction per batch), writes and commits overlapped with the
   next batch's forward (``queue_depth=2``);
3. ``sequential``: the same worker with ``queue_depth=0`` (capture, then write, then commit),
   to show what the overlap buys.

The three paths run alternately in every round, rotating which goes first; tokens/s and the ratio
to the forward (paired within a round) are reported min / median / max over the rounds, with the
machine's load at the start and the end. The goal is ``pipelined / forward >= 0.9``. Uses KAFKA_BOOTSTRAP_SERVERS if set, else starts the
local broker.

    python benchmarks/bench_generator.py                      # tiny and small shapes
    python benchmarks/bench_generator.py --shape small --prompts 48 --tokens 512
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from _stats import alternate, column, print_ratios, print_spread, session  # benchmarks/, beside this file
from _stats import scratch as scratch_dir

from pipeline.core.messages import Prompt, prompt_id_for
from pipeline.core.topics import RunTopics
from pipeline.generate.hf import HFTarget
from pipeline.generate.worker import GeneratorConfig, GeneratorWorker
from pipeline.source.publisher import PromptPublisher
from pipeline.storage import FeatureStore
from pipeline.transport.broker import env_or_local_broker as broker
from pipeline.transport.kafka import KafkaAdmin, KafkaSettings

#: name -> (Llama config overrides, aux layer ids); "tiny" is the trained tiny target.
SHAPES: dict[str, dict] = {
    "tiny": {},
    "small": {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 4, "num_attention_heads": 8,
              "num_key_value_heads": 8, "vocab_size": 4096},
    "medium": {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 4, "num_attention_heads": 16,
               "num_key_value_heads": 8, "vocab_size": 8192},
}  # fmt: skip


def model_dir(shape: str, scratch: Path) -> Path:
    """The tiny trained target, or a randomly initialised Llama of the shape (seeded)."""
    if shape == "tiny":
        from pipeline.devkit.target import build_tiny_target  # lazy: only the tiny shape

        return build_tiny_target()
    from transformers import LlamaConfig, LlamaForCausalLM  # lazy: only the random shapes

    out = scratch / f"model-{shape}"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SHAPES[shape], max_position_embeddings=4096)).save_pretrained(out)
    return out


class Shared:
    """The same loaded target for every measured run (the worker closes its backend at the end)."""

    def __init__(self, target: HFTarget) -> None:
        self.target = target
        self.info = target.info

    def capture(self, prompts: Sequence[tuple[list[int], list[int]]]) -> list[dict]:
        return self.target.capture(prompts)

    def close(self) -> None:
        pass


def make_prompts(run_id: str, count: int, tokens: int, vocab: int) -> list[Prompt]:
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(count):
        ids = torch.randint(8, vocab, (tokens,), generator=g).tolist()
        mask = [0] * (tokens // 4) + [1] * (tokens - tokens // 4)
        out.append(Prompt(run_id=run_id, prompt_id=prompt_id_for(i, ids), input_ids=ids, loss_mask=mask))
    return out


def bare_forward(target: HFTarget, prompts: list[Prompt], batch: int) -> float:
    """Seconds for the forward passes alone over the worker's batches (consecutive prompts)."""
    started = time.perf_counter()
    for i in range(0, len(prompts), batch):
        target.forward([p.input_ids for p in prompts[i : i + batch]])
    return time.perf_counter() - started


@dataclass
class WorkerRun:
    tokens: int
    seconds: float
    capture_s: float
    write_s: float
    commit_s: float


def worker_run(
    settings: KafkaSettings, target: Shared, prompts: list[Prompt], batch: int, depth: int, root: Path
) -> WorkerRun:
    """The generator worker over one partition (so its batches are the same consecutive prompts)."""
    run_id = f"bench-{uuid.uuid4().hex[:8]}"
    prompts = [p.model_copy(update={"run_id": run_id}) for p in prompts]
    topics = RunTopics(run_id)
    with KafkaAdmin(settings) as admin:
        admin.ensure_run_topics(topics, 1)
    try:
        PromptPublisher(settings, run_id, 1).publish(prompts)
        worker = GeneratorWorker(
            settings, FeatureStore(str(root), run_id), target,
            GeneratorConfig(run_id=run_id, worker_id="bench", partitions=[0], batch_size=batch, queue_depth=depth),
        )  # fmt: skip
        stats = worker.run()
        assert stats.refs == len(prompts), stats
        return WorkerRun(stats.tokens, stats.busy_s, stats.capture_s, stats.write_s, stats.commit_s)
    finally:
        with KafkaAdmin(settings) as admin:
            admin.delete_topics([topics.prompts, topics.samples, topics.ledger, topics.dlq, topics.manifest])
        shutil.rmtree(root / run_id, ignore_errors=True)


def bench_shape(settings: KafkaSettings, shape: str, args: argparse.Namespace, scratch: Path) -> float:
    directory = model_dir(shape, scratch)
    target = HFTarget(directory, aux_layer_ids=[0, 1, 2], batch_tokens=args.batch * args.tokens,
                      device=args.device, dtype=args.dtype)  # fmt: skip
    info = target.info
    prompts = make_prompts("bench", args.prompts, args.tokens, info.vocab_size)
    tokens = args.prompts * args.tokens
    bare_forward(target, prompts[: args.batch], args.batch)  # warm-up
    shared = Shared(target)
    root = scratch / "features"
    root.mkdir(exist_ok=True)

    def forward() -> dict[str, float]:
        return {"tps": tokens / bare_forward(target, prompts, args.batch)}

    def worker(depth: int) -> Callable[[], dict[str, float]]:
        def run() -> dict[str, float]:
            r = worker_run(settings, shared, prompts, args.batch, depth, root)
            return {
                "tps": tokens / r.seconds,
                "capture_s": r.capture_s,
                "write_s": r.write_s,
                "commit_s": r.commit_s,
            }

        return run

    per_sample_mb = (4 * info.hidden_size * (4 if info.dtype == "float32" else 2) + 9) * args.tokens / 1e6
    print(
        f"\n[{shape}] hidden {info.hidden_size}, {info.num_layers} layers, {info.dtype}, "
        f"{args.prompts} prompts x {args.tokens} tokens, batch {args.batch}, "
        f"{per_sample_mb:.2f} MB per sample, torch threads {torch.get_num_threads()}, {args.rounds} rounds "
        "(rotated order)",
        flush=True,
    )
    sides = {"forward": forward, "pipelined": worker(2), "sequential": worker(0)}
    results = alternate(sides, args.rounds, show="tps", fmt="{:.0f} tokens/s")
    target.close()
    print_spread(results, "tps", label="tokens/s", fmt="{:8.0f}")
    for name in ("pipelined", "sequential"):
        r = results[name]
        print(
            f"  {name}: capture / write / commit s (median, summed over batches): "
            f"{statistics.median(column(r, 'capture_s')):.2f} / {statistics.median(column(r, 'write_s')):.2f} / "
            f"{statistics.median(column(r, 'commit_s')):.2f}"
        )
    out = print_ratios(results, "forward", "tps", label="tokens/s", goal="pipelined >= 0.9")
    return statistics.median(out["pipelined"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--shape", action="append", choices=sorted(SHAPES), help="repeatable; default tiny and small"
    )
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every path, rotated order")
    parser.add_argument("--device", default="cpu", help="where the target runs: cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="default: the model's")
    args = parser.parse_args()
    with session("bench_generator"), scratch_dir("bench-generator-") as work, broker() as bootstrap:
        settings = KafkaSettings(bootstrap)
        for shape in args.shape or ["tiny", "small"]:
            bench_shape(settings, shape, args, work)


if __name__ == "__main__":
    main()
