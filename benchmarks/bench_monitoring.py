"""Monitoring overhead: the quickstart's run with heartbeats, trackers, metrics and evaluation on,
against the same run with all of them off, side by side.

Each repeat runs the two variants back to back, in alternating order, on the same broker, tiny
target and conversations (a fresh run id each time, so each trains from scratch):

- ``on``: heartbeats every ``--heartbeat-s`` (default 5 s, the config's default), TensorBoard,
  the Prometheus exporter scraped every ``--scrape-s`` (default 5 s) by a client thread, and a
  held-out eval set of ``--eval-conversations`` (default 1 % of the training conversations)
  evaluated every ``--eval-interval`` steps (default 50): evaluation is work, its cost grows with
  the set and the frequency;
- ``off``: ``monitor.heartbeat_interval_s: null``, ``train.report_to: []``, no exporter, no eval set.

``--parts`` switches only some of them (e.g. ``--parts eval`` measures evaluation alone). One
discarded run of each variant first pays the process's warm-up (imports, first model loads), which
would otherwise be charged to whichever variant runs first.

The figure is the wall time of ``OnlineRun.run`` (source, generation and training interleaved,
export), reported per side and as the ratio on/off paired within a repeat, min/median/max over
the repeats, with the machine's load at the start and the end: the goal is <= 1.02.
Broker start and the tiny target's build are outside it (cached, the same for both).

    python benchmarks/bench_monitoring.py --repeats 3
"""

from __future__ import annotations

import argparse
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _stats import alternate, print_ratios, print_spread, scratch, session  # benchmarks/, beside this file

from pipeline.app.config import RunConfig
from pipeline.app.metrics import LiveProcess
from pipeline.app.metrics_server import serve_metrics
from pipeline.app.quickstart import quickstart_config
from pipeline.app.runtime import build_online_run
from pipeline.app.settings import kafka_settings
from pipeline.devkit.chats import markov_conversations, write_jsonl
from pipeline.transport.broker import env_or_local_broker as broker

PARTS = ("heartbeats", "trackers", "metrics", "eval")


def variant(base: RunConfig, work: Path, *, on: bool, args: argparse.Namespace) -> RunConfig:
    """The quickstart's config with the chosen parts on or off, under a fresh run id and output dir."""
    raw: dict[str, Any] = base.model_dump(mode="json")
    name = f"bench-mon-{'on' if on else 'off'}-{uuid.uuid4().hex[:6]}"
    raw["run_id"] = name
    raw["storage"]["root"] = str(work / name / "features")
    raw["train"]["output_dir"] = str(work / name / "out")
    raw["monitor"] = {"heartbeat_interval_s": args.heartbeat_s if on and "heartbeats" in args.parts else None}
    raw["train"]["report_to"] = ["tensorboard"] if on and "trackers" in args.parts else []
    raw["data"]["eval_path"] = str(work / "eval.jsonl") if on and "eval" in args.parts else None
    raw["train"]["eval_interval"] = args.eval_interval
    return RunConfig.model_validate(raw)


def scrape_until(url: str, every_s: float, stop: threading.Event) -> int:
    """Scrape ``url`` every ``every_s`` until ``stop``, as Prometheus would; returns the count."""
    count = 0
    while not stop.wait(every_s):
        with urllib.request.urlopen(url, timeout=5) as response:
            response.read()
        count += 1
    return count


def run_once(config: RunConfig, bootstrap: str, *, on: bool, scrape_s: float) -> tuple[float, int]:
    """One run's wall time (``OnlineRun.run``) and how many scrapes it served."""
    online = build_online_run(config, transport=kafka_settings(config, bootstrap))
    live = LiveProcess(config.run_id, online.transport)
    server = serve_metrics(live, 0, say=lambda _line: None) if on else None
    stop = threading.Event()
    scrapes: list[int] = []
    scraper = None
    if server is not None:
        url = server.url
        scraper = threading.Thread(target=lambda: scrapes.append(scrape_until(url, scrape_s, stop)))
        scraper.start()
    started = time.perf_counter()
    try:
        online.run(watch=live)
    finally:
        wall = time.perf_counter() - started
        stop.set()
        if scraper is not None:
            scraper.join(timeout=30)
        if server is not None:
            server.close()
    return wall, sum(scrapes)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--conversations", type=int, default=768)
    parser.add_argument("--heartbeat-s", type=float, default=5.0)
    parser.add_argument("--scrape-s", type=float, default=5.0)
    parser.add_argument(
        "--eval-conversations", type=int, default=None, help="default: 1%% of --conversations"
    )
    parser.add_argument("--eval-interval", type=int, default=50)
    parser.add_argument("--keep", action="store_true", help="keep the work directory (features, event files)")
    parser.add_argument(
        "--parts", nargs="+", default=list(PARTS), choices=PARTS, help="what 'on' switches on"
    )
    args = parser.parse_args()
    args.eval_conversations = args.eval_conversations or max(1, args.conversations // 100)

    with (
        session("bench_monitoring"),
        scratch("bench-monitoring-", keep=args.keep) as work,
        broker() as bootstrap,
    ):
        write_jsonl(markov_conversations(args.eval_conversations, seed=1), str(work / "eval.jsonl"))
        base = quickstart_config(work / "quickstart", conversations=args.conversations, bootstrap=bootstrap)

        def side(on: bool) -> Callable[[], dict[str, float]]:
            def run() -> dict[str, float]:
                wall, scrapes = run_once(variant(base, work, on=on, args=args), bootstrap,
                                         on=on and "metrics" in args.parts, scrape_s=args.scrape_s)  # fmt: skip
                return {"wall_s": wall, "scrapes": scrapes}

            return run

        # one discarded run of each first: the process's warm-up would be charged to whichever ran first
        results = alternate(
            {"off": side(False), "on": side(True)}, args.repeats, warmup=1, show="wall_s", fmt="{:.1f} s"
        )
        print(f"{'+'.join(args.parts)} on vs off, {args.conversations} conversations, {args.repeats} repeats")
        print_spread(results, "wall_s", label="wall time s", fmt="{:6.1f}")
        print_ratios(results, "off", "wall_s", label="wall time", goal="<= 1.02")


if __name__ == "__main__":
    main()
