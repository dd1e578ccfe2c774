"""Scale by simulation: the real stages as real processes on a real broker, synthetic target.

Each grid point is one run: ``specstream source`` (to its end), then G generator processes
(``specstream generate --worker-id gK``; or G processes of T worker threads each, the same
``configured_generator`` code in threads, where the machine cannot hold G x T processes) and
``specstream train`` (under torchrun with gloo for R > 1 ranks), all started together. Payloads
are tiny (synthetic hidden 64, conversations of at most 64 tokens): what is measured is the
control plane (broker, group coordinator, transactions, flow control, process start-up), not
the data plane. Each point reports:

- completion: the trainer's ``N of N prompts trained, 0 missing`` line, its end of stream
  (``(end_of_stream)``) and ``specstream audit --json`` ok;
- time to the first optimizer step (from starting the generators and trainer), end-to-end and
  steady (the middle 80 % of steps) samples/s, and samples/s and the trainer's data wait in
  each tenth of the steps (a line under the row: whether a long run slows as it goes, and on
  which side), and the cores and CPU ms per sample of the trainer ranks, the generators and the
  broker in each tenth, with the kernel's share, and the rest of the machine (lines under that);
- broker CPU seconds and peak RSS over the run (``/proc`` of the JVM this benchmark owns), the
  run's bytes in the broker's log directory; peak RSS of each generator and trainer process;
- optionally (``--event join|kill``) the consumer-group rebalance when a generator joins or is
  SIGKILLed after the first step: seconds until the group is Stable again with every member,
  and until the committed samples (the LSO, what the trainer can read) grow again.

    python benchmarks/bench_scale.py --grid small            # one CI-sized point
    python benchmarks/bench_scale.py --grid full --json scale.json
    python benchmarks/bench_scale.py --grid growth          # the cost per sample at 1k, 10k, 100k
    python benchmarks/bench_scale.py --point 64,4x1,2,1024   # partitions,GxT,ranks,samples

Every temp directory and the throwaway broker are removed at exit (``--keep`` keeps the directory).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from _procs import CPU_PARTS, KERNEL_PARTS, CpuSeries, Sampler, cpu_seconds, rss  # benchmarks/, beside this file



@dataclass(frozen=True)
class Point:
    """One run of the grid: its shape and its size."""

    partitions: int
    generators: int  # processes
    threads: int  # worker threads per generator process (1: plain `specstream generate`)
    ranks: int
    samples: int
    event: str = ""  # "", "join" or "kill"

    @property
    def label(self) -> str:
        gens = f"{self.generators}x{self.threads}" if self.threads > 1 else f"{self.generators}"
        return f"p{self.partitions} g{gens} r{self.ranks} n{self.samples}{' ' + self.event if self.event else ''}"


def parse_point(text: str) -> Point:
    """``partitions,G[xT],ranks,samples[,event]``."""
    parts = text.split(",")
    gens, _, threads = parts[1].partition("x")
    return Point(
        int(parts[0]), int(gens), int(threads or 1), int(parts[2]), int(parts[3]), *(parts[4:5] or [""])
    )


GRIDS: dict[str, list[str]] = {
    "small": ["4,1,1,64"],
    # the grid first (small to large), then the rebalance points, then the cost growth to 10k;
    # ``growth`` takes it to 100k samples (about 15 minutes for that point on a 2-core machine)
    "full": [
        "4,1,1,512", "16,4,2,1024", "64,4,2,1024", "64,16,2,1024", "64,4x4,4,2048", "256,16,8,2048",
        "256,16x4,8,4096", "16,2,1,1024,join", "16,2,1,1024,kill", "4,2,1,1000", "4,2,1,10000",
    ],
    "growth": ["4,2,1,1000", "4,2,1,10000", "4,2,1,100000"],
}  # fmt: skip


# --- the run's stages --------------------------------------------------------------------------


def specstream() -> str:
    """The console script beside this interpreter (the venv the package is installed in)."""
    beside = Path(sys.executable).with_name("specstream")
    return str(beside) if beside.exists() else shutil.which("specstream") or "specstream"


_SCRATCH: list[Path] = []  # the grid's scratch directory, once made


def _env() -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    # torch's compile cache would otherwise stay behind in TMPDIR
    cache = {"TORCHINDUCTOR_CACHE_DIR": str(_SCRATCH[0] / "inductor")} if _SCRATCH else {}
    return {**keep, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **cache}


def _spawn(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)


def generator_cmd(config: Path, first: int, threads: int) -> list[str]:
    if threads == 1:  # --verbose: the assignment lines count the group's rebalances
        return [specstream(), "generate", "--config", str(config), "--worker-id", f"g{first}", "--verbose"]
    ids = ",".join(f"g{first + t}" for t in range(threads))
    return [sys.executable, str(Path(__file__).resolve()), "--generator-threads", str(config), ids]


def trainer_cmd(config: Path, ranks: int) -> list[str]:
    cmd = [specstream(), "train", "--config", str(config)]
    if ranks == 1:
        return cmd
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
            "--no-python", *cmd]  # fmt: skip


def run_generator_threads(config: str, ids: str) -> None:
    """One generator process of several worker threads (``--generator-threads``): each thread
    is the worker ``specstream generate --worker-id ID`` would run."""
    from pipeline.app.config_file import load_config  # lazy: start-up, only in the generator process
    from pipeline.app.generate_job import configured_generator  # lazy: as above

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg, stop = load_config(Path(config)), threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stats: dict[str, int] = {}

    def one(worker_id: str) -> None:
        stats[worker_id] = configured_generator(cfg, worker_id, None, stop).run(stop).refs

    threads = [threading.Thread(target=one, args=(w,)) for w in ids.split(",")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(f"generator threads {ids}: {sum(stats.values())} samples")


def write_run(workdir: Path, bootstrap: str, point: Point, target: Path) -> Path:
    from pipeline.devkit.chats import markov_conversations, write_jsonl  # lazy: start-up

    data = workdir / "data.jsonl"
    write_jsonl(markov_conversations(point.samples, seed=1), str(data))
    batch = 8
    high = max(256, 2 * batch * point.partitions)  # per-partition share >= 2 batches (issue 13 item 4)
    raw = {
        "run_id": f"scale-{uuid.uuid4().hex[:8]}",
        "broker": {"bootstrap_servers": bootstrap, "transaction_timeout_ms": 15000, "session_timeout_ms": 6000},
        "storage": {"root": str(workdir / "features"), "retention": "retain"},
        "data": {"path": str(data), "max_length": 64, "partitions": point.partitions},
        "target": {"backend": "synthetic", "model": str(target), "aux_layer_ids": [0, 1, 2], "batch_size": batch},
        "generate": {"high_watermark": high, "low_watermark": high * 3 // 4},
        "train": {"device": "cpu", "world_size": point.ranks, "batch_size": 2, "lr": 3e-3, "lr_schedule": "constant",
                  "ttt_steps": 2, "draft_vocab_size": 128, "save_interval": 0, "prefetch": 2, "report_to": [],
                  "idle_timeout_s": 300, "collective_timeout_s": 600, "output_dir": str(workdir / "out")},
    }  # fmt: skip
    path = workdir / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


# --- one point ---------------------------------------------------------------------------------


@dataclass
class Result:
    point: str
    completed: bool = False
    trained: str = ""  # the summary's "N of N prompts trained, M missing"
    eos: bool = False
    audit_ok: bool = False
    source_s: float = 0.0
    first_step_s: float | None = None
    wall_s: float = 0.0
    e2e_per_s: float = 0.0
    steady_per_s: float | None = None
    tenths_per_s: list[float] = field(default_factory=list)  # samples/s in each tenth of the steps
    tenths_wait_pct: list[float] = field(default_factory=list)  # the trainer's data wait in each tenth
    tenths_cores: dict[str, list[float]] = field(default_factory=dict)  # cores used per part, per tenth
    tenths_cpu_ms: dict[str, list[float]] = field(default_factory=dict)  # CPU ms per sample, per tenth
    per_sample_ms: float = 0.0
    broker_cpu_s: float = 0.0
    broker_rss_mb: float = 0.0
    broker_log_mb: float = 0.0
    broker_fds: int = 0
    generator_rss_mb: float = 0.0  # peak of one process
    generator_uss_mb: float = 0.0  # peak of one process
    generators_pss_mb: float = 0.0  # peak of all generator processes together
    trainer_rss_mb: float = 0.0  # peak of one rank
    trainer_uss_mb: float = 0.0
    trainers_pss_mb: float = 0.0  # all ranks together
    rebalance: dict[str, float] = field(default_factory=dict)
    load: float = 0.0  # the machine's 1-minute load average at the point's end (2 cores)
    assignments: int = 0  # the most partition assignments one generator worker went through
    error: str = ""


def _wait(proc: subprocess.Popen[bytes], deadline: float) -> int | None:
    try:
        return proc.wait(max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        return None


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(30)


def _keep_logs(workdir: Path, point: Point) -> Path:
    """Copy a failed point's process logs out of the scratch directory (removed at exit): a
    torchrun failure's tail names only the rank, the cause is in the log above it."""
    kept = Path(tempfile.mkdtemp(prefix=f"bench-scale-failed-{point.label.replace(' ', '_')}-"))
    for log in workdir.glob("*.log"):
        shutil.copy2(log, kept / log.name)
    return kept


