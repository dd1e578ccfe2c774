"""``python -m pipeline.train``: one trainer rank (start several with torchrun).

    torchrun --nproc_per_node 8 -m pipeline.train --run-id R --bootstrap host:9092 \\
        --storage s3://bucket/features --checkpoint-dir /shared/ckpt/R \\
        --target-model-path /models/Llama-3.1-8B-Instruct --vocab-mapping /shared/R/vocab.safetensors

SIGINT/SIGTERM: the current step finishes, every rank checkpoints, clients close, exit 0.
Exit 1 on a run error (incomplete stream, mismatched checkpoint, broker down), with the reason.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from pipeline.core.errors import SpecstreamError
from pipeline.train.config import TrainConfig
from pipeline.train.model import ModelSpec
from pipeline.train.runner import parse_layer_ids, run_trainer
from pipeline.transport.kafka import KafkaSettings

logger = logging.getLogger("pipeline.train")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    req = p.add_argument_group("run")
    req.add_argument("--run-id", required=True)
    req.add_argument(
        "--bootstrap",
        default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS"),
        help="Kafka bootstrap servers (default: $KAFKA_BOOTSTRAP_SERVERS)",
    )
    req.add_argument("--storage", required=True, help="feature store root (path or fsspec URL)")
    req.add_argument("--checkpoint-dir", required=True)
    req.add_argument(
        "--target-model-path", required=True, help="HF directory of the target (embedding, lm_head)"
    )
    req.add_argument("--vocab-mapping", required=True, help="frozen d2t/t2d safetensors file")
    req.add_argument("--aux-layer-ids", default=None, help="e.g. 0,1,2 (default: [1, N/2-1, N-4])")
    req.add_argument("--device", default=None, choices=["cpu", "cuda"])
    t = p.add_argument_group("training")
    t.add_argument("--batch-size", type=int, default=1)
    t.add_argument("--grad-accum", type=int, default=1)
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--warmup-ratio", type=float, default=0.015)
    t.add_argument("--schedule", choices=["cosine", "constant"], default="cosine")
    t.add_argument("--schedule-steps", type=int, default=None)
    t.add_argument("--max-steps", type=int, default=None)
    t.add_argument("--grad-clip", type=float, default=0.5)
    t.add_argument("--ttt-steps", type=int, default=7)
    t.add_argument("--max-length", type=int, default=2048)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--epoch", type=int, default=0)
    t.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA")
    t.add_argument("--deterministic", action="store_true", help="deterministic kernels (bit-exact resume)")
    c = p.add_argument_group("checkpoints and data")
    c.add_argument("--save-interval", type=int, default=100)
    c.add_argument("--keep-last", type=int, default=2)
    c.add_argument("--retention", choices=["delete", "retain"], default="delete")
    c.add_argument("--resume", default="auto", help="auto | never | required | a checkpoint directory")
    c.add_argument("--prefetch", type=int, default=4, help="micro-batches collated ahead")
    c.add_argument("--idle-timeout", type=float, default=600.0)
    c.add_argument("--collective-timeout", type=float, default=600.0)
    o = p.add_argument_group("output")
    o.add_argument("--metrics", default=None, help="JSONL file of per-step metrics (rank 0)")
    o.add_argument("--plot", default=None, help="PNG of the loss and acceptance curves at the end")
    o.add_argument("--no-progress", action="store_true")
    o.add_argument("-v", "--verbose", action="store_true")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        run_id=args.run_id,
        checkpoint_dir=args.checkpoint_dir,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr,
        warmup_ratio=args.warmup_ratio,
        schedule=args.schedule,
        schedule_steps=args.schedule_steps,
        max_steps=args.max_steps,
        grad_clip=args.grad_clip,
        ttt_steps=args.ttt_steps,
        max_length=args.max_length,
        seed=args.seed,
        epoch=args.epoch,
        amp=args.amp,
        deterministic=args.deterministic,
        save_interval=args.save_interval,
        keep_last=args.keep_last,
        retention=args.retention,
        resume=args.resume,
        prefetch=args.prefetch,
        idle_timeout_s=args.idle_timeout,
        collective_timeout_s=args.collective_timeout,
        metrics_path=args.metrics,
        plot_path=args.plot,
        progress=not args.no_progress,
    )


def _stop_on_signals(stop: threading.Event) -> None:
    def handler(signum: int, _frame: object) -> None:
        if stop.is_set():
            return
        logger.warning("%s: finishing the current step, then checkpointing", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("kafka").setLevel(logging.WARNING)
    logging.getLogger("pipeline.train").setLevel(logging.INFO)
    if not args.bootstrap:
        logger.error("no broker: pass --bootstrap or set KAFKA_BOOTSTRAP_SERVERS")
        return 2
    stop = threading.Event()
    _stop_on_signals(stop)
    try:
        config = config_from_args(args)
        result = run_trainer(
            config,
            settings=KafkaSettings(args.bootstrap),
            storage_root=args.storage,
            model=ModelSpec(args.target_model_path, args.vocab_mapping, parse_layer_ids(args.aux_layer_ids)),
            stop=stop,
            device=args.device,
        )
    except SpecstreamError as exc:
        logger.error("%s", exc)
        return 1
    logger.info(
        "rank %s finished: %s at step %d, %d samples trained, data wait %.1f%%, checkpoint %s",
        rank,
        result.reason,
        result.step,
        result.samples_trained,
        100 * result.data_wait_frac,
        result.checkpoint,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
