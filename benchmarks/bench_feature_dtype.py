"""Compact features (``storage.dtype``): the quickstart's run once per storage dtype, side by side.

Every variant is the quickstart's config (the tiny target, the same conversations, the same seed,
on the same broker) under its own run id, trained to the end of the stream; only
``storage.dtype`` differs. For each it reports the final loss and step-0 accuracy (the last step's,
and the mean over the last 10 % of steps, which is less noisy), and the bytes per sample on
storage (the feature files' total over the samples).

It also measures the choice of fp8 scale on the hidden states the ``as_captured`` run stored
(the tiny target's real captures): the relative error per row ``||x - decode(encode(x))|| /
||x||`` with one float32 scale per row (what ``fp8_e4m3`` stores) against one scale per tensor,
on the captures as they are and with one channel of each sample's first token set to 1,000x and
10,000x the tensor's RMS: the "massive activations" real LLMs carry on their first token (reported
at thousands of times the typical magnitude), which the tiny target does not have.

The wall time printed per run is no comparison: the first run pays the process's warm-up, and the
development machine is shared. The losses and accuracies repeat exactly from run to run (CPU).

    python benchmarks/bench_feature_dtype.py            # 768 conversations, about a minute
    python benchmarks/bench_feature_dtype.py --keep     # keep the features and outputs (else removed)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.app.config import RunConfig
from pipeline.app.quickstart import quickstart_config
from pipeline.app.runtime import build_online_run
from pipeline.app.settings import kafka_settings
from pipeline.core.features import AUX_HIDDEN, FINAL_HIDDEN
from pipeline.feature_codec import FP8, FP8_MAX, encode_features
from pipeline.storage import FeatureStore, tensors_from_buffer
from pipeline.transport.broker import env_or_local_broker as broker

from _stats import scratch  # benchmarks/, beside this file

DTYPES = ("as_captured", "bf16", "fp8_e4m3")


def variant(base: RunConfig, work: Path, dtype: str) -> RunConfig:
    raw: dict[str, Any] = base.model_dump(mode="json")
    name = f"bench-dtype-{dtype.replace('_', '-')}-{uuid.uuid4().hex[:6]}"
    raw["run_id"] = name
    raw["storage"] = {**raw["storage"], "root": str(work / name / "features"), "dtype": dtype}
    raw["train"]["output_dir"] = str(work / name / "out")
    raw["train"]["report_to"] = []
    return RunConfig.model_validate(raw)


def run_once(config: RunConfig, bootstrap: str) -> dict[str, float]:
    started = time.perf_counter()
    result = build_online_run(config, transport=kafka_settings(config, bootstrap)).run()
    wall = time.perf_counter() - started
    assert result.reason == "end_of_stream", result.reason
    rows = [
        json.loads(line)
        for line in (Path(config.train.output_dir) / "metrics.jsonl").read_text().splitlines()
    ]
    tail = rows[-max(1, len(rows) // 10) :]
    files = list(Path(config.storage.root, config.run_id, "features").rglob("*.safetensors"))
    return {
        "steps": len(rows),
        "loss": rows[-1]["loss"],
        "acc0": rows[-1]["acc"][0],
        "tail_loss": statistics.mean(r["loss"] for r in tail),
        "tail_acc0": statistics.mean(r["acc"][0] for r in tail),
        "bytes_per_sample": sum(f.stat().st_size for f in files) / len(files),
        "wall_s": wall,
    }


def per_tensor_fp8(x: torch.Tensor) -> torch.Tensor:
    scale = x.abs().max() / FP8_MAX
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).float() * scale


def per_row_fp8(x: torch.Tensor) -> torch.Tensor:
    encoded = encode_features({AUX_HIDDEN: x, FINAL_HIDDEN: x}, "fp8_e4m3")
    return encoded[AUX_HIDDEN].float() * encoded[f"{AUX_HIDDEN}.scale"][:, None]


def scale_errors(config: RunConfig, *, massive: float = 0.0) -> dict[str, tuple[float, float]]:
    """Mean and worst relative row error of each fp8 scale granularity over the stored captures."""
    store = FeatureStore(config.storage.root, config.run_id)
    errors: dict[str, list[torch.Tensor]] = {"per row": [], "per tensor": []}
    for uri in store.list()[:200]:
        tensors = tensors_from_buffer(np.fromfile(store.resolve(uri), dtype=np.uint8))
        for name in (AUX_HIDDEN, FINAL_HIDDEN):
            x = tensors[name].float().clone()
            if massive:
                x[0, 5] = massive * float(x.pow(2).mean().sqrt())
            norms = x.norm(dim=1).clamp_min(1e-30)
            errors["per row"].append((x - per_row_fp8(x)).norm(dim=1) / norms)
            errors["per tensor"].append((x - per_tensor_fp8(x)).norm(dim=1) / norms)
    return {k: (float(torch.cat(v).mean()), float(torch.cat(v).max())) for k, v in errors.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--conversations", type=int, default=768)
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--keep", action="store_true", help="keep the work directory (features, outputs)")
    args = parser.parse_args()

    results: dict[str, dict[str, float]] = {}
    configs: dict[str, RunConfig] = {}
    scales: dict[str, dict[str, tuple[float, float]]] = {}
    with scratch("bench-feature-dtype-", keep=args.keep) as work, broker() as bootstrap:
        base = quickstart_config(work / "quickstart", conversations=args.conversations, bootstrap=bootstrap)
        for dtype in args.dtypes:
            configs[dtype] = variant(base, work, dtype)
            results[dtype] = run_once(configs[dtype], bootstrap)
            r = results[dtype]
            print(f"{dtype:>11}: {r['steps']:.0f} steps in {r['wall_s']:.1f} s", flush=True)
        if "as_captured" in configs:  # read from the stored captures, before the directory goes
            for label, massive in (("the tiny target's captures", 0.0), ("+ a 1,000x RMS activation", 1e3),
                                   ("+ a 10,000x RMS activation", 1e4)):  # fmt: skip
                scales[label] = scale_errors(configs["as_captured"], massive=massive)
    print(
        f"\nquickstart shape, {args.conversations} conversations, seed {base.train.seed}, one run per dtype:"
    )
    print(
        f"{'dtype':>11} {'loss':>7} {'acc0':>7} {'loss*':>7} {'acc0*':>7} {'bytes/sample':>13} {'vs captured':>11}"
    )
    captured = results.get("as_captured", {}).get("bytes_per_sample")
    for dtype, r in results.items():
        ratio = f"{r['bytes_per_sample'] / captured:.3f}" if captured else "-"
        print(f"{dtype:>11} {r['loss']:7.3f} {r['acc0']:7.3f} {r['tail_loss']:7.3f} {r['tail_acc0']:7.3f} "
              f"{r['bytes_per_sample']:13,.0f} {ratio:>11}")  # fmt: skip
    print("(loss, acc0: the last step; loss*, acc0*: the mean over the last 10 % of steps)")
    for label, errs in scales.items():
        line = ", ".join(f"{k}: mean {m:.4f}, worst {w:.4f}" for k, (m, w) in errs.items())
        print(f"fp8 relative row error on {label}: {line}")

if __name__ == "__main__":
    main()
