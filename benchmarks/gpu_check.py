"""The GPU-ready check (issue 13 item 6): the CUDA paths in under 10 minutes on one GPU.

Three parts, each printing its figures (or, without CUDA, one ``SKIP`` line saying why; the
script then still exits 0, which is what CI runs on CPU):

1. HF capture on CUDA in bf16 against the bare forward (``bench_generator.py --device cuda
   --dtype bfloat16``, the small shape): the generator's tokens/s over the forward's;
2. the trainer in bf16 autocast, one rank with NCCL under torchrun: source and an HF generator
   on CUDA fill the run, ``torchrun --nproc-per-node 1 --no-python specstream train`` trains the
   tiny quickstart target's draft to ``--max-steps``; prints its samples/s and end summary;
3. the data plane into pinned host buffers: feature-store get + verify of 8B-shape samples
   (scaled by ``--hidden``) then host-to-device copy, from a reused pinned buffer against
   pageable memory (GB/s), and ``bench_data_wait.py --device cuda`` (the trainer's prefetch,
   which pins its batches on CUDA).

    benchmarks/gpu_check.sh            # or: python benchmarks/gpu_check.py --max-steps 20
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def skip(part: str, why: str) -> None:
    print(f"SKIP {part}: {why}", flush=True)


def run(cmd: list[str], timeout_s: float, env: dict[str, str] | None = None) -> tuple[int, str]:
    """A child command's exit code and output (killed at the timeout: a hang fails the part)."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired as exc:
        return 124, f"{exc.stdout or ''}{exc.stderr or ''}\ntimed out after {timeout_s:.0f} s"
    return done.returncode, done.stdout + done.stderr


def figures(out: str, pattern: str) -> list[str]:
    return [line for line in out.splitlines() if re.search(pattern, line)]


def capture_part(args: argparse.Namespace) -> bool:
    print("== 1/3 HF capture on CUDA, bf16, against the bare forward", flush=True)
    code, out = run([sys.executable, str(HERE / "bench_generator.py"), "--shape", "small", "--prompts", "32",
                     "--tokens", "256", "--rounds", "2", "--device", "cuda", "--dtype", "bfloat16"], 300)  # fmt: skip
    print("\n".join(figures(out, r"^\[|tokens/s|forward|pipelined|sequential|generator / bare")) or out[-3000:])
    return code == 0


def trainer_part(args: argparse.Namespace, work: Path) -> bool:
    print("== 2/3 trainer, bf16 autocast, 1 rank, NCCL under torchrun", flush=True)
    import yaml  # lazy: only this part writes a config

    from pipeline.app.quickstart import quickstart_config  # lazy: builds the tiny target (cached)
    from pipeline.transport.broker import LocalKafka

    with LocalKafka(work / "broker") as broker:
        config = quickstart_config(work / "run", conversations=args.conversations, bootstrap=broker.bootstrap,
                                   max_steps=args.max_steps)  # fmt: skip
        raw = config.model_dump(mode="json")
        cuda = not args.trainer_on_cpu
        raw["target"].update(device="cuda" if cuda else "cpu", dtype="bfloat16" if cuda else "float32")
        raw["train"].update(device="cuda" if cuda else "cpu", bf16=cuda, world_size=1)
        path = work / "gpu.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        specstream = str(Path(sys.executable).with_name("specstream"))
        code, out = run([specstream, "source", "--config", str(path)], 120)
        if code:
            print(out[-3000:])
            return False
        generator = subprocess.Popen([specstream, "generate", "--config", str(path)],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        try:
            started = time.perf_counter()
            code, out = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                             "--no-python", specstream, "train", "--config", str(path)], 300,
                            env={"NCCL_DEBUG": "WARN"})  # fmt: skip
            wall = time.perf_counter() - started
        finally:
            generator.terminate()
            generator.wait(timeout=60)
    print("\n".join(figures(out, r"^training: |optimizer steps|prompts trained|NCCL|Error")) or out[-3000:])
    print(f"trainer wall time under torchrun: {wall:.1f} s (exit {code})")
    return code == 0