def _tail(log: Path, lines: int = 12) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _steps(out: Path) -> list[dict[str, Any]]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def tenth_spans(steps: list[dict[str, Any]]) -> list[tuple[float, float, int]]:
    """(start, end, samples) of each tenth of the steps: from the step before the tenth's first
    to its last, so the spans tile the run (empty under 20 steps)."""
    if len(steps) < 20:
        return []
    bounds = [len(steps) * k // 10 for k in range(11)]
    spans = []
    for a, b in zip(bounds, bounds[1:]):
        lo = max(a - 1, 0)
        spans.append((steps[lo]["time"], steps[b - 1]["time"], sum(s["samples"] for s in steps[lo + 1 : b])))
    return spans


def tenths(steps: list[dict[str, Any]]) -> tuple[list[float], list[float]]:
    """Samples/s and the data wait (% of step time) over each tenth of the steps, so a rate that
    drifts over a long run shows where, and on which side: a trainer waiting for data means the
    generators or the broker slowed (both empty under 20 steps)."""
    if len(steps) < 20:
        return [], []
    bounds = [len(steps) * k // 10 for k in range(11)]
    rates = [n / (end - start) if end > start else 0.0 for start, end, n in tenth_spans(steps)]
    waits = []
    for a, b in zip(bounds, bounds[1:]):
        busy = sum(s.get("step_s", 0.0) for s in steps[a:b])
        waited = sum(s.get("step_s", 0.0) * s.get("data_wait_frac", 0.0) for s in steps[a:b])
        waits.append(100 * waited / busy if busy > 0 else 0.0)
    return rates, waits


def tenths_cpu(steps: list[dict[str, Any]], series: CpuSeries) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Cores each part of the machine used in each tenth of the steps (``CPU_PARTS``: the trainer
    ranks, the generator processes, the broker, everything else busy, iowait, steal) and the CPU
    milliseconds per trained sample of the first three, and of that the kernel's (``KERNEL_PARTS``):
    a process whose ms per sample grows does more work per sample; one whose cores shrink at the
    same ms per sample got less machine."""
    cores: dict[str, list[float]] = {k: [] for k in CPU_PARTS}
    per_sample: dict[str, list[float]] = {k: [] for k in ("trainer", "generator", "broker", *KERNEL_PARTS)}
    for start, end, samples in tenth_spans(steps):
        used = series.cores(start, end)
        for k in CPU_PARTS:
            cores[k].append(used[k])
        for k in per_sample:
            per_sample[k].append(1000 * used[k] * (end - start) / samples if samples else 0.0)
    return cores, per_sample


def _assignments(workdir: Path) -> int:
    """The most rebalances one worker went through: its ``partitions [...] assigned`` lines."""
    counts: dict[str, int] = {}
    for log in workdir.glob("gen*.log"):
        for worker in re.findall(r"(\S+): partitions \[[^\]]*\] assigned", log.read_text(errors="replace")):
            counts[worker] = counts.get(worker, 0) + 1
    return max(counts.values(), default=0)


def _log_bytes(broker_data: Path | None, run_id: str) -> int:
    if broker_data is None or not broker_data.is_dir():
        return 0
    total = 0
    for topic_dir in broker_data.iterdir():
        if topic_dir.name.startswith(run_id):
            total += sum(
                f.stat().st_blocks * 512 for f in topic_dir.rglob("*") if f.is_file()
            )  # on disk: indexes are sparse
    return total


def run_point(point: Point, bootstrap: str, broker_pid: int | None, broker_data: Path | None, scratch: Path,
              target: Path, timeout_s: float) -> Result:  # fmt: skip
    """One run of ``point``; every process it started is gone when it returns."""
    result = Result(point.label)
    workdir = Path(tempfile.mkdtemp(prefix="point-", dir=scratch))
    config = write_run(workdir, bootstrap, point, target)
    run_id = yaml.safe_load(config.read_text())["run_id"]
    deadline = time.monotonic() + timeout_s
    procs: list[subprocess.Popen[bytes]] = []
    broker_cpu0 = cpu_seconds(broker_pid) if broker_pid else 0.0
    try:
        started = time.monotonic()
        source = _spawn([specstream(), "source", "--config", str(config)], workdir / "source.log")
        procs.append(source)
        if _wait(source, deadline) != 0:
            raise RuntimeError(f"source failed or timed out:\n{_tail(workdir / 'source.log')}")
        result.source_s = time.monotonic() - started
        with Sampler(broker_pid) as sampler:
            t0, wall0 = time.monotonic(), time.time()
            first = 1 if point.event == "join" else point.generators
            gens = [_spawn(generator_cmd(config, g * point.threads, point.threads), workdir / f"gen{g}.log")
                    for g in range(first)]  # fmt: skip
            trainer = _spawn(trainer_cmd(config, point.ranks), workdir / "train.log")
            procs += [*gens, trainer]
            sampler.roles["generator"] += [g.pid for g in gens]
            sampler.roles["trainer"].append(trainer.pid)
            if point.event:
                result.rebalance = observe_event(point, config, run_id, bootstrap, workdir, gens, procs, sampler,
                                                 deadline)  # fmt: skip
            code = _wait(trainer, deadline)
            end = time.monotonic()
            for g in gens:
                _wait(g, min(deadline, time.monotonic() + 120))
        text = (workdir / "train.log").read_text(errors="replace")
        if code != 0:
            raise RuntimeError(f"trainer exited {code}:\n{_tail(workdir / 'train.log')}")
        line = next((ln for ln in text.splitlines() if " prompts trained, " in ln), "")
        result.trained = (
            line[line.find(str(point.samples)) :].split(", 0 duplicates")[0].strip() if line else ""
        )
        result.eos = "(end_of_stream)" in text
        audit = subprocess.run([specstream(), "audit", "--config", str(config), "--json"], check=False,
                               capture_output=True, text=True, env=_env(), timeout=max(30.0, deadline - time.monotonic()))  # fmt: skip
        report = json.loads(audit.stdout[audit.stdout.index("{") :]) if "{" in audit.stdout else {}
        totals = report.get("totals", {})
        result.audit_ok = (
            audit.returncode == 0 and bool(report.get("ok")) and totals.get("trained_once") == point.samples
        )
        result.completed = result.trained == f"{point.samples} of {point.samples} prompts trained, 0 missing"
        result.completed = result.completed and result.eos and result.audit_ok
        result.wall_s = end - t0
        result.e2e_per_s = point.samples / result.wall_s
        result.per_sample_ms = 1000 * result.wall_s / point.samples
        steps = _steps(workdir / "out")
        if steps:
            result.first_step_s = steps[0]["time"] - wall0
            lo, hi = len(steps) // 10, max(len(steps) * 9 // 10 - 1, 0)
            if hi > lo and steps[hi]["time"] > steps[lo]["time"]:
                samples = sum(s["samples"] for s in steps[lo + 1 : hi + 1])
                result.steady_per_s = samples / (steps[hi]["time"] - steps[lo]["time"])
            result.tenths_per_s, result.tenths_wait_pct = tenths(steps)
            result.tenths_cores, result.tenths_cpu_ms = tenths_cpu(steps, sampler.cpu)
        mb = 1 / 2**20
        result.broker_rss_mb = sampler.peak["broker"] * mb
        result.generator_rss_mb = sampler.peak["generator_rss"] * mb
        result.generator_uss_mb = sampler.peak["generator_uss"] * mb
        result.generators_pss_mb = sampler.peak["generator_pss_all"] * mb
        result.trainer_rss_mb = sampler.peak["trainer_rss"] * mb
        result.trainer_uss_mb = sampler.peak["trainer_uss"] * mb
        result.trainers_pss_mb = sampler.peak["trainer_pss_all"] * mb
        result.broker_fds = sampler.peak["broker_fds"]
        result.assignments = _assignments(workdir)
        result.broker_log_mb = _log_bytes(broker_data, run_id) * mb
    except Exception as exc:  # noqa: BLE001 - one point's failure is its row, not the end of the grid
        result.error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        kept = _keep_logs(workdir, point)
        result.error += f" (its logs: {kept})"
        (kept / "failure.txt").write_text(f"{exc}\n")
    finally:
        for proc in procs:
            _kill_group(proc)
        result.broker_cpu_s = (cpu_seconds(broker_pid) - broker_cpu0) if broker_pid else 0.0
        result.load = os.getloadavg()[0]
        shutil.rmtree(workdir, ignore_errors=True)
    return result


# --- a generator joins or dies mid-run ---------------------------------------------------------


def _assigned(assignment: Any) -> list[int]:
    """Partition numbers in a decoded member assignment, whatever its nesting."""
    if isinstance(assignment, dict):
        if "partitions" in assignment and isinstance(assignment["partitions"], list):
            return [int(p) for p in assignment["partitions"]]
        return [p for v in assignment.values() for p in _assigned(v)]
    if isinstance(assignment, (list, tuple)):
        if assignment and all(isinstance(p, int) for p in assignment):
            return list(assignment)
        return [p for v in assignment for p in _assigned(v)]
    return (
        [p for v in vars(assignment).values() for p in _assigned(v)]
        if hasattr(assignment, "__dict__")
        else []
    )


def _group(admin: Any, group_id: str) -> tuple[str, dict[str, list[int]]]:
    """The group's state and each member's assigned prompt partitions (by client id)."""
    try:
        group = admin.describe_groups([group_id])[group_id]
    except Exception:  # noqa: BLE001 - a coordinator moving or loading: ask again
        return "unknown", {}
    members = {str(m.get("client_id") or m.get("member_id")): _assigned(m.get("member_assignment"))
               for m in group.get("members", [])}  # fmt: skip
    return str(group.get("group_state")), members


def _lso(admin: Any, topic: str, partitions: list[int]) -> int:
    return sum(admin.end_offsets(topic, partitions).values())


def observe_event(point: Point, config: Path, run_id: str, bootstrap: str, workdir: Path,
                  gens: list[subprocess.Popen[bytes]], procs: list[subprocess.Popen[bytes]], sampler: Sampler,
                  deadline: float) -> dict[str, float]:  # fmt: skip
    """After the first step: a generator joins (``join``) or one is SIGKILLed (``kill``). Seconds
    from the event until the group is Stable with every live member and every partition
    assigned (``owned``), and until the committed samples grow again on the partitions that
    moved (``resumed``: the LSO, what the trainer reads)."""
    from kafka.admin import KafkaAdminClient  # lazy: start-up, only the event points

    from pipeline.core.topics import RunTopics  # lazy: start-up
    from pipeline.transport.kafka import KafkaSettings  # lazy: start-up

    topics = RunTopics(run_id)
    group = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin = KafkaSettings(bootstrap_servers=bootstrap).admin()
    try:
        while not _steps(workdir / "out"):
            if time.monotonic() > deadline or procs[-1].poll() is not None:
                raise RuntimeError("no first step before the event")
            time.sleep(0.2)  # polling the trainer's metrics file, bounded by the deadline
        _, before = _group(group, topics.generator_group)
        if point.event == "join":
            extra = _spawn(generator_cmd(config, 100, point.threads), workdir / "gen-join.log")
            procs.insert(0, extra)
            sampler.roles["generator"].append(extra.pid)
            expected, moved = point.threads * 2, list(range(point.partitions))
        else:
            victim = gens[0]
            ids = {f".generate.g{t}" for t in range(point.threads)}  # client id: <run>.generate.<worker id>
            moved = sorted(p for m, parts in before.items() if any(m.endswith(i) for i in ids) for p in parts)
            os.killpg(victim.pid, signal.SIGKILL)
            expected = point.threads * (point.generators - 1)
        event = time.monotonic()
        moved = moved or list(range(point.partitions))
        figures: dict[str, float] = {}
        while "owned" not in figures:
            state, members = _group(group, topics.generator_group)
            owned = sorted(p for parts in members.values() for p in parts)
            if state == "Stable" and len(members) == expected and owned == list(range(point.partitions)):
                figures["owned"] = time.monotonic() - event
            elif time.monotonic() > deadline or procs[-1].poll() is not None:
                raise RuntimeError(f"group not stable with {expected} members: {state} {members}")
            time.sleep(0.1)  # polling the coordinator's view, bounded by the deadline
        base = _lso(admin, topics.samples, moved)
        while _lso(admin, topics.samples, moved) <= base:
            if time.monotonic() > deadline or procs[-1].poll() is not None:
                return figures  # the run ended first: nothing left to produce on them
            time.sleep(0.1)  # polling the committed offsets, bounded by the deadline
        figures["resumed"] = time.monotonic() - event
        return figures
    finally:
        group.close()
        admin.close()


# --- the grid ------------------------------------------------------------------------------------

HEADER = ("point", "done", "trained", "first step s", "wall s", "e2e /s", "steady /s", "ms/sample",
          "broker cpu s", "broker rss MB", "broker log MB", "broker fds",
          "gen MB rss/uss (pss all)", "rank MB rss/uss (pss all)", "assignments", "load", "rebalance")  # fmt: skip


def row(r: Result) -> tuple[str, ...]:
    def f(v: float | None, p: int = 1) -> str:
        return "-" if v is None else f"{v:.{p}f}"

    rebalance = " ".join(f"{k} {v:.1f}s" for k, v in r.rebalance.items()) or "-"
    done = "yes" if r.completed else f"NO {r.error[:60]}".strip()
    trained = r.trained.replace(" prompts trained", "") or "-"
    gens = f"{f(r.generator_rss_mb, 0)}/{f(r.generator_uss_mb, 0)} ({f(r.generators_pss_mb, 0)})"
    ranks = f"{f(r.trainer_rss_mb, 0)}/{f(r.trainer_uss_mb, 0)} ({f(r.trainers_pss_mb, 0)})"
    return (r.point, done, trained, f(r.first_step_s), f(r.wall_s), f(r.e2e_per_s), f(r.steady_per_s),
            f(r.per_sample_ms, 2), f(r.broker_cpu_s), f(r.broker_rss_mb, 0), f(r.broker_log_mb, 2), str(r.broker_fds),
            gens, ranks, str(r.assignments), f(r.load), rebalance)  # fmt: skip


def print_row(cells: tuple[str, ...]) -> None:
    print("| " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--grid", choices=sorted(GRIDS), default="small")
    parser.add_argument(
        "--point", action="append", default=[], help="partitions,G[xT],ranks,samples[,join|kill]"
    )
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per point")
    parser.add_argument("--json", type=Path, help="write every point's figures here")
    parser.add_argument("--heap-mb", type=int, default=512, help="the throwaway broker's JVM heap")
    parser.add_argument(
        "--keep", action="store_true", help="keep the scratch directory (the broker is stopped)"
    )
    parser.add_argument("--generator-threads", nargs=2, metavar=("CONFIG", "IDS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generator_threads:
        run_generator_threads(*args.generator_threads)
        return
    results = run_grid([parse_point(p) for p in args.point or GRIDS[args.grid]], args)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    sys.exit(0 if all(r.completed for r in results) else 1)


def run_grid(points: list[Point], args: argparse.Namespace) -> list[Result]:
    from pipeline.devkit.target import build_tiny_target  # lazy: start-up
    from pipeline.transport.broker import LocalKafka  # lazy: start-up

    target = build_tiny_target()
    scratch = Path(tempfile.mkdtemp(prefix="specstream-scale-"))
    _SCRATCH[:] = [scratch]
    results: list[Result] = []
    local = None
    try:
        if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):  # a broker of the user's: no pid, no log dir
            bootstrap, pid, data = os.environ["KAFKA_BOOTSTRAP_SERVERS"], None, None
        else:
            local = LocalKafka(scratch / "broker", heap_mb=args.heap_mb)
            bootstrap = local.start()
            pid, data = (local.proc.pid if local.proc else None), scratch / "broker" / "data"
        print(
            f"broker {bootstrap} (pid {pid}); {os.cpu_count()} CPUs; load {os.getloadavg()[0]:.2f}",
            flush=True,
        )
        print_row(HEADER)
        print_row(tuple("---" for _ in HEADER))
        for point in points:
            result = run_point(point, bootstrap, pid, data, scratch, target, args.timeout)
            results.append(result)
            print_row(row(result))
            if result.tenths_per_s:
                print(f"  {point.label}: per tenth of the steps, samples/s "
                      + " ".join(f"{v:.0f}" for v in result.tenths_per_s) + "; data wait % "
                      + " ".join(f"{v:.0f}" for v in result.tenths_wait_pct), flush=True)  # fmt: skip
                for part, values in result.tenths_cores.items():
                    ms, kernel = result.tenths_cpu_ms.get(part), result.tenths_cpu_ms.get(f"{part}_kernel")
                    print(f"    {part}: cores " + " ".join(f"{v:.2f}" for v in values)
                          + ("; CPU ms/sample " + " ".join(f"{v:.2f}" for v in ms) if ms else "")
                          + ("; of it the kernel's " + " ".join(f"{v:.2f}" for v in kernel) if kernel else ""),
                          flush=True)  # fmt: skip
            if result.error:
                print(f"  {point.label}: {result.error}", flush=True)
        held = rss(pid) / 2**20 if pid else 0.0
        print(f"broker at the end: RSS {held:.0f} MB, log dir {_dir_mb(data):.1f} MB", flush=True)
    finally:
        if local is not None:
            local.stop()
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    return results


def _dir_mb(path: Path | None) -> float:
    if path is None or not path.is_dir():
        return 0.0
    return sum(f.stat().st_blocks * 512 for f in path.rglob("*") if f.is_file()) / 2**20


if __name__ == "__main__":
    main()
