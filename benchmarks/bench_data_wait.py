"""Data-wait benchmark: the share of trainer step time spent waiting for data, with a fast producer.

The samples topic is filled before the trainer starts (a producer infinitely faster than the
trainer), then one trainer rank runs on it. Reported, from one run:

- the fraction of step time the training loop spent blocked on the prefetch queue (goal < 2 %);
- the time the prefetch thread spent fetching from Kafka and storage, verifying checksums and
  headers, and collating, as a fraction of step time: what a synchronous loader would have waited.

Their ratio is what prefetching hides. The first ``--warmup`` steps (client start, first fetch)
are reported separately. Uses KAFKA_BOOTSTRAP_SERVERS if set, else starts the local broker.

    python benchmarks/bench_data_wait.py --samples 320 --tokens 128 --hidden 512 --batch-size 8
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import torch
from _stats import scratch, session  # benchmarks/, beside this file
from safetensors.torch import save_file

from pipeline.app.metrics import LiveProcess
from pipeline.app.metrics_server import serve_metrics
from pipeline.core.messages import Prompt, prompt_id_for
from pipeline.core.topics import RunTopics
from pipeline.generate.synthetic import SyntheticTarget
from pipeline.generate.worker import GeneratorConfig, GeneratorWorker
from pipeline.source.publisher import PromptPublisher
from pipeline.storage import FeatureStore
from pipeline.train.config import TrainerSettings
from pipeline.train.distributed import DistContext
from pipeline.train.model import ModelSpec
from pipeline.train.runner import run_trainer
from pipeline.transport.broker import env_or_local_broker as broker
from pipeline.transport.kafka import KafkaAdmin, KafkaSettings
from pipeline.vocab import build_vocab_mapping


def write_target(directory: Path, hidden: int, vocab: int, heads: int) -> None:
    g = torch.Generator().manual_seed(0)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": 4 * hidden, "num_attention_heads": heads, "num_key_value_heads": heads,
        "num_hidden_layers": 4, "vocab_size": vocab, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "max_position_embeddings": 8192, "hidden_act": "silu", "tie_word_embeddings": False,
    }))  # fmt: skip
    save_file(
        {
            "model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g),
            "lm_head.weight": torch.randn(vocab, hidden, generator=g),
        },
        str(directory / "model.safetensors"),
    )


def fill(
    settings: KafkaSettings,
    run_id: str,
    root: str,
    partitions: int,
    samples: int,
    tokens: int,
    hidden: int,
    vocab: int,
) -> float:
    """Prompts -> synthetic generator threads -> samples topic, to the end of stream. Returns seconds."""
    started = time.perf_counter()
    prompts = []
    for i in range(samples):
        ids = [(i * 7919 + j * 104729) % vocab for j in range(tokens)]
        prompts.append(
            Prompt(
                run_id=run_id,
                prompt_id=prompt_id_for(i, ids),
                input_ids=ids,
                loss_mask=[0] * (tokens // 8) + [1] * (tokens - tokens // 8),
            )
        )
    PromptPublisher(settings, run_id, partitions).publish(prompts)
    store = FeatureStore(root, run_id)
    workers = [
        GeneratorWorker(
            settings,
            store,
            SyntheticTarget(hidden_size=hidden, vocab_size=vocab),
            GeneratorConfig(run_id=run_id, worker_id=f"gen-{i}", partitions=[p], batch_size=16),
        )
        for i, p in enumerate(range(partitions))
    ]
    threads = [threading.Thread(target=w.run) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - started


def scrape(url: str, every_s: float, stop: threading.Event) -> None:
    """Scrape the exporter as Prometheus would, until ``stop``."""
    while not stop.wait(every_s):
        with urllib.request.urlopen(url, timeout=5) as response:
            response.read()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=320)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--draft-vocab", type=int, default=512)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--ttt-steps", type=int, default=1)
    parser.add_argument("--prefetch", type=int, default=4, help="micro-batches collated ahead")
    parser.add_argument("--warmup", type=int, default=2, help="first steps reported separately")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--report-to", nargs="*", default=[], choices=["tensorboard", "wandb"],
        help="trackers on rank 0 (default none): compare the wall time per step with and without",
    )  # fmt: skip
    parser.add_argument(
        "--monitoring", action="store_true",
        help="the trainer's heartbeat every 5 s and a Prometheus exporter scraped every 5 s (with --report-to "
        "tensorboard: everything an operator switches on)",
    )  # fmt: skip
    args = parser.parse_args()

    with session("bench_data_wait"), scratch("bench-data-wait-") as work:
        measure(args, work)


def measure(args: argparse.Namespace, work: Path) -> None:
    """Fill the topic, train one rank on it, print the data-wait figures."""
    with broker() as bootstrap:
        settings = KafkaSettings(bootstrap)
        run_id = f"bench-{uuid.uuid4().hex[:8]}"
        with KafkaAdmin(settings) as admin:
            admin.ensure_run_topics(RunTopics(run_id), args.partitions)
        fill_s = fill(
            settings,
            run_id,
            str(work / "features"),
            args.partitions,
            args.samples,
            args.tokens,
            args.hidden,
            args.vocab,
        )
        write_target(work / "target", args.hidden, args.vocab, args.heads)
        counts = torch.bincount(torch.randint(0, args.vocab, (50_000,)), minlength=args.vocab)
        build_vocab_mapping(counts, args.vocab, args.draft_vocab).save(str(work / "vocab.safetensors"))
        config = TrainerSettings(
            run_id=run_id,
            checkpoint_dir=str(work / "ckpt"),
            batch_size=args.batch_size,
            grad_accum=args.grad_accum,
            lr=1e-3,
            betas=(0.9, 0.95),
            weight_decay=0.0,
            warmup_ratio=0.0,
            schedule="constant",
            schedule_steps=None,
            max_steps=None,
            grad_clip=0.5,
            ttt_steps=args.ttt_steps,
            loss_decay=0.8,
            max_length=args.tokens,
            seed=0,
            bf16=False,
            deterministic=False,
            save_interval=0,
            keep_last=2,
            retention="retain",
            resume="auto",
            prefetch=args.prefetch,
            idle_timeout_s=120,
            drain_timeout_s=None,
            collective_timeout_s=600,
            metrics_path=str(work / "metrics.jsonl"),
            plot_path=None,
            min_trained_fraction=1.0,
            report_to=tuple(args.report_to),
            heartbeat_interval_s=5.0 if args.monitoring else None,
        )
        device = torch.device(args.device)
        live = LiveProcess(run_id, settings)
        exporter = serve_metrics(live, 0, say=lambda _line: None) if args.monitoring else None
        scraping = threading.Event()
        if exporter is not None:
            threading.Thread(target=scrape, args=(exporter.url, 5.0, scraping), daemon=True).start()
        result = run_trainer(
            config,
            transport=settings,
            storage_root=str(work / "features"),
            model=ModelSpec(str(work / "target"), str(work / "vocab.safetensors"), (0, 1, 2)),
            dist=DistContext(device=device),
            device=args.device,
            observe=live.watch_trainer,
        )
        scraping.set()
        if exporter is not None:
            exporter.close()
        with KafkaAdmin(settings) as admin:
            t = RunTopics(run_id)
            admin.delete_topics([t.prompts, t.samples, t.ledger, t.dlq, t.manifest])

    rows = result.metrics
    steady = rows[args.warmup :]
    step_s = sum(r.step_s for r in steady)
    wait_s = sum(r.data_wait_frac * r.step_s for r in steady)
    prep_steady = sum(r.prepare_frac * r.step_s for r in steady)
    all_step_s = sum(r.step_s for r in rows)
    all_wait_s = sum(r.data_wait_frac * r.step_s for r in rows)
    mb = sum(p.stat().st_size for p in (work / "features").rglob("*.safetensors")) / 1e6
    print(
        f"samples: {args.samples} x {args.tokens} tokens, hidden {args.hidden} "
        f"({mb / args.samples:.2f} MB each); topic filled in {fill_s:.1f} s before training"
    )
    print(
        f"trainer: {len(rows)} steps of {args.batch_size} x {args.grad_accum} samples, TTT {args.ttt_steps}, "
        f"{sum(r.samples for r in steady) / step_s if step_s else 0:.1f} samples/s, "
        f"{sum(r.tokens for r in steady) / step_s if step_s else 0:.0f} tokens/s (steady)"
    )
    print(
        f"step time (steady, {len(steady)} steps): {step_s:.2f} s, "
        f"{1000 * step_s / max(1, len(steady)):.0f} ms/step"
    )
    print(
        f"fetch+verify+collate in the prefetch thread: {prep_steady:.2f} s = "
        f"{100 * prep_steady / step_s:.1f} % of step time (a synchronous loader would wait this)"
    )
    print(f"data wait with prefetch (steady): {100 * wait_s / step_s:.2f} %   (goal < 2 %)")
    print(f"data wait incl. the first {args.warmup} steps: {100 * all_wait_s / all_step_s:.2f} %")
    if len(steady) > 1:  # step_s stops before the step is reported; record times include it
        wall = (steady[-1].time - steady[0].time) / (len(steady) - 1)
        print(
            f"wall time per step (steady, reporting included, report_to={args.report_to}, "
            f"monitoring={args.monitoring}): {1000 * wall:.1f} ms"
        )
    if prep_steady > 0:
        print(f"ratio hidden by prefetch: {prep_steady / max(wait_s, 1e-9):.0f}x")


if __name__ == "__main__":
    main()