def pinned_part(args: argparse.Namespace, work: Path) -> bool:
    print("== 3/3 data plane into pinned host buffers", flush=True)
    from pipeline.core.messages import SampleRef, TargetInfo, now  # lazy: start-up
    from pipeline.storage import FeatureStore

    store = FeatureStore(str(work / "features"), "gpu-check")
    target = TargetInfo(model_id="shape", revision="gpu-check", num_layers=32, aux_layer_ids=[1, 15, 28],
                        hidden_size=args.hidden, vocab_size=128256, dtype="bfloat16")  # fmt: skip
    g = torch.Generator().manual_seed(0)
    shape = {"aux_hidden_states": (args.tokens, 3 * args.hidden), "hidden_states": (args.tokens, args.hidden)}
    refs = []
    for i in range(args.samples):
        stored = store.put(0, f"s{i}", {k: torch.randn(s, generator=g).to(torch.bfloat16) for k, s in shape.items()})
        refs.append(SampleRef(run_id="gpu-check", sample_id=f"s{i}", prompt_id=f"p{i}", producer_id="gpu-check",
                              uri=stored.uri, nbytes=stored.nbytes, checksum=stored.checksum, num_tokens=args.tokens,
                              tensors=stored.tensors, target=target, created_at=now(), seq=i))  # fmt: skip
    pinned = {k: torch.empty(s, dtype=torch.bfloat16).pin_memory() for k, s in shape.items()}
    device = {k: torch.empty(s, dtype=torch.bfloat16, device="cuda") for k, s in shape.items()}
    rates: dict[str, list[float]] = {"pageable": [], "pinned": []}
    for _ in range(args.repeats):  # alternated, so drift hits both
        for kind in rates:
            torch.cuda.synchronize()
            started, nbytes = time.perf_counter(), 0
            for ref in refs:
                tensors = store.get(ref)
                for k, t in tensors.items():
                    src = t
                    if kind == "pinned":
                        pinned[k].copy_(t)
                        src = pinned[k]
                    device[k].copy_(src, non_blocking=kind == "pinned")
                    nbytes += t.numel() * t.element_size()
                torch.cuda.synchronize()  # the pinned buffer is reused: the copy must be done
            rates[kind].append(nbytes / (time.perf_counter() - started) / 1e9)
    for kind, values in rates.items():
        print(f"get + verify + H2D ({kind:8s}): GB/s min {min(values):.2f} median {statistics.median(values):.2f} "
              f"max {max(values):.2f} over {args.repeats}")  # fmt: skip
    code, out = run([sys.executable, str(HERE / "bench_data_wait.py"), "--device", "cuda", "--samples", "160"], 300)
    print("\n".join(figures(out, r"%|wait|fetch|step")) or out[-3000:])
    return code == 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-steps", type=int, default=20)
    ap.add_argument("--conversations", type=int, default=192)
    ap.add_argument("--samples", type=int, default=8, help="data-plane samples")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=4096, help="4096: the Llama-3.1-8B shape")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--trainer-on-cpu", action="store_true",
                    help="run part 2 alone on CPU (gloo, float32): checks this script where no GPU is lent")
    args = ap.parse_args()
    if args.trainer_on_cpu:
        work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
        try:
            return 0 if trainer_part(args, work) else 1
        finally:
            shutil.rmtree(work, ignore_errors=True)
    if not torch.cuda.is_available():
        why = f"no CUDA device (torch {torch.__version__}, torch.cuda.is_available() is False)"
        for part in ("1/3 HF capture on CUDA bf16", "2/3 trainer bf16 autocast + NCCL under torchrun",
                     "3/3 data plane into pinned host buffers"):  # fmt: skip
            skip(part, why)
        print("gpu check: 0 of 3 parts ran (no GPU); nothing failed")
        return 0
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    results = {}
    try:
        for name, part in (("capture", capture_part), ("trainer", trainer_part), ("pinned", pinned_part)):
            started = time.perf_counter()
            try:
                ok = part(args) if name == "capture" else part(args, work)
            except Exception as exc:  # noqa: BLE001 - one part failing must not hide the others' figures
                print(f"{name}: {type(exc).__name__}: {exc}")
                ok = False
            results[name] = ok
            print(f"-- {name}: {'ok' if ok else 'FAILED'} in {time.perf_counter() - started:.0f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"gpu check: {sum(results.values())} of 3 parts passed")
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
