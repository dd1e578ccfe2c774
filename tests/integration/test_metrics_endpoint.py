"""Prometheus metrics of a live run (issue 10, item 6): a generator and a trainer process, each
with ``--metrics-port``, are scraped over HTTP during the run; their counters and the per
partition lag are there and move. A port that is taken stops the command with one error line."""

from __future__ import annotations

import re
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pipeline.transport.broker import free_port
from tests.integration.test_runtime import write_config
from tests.support import one_error, spawn, wait_exit, wait_for_output

pytestmark = [pytest.mark.integration, pytest.mark.slow]

Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]


def scrape(port: int) -> Samples:
    """One scrape of ``/metrics``, parsed: metric sample name -> labels -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return found


def total(samples: Samples, name: str) -> float:
    return sum(samples.get(name, {}).values())



def served_port(proc: subprocess.Popen[str]) -> int:
    """The port of the process's one `metrics at http://host:port/metrics` line."""
    line = wait_for_output(proc, r"metrics at http://", timeout_s=120)[-1]
    match = re.search(r"metrics at http://[^:\s]+:(\d+)/metrics", line)
    assert match, line
    return int(match.group(1))


def test_generator_and_trainer_metrics_move_during_a_run(kafka, run_id, tmp_path, tiny_target_dir) -> None:
    path = write_config(tmp_path, kafka, run_id, tiny_target_dir, conversations=384,
                        generate={"high_watermark": 16, "low_watermark": 8})  # fmt: skip
    wanted = free_port()
    generator = spawn(["generate", "--config", str(path), "--worker-id", "gen-m", "--metrics-port", str(wanted)])
    trainer = spawn(["train", "--config", str(path), "--metrics-port", "0"])
    procs = [generator, trainer]
    try:
        assert served_port(generator) == wanted
        trainer_port = served_port(trainer)  # both serve before the source has started: before the work
        code, out = wait_exit(spawn(["source", "--config", str(path)]), timeout_s=120)
        assert code == 0, out

        # Both scraped together until each figure has been seen to move (the run is short).
        watched = {
            "generator": (wanted, generator, ["specstream_samples_produced_total",
                                              "specstream_transaction_commit_seconds_count",
                                              "specstream_feature_bytes_written_total",
                                              "specstream_partition_samples_produced"]),
            "trainer": (trainer_port, trainer, ["specstream_samples_trained_total", "specstream_trainer_step",
                                                "specstream_partition_samples_trained"]),
        }  # fmt: skip
        seen: dict[tuple[str, str], set[float]] = {}
        last: dict[str, Samples] = {}
        deadline = time.monotonic() + 240

        def moved(role: str, name: str) -> bool:
            return len(seen.get((role, name), set()) - {0.0}) >= 2

        while not all(moved(role, n) for role, (_, _, names) in watched.items() for n in names):
            assert time.monotonic() < deadline, f"not all figures moved: {seen}"
            for role, (port, proc, names) in watched.items():
                if all(moved(role, n) for n in names):
                    continue  # seen enough of it: it may finish its work now (a fast generator does)
                assert proc.poll() is None, f"{role} exited first: {proc.communicate()[0][-4000:]}"
                try:
                    last[role] = scrape(port)
                except OSError:  # the process ended during the scrape: say so, with its output
                    assert proc.poll() is None, f"{role} exited first: {proc.communicate()[0][-4000:]}"
                    raise
                for name in names:
                    seen.setdefault((role, name), set()).add(total(last[role], name))
            time.sleep(0.2)  # polling observable counters, not timing a race
        for role, samples in last.items():
            assert len(samples["specstream_consumer_lag"]) == 4, samples  # per partition, in both processes
        gen = last["generator"]
        assert "specstream_backpressure_paused" in gen and "specstream_backpressure_paused_seconds_total" in gen
        rank0 = last["trainer"]
        assert "specstream_trainer_step_seconds" in rank0 and "specstream_trainer_data_wait_ratio" in rank0
        for proc, limit in ((trainer, 300), (generator, 120)):  # serving did not hold up the run's end
            code, out = wait_exit(proc, timeout_s=limit)
            assert code == 0, out
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


def test_a_taken_metrics_port_is_one_config_error(kafka, run_id, tmp_path, tiny_target_dir) -> None:
    path = write_config(tmp_path, kafka, run_id, tiny_target_dir)
    with socket.socket() as holder:
        holder.bind(("0.0.0.0", 0))
        holder.listen()
        port = holder.getsockname()[1]
        code, out = wait_exit(spawn(["train", "--config", str(path), "--metrics-port", str(port)]), timeout_s=120)
    assert code == 2, out
    line = one_error(out)
    assert f"0.0.0.0:{port}" in line and "monitor.metrics_port" in line and "--metrics-port" in line, line
