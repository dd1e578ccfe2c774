"""The Prometheus collector over hand-filled stats (no broker, no server): each figure is the
stage's own counter, read at scrape time, and the run status behind the lag is cached."""

from __future__ import annotations

import socket
import threading
import time
import urllib.request
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pipeline.app.metrics import LiveProcess, RunCollector, StatusCache
from pipeline.app.metrics_server import metrics_port, serve_metrics
from pipeline.app.status import PartitionStatus, RunStatus
from pipeline.core.errors import ConfigError
from pipeline.core.progress import StreamState
from pipeline.generate.stats import GeneratorStats
from pipeline.train.metrics import StepRecord


def _samples(collector: RunCollector) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _record(step: int) -> StepRecord:
    return StepRecord(step=step, loss=1.0, ploss=[1.0], acc=[0.5], acceptance_rate=[0.5], acceptance_length=1.5,
                      lr=1e-3, samples=8, tokens=80, step_s=0.25, samples_per_s=32.0, tokens_per_s=320.0,
                      data_wait_frac=0.1, data_wait_frac_total=0.125, prepare_frac=0.0, grad_norm=1.0, time=0.0)  # fmt: skip


def _status(produced: int, consumed: int) -> RunStatus:
    parts = [PartitionStatus(p, produced, 0, False, consumed) for p in range(2)]
    return RunStatus("r1", parts, step=3, samples_per_s=None, dead_letters=4)


def _gen(worker_id: str, stats: GeneratorStats) -> SimpleNamespace:
    return SimpleNamespace(stats=stats, config=SimpleNamespace(worker_id=worker_id), transport=None)


def test_collector_reads_the_stages_own_counters_at_scrape_time() -> None:
    stats = GeneratorStats(batches=3, refs=24, dropped=2, commit_s=0.6, nbytes=4096, pauses=1, paused_s=2.0)
    trainer = SimpleNamespace(dist=SimpleNamespace(rank=0), trained_local=16, step=2, records=[_record(1), _record(2)],
                              state=StreamState(positions={}, partitions={}, cursor=0, dead_letters=1))  # fmt: skip
    live = LiveProcess("r1")
    live.watch_generator(_gen("g0", stats))  # type: ignore[arg-type]
    live.watch_trainer(trainer)  # type: ignore[arg-type]
    cache = StatusCache(lambda: _status(10, 4), every_s=3600)
    collector = RunCollector(live, status=cache)

    got = _samples(collector)
    gen = (("id", "g0"), ("role", "generator"), ("run", "r1"))
    rank0 = (("id", "rank-0"), ("role", "trainer"), ("run", "r1"))
    assert got[("specstream_samples_produced_total", gen)] == 24
    assert got[("specstream_samples_dead_lettered_total", gen)] == 2
    assert got[("specstream_samples_dead_lettered_total", rank0)] == 1
    assert got[("specstream_feature_bytes_written_total", gen)] == 4096
    assert got[("specstream_transaction_commit_seconds_count", gen)] == 3
    assert got[("specstream_transaction_commit_seconds_sum", gen)] == pytest.approx(0.6)
    assert got[("specstream_backpressure_paused", gen)] == 0
    assert got[("specstream_backpressure_paused_seconds_total", gen)] == 2.0
    assert got[("specstream_samples_trained_total", rank0)] == 16
    assert got[("specstream_trainer_step", rank0)] == 2
    assert got[("specstream_trainer_step_seconds", rank0)] == 0.25
    assert got[("specstream_trainer_data_wait_ratio", rank0)] == 0.125
    for p in ("0", "1"):
        assert got[("specstream_consumer_lag", (("partition", p), ("run", "r1")))] == 6

    # Live: the next scrape sees what the stages counted since, and an open pause counts as it goes.
    stats.refs, stats.batches, stats.paused_since = 32, 4, time.monotonic() - 5.0
    trainer.step, trainer.trained_local = 3, 24
    got = _samples(collector)
    assert got[("specstream_samples_produced_total", gen)] == 32
    assert got[("specstream_transaction_commit_seconds_count", gen)] == 4
    assert got[("specstream_backpressure_paused", gen)] == 1
    assert got[("specstream_backpressure_paused_seconds_total", gen)] >= 7.0
    assert got[("specstream_samples_trained_total", rank0)] == 24


def test_no_status_yet_means_no_lag_and_a_failed_read_is_not_an_error() -> None:
    def fail() -> RunStatus:
        raise RuntimeError("no topics yet")

    got = _samples(RunCollector(LiveProcess("r1"), status=StatusCache(fail)))
    assert not any(name.startswith("specstream_consumer_lag") for name, _ in got)


def test_status_is_read_at_most_every_interval_and_a_slow_read_does_not_hold_the_scrape() -> None:
    reads: list[float] = []
    release = threading.Event()

    def slow() -> RunStatus:
        reads.append(time.monotonic())
        release.wait(10)
        return _status(5, 1)

    cache = StatusCache(slow, every_s=3600, wait_s=0.2)
    started = time.monotonic()
    assert cache.latest() is None  # the read is still going: this scrape goes without lag
    assert time.monotonic() - started < 2.0
    release.set()
    deadline = time.monotonic() + 10
    while cache.latest() is None and time.monotonic() < deadline:
        time.sleep(0.01)  # polling the cache's own thread, bounded
    assert cache.latest() is not None
    assert len(reads) == 1  # within every_s: scrapes reuse it


def test_port_option_overrides_config_and_trainer_ranks_add_local_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    assert metrics_port(None, None) is None
    assert metrics_port(9100, None) == 9100
    assert metrics_port(9100, 9200) == 9200
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert metrics_port(9100, None, per_local_rank=True) == 9103
    assert metrics_port(0, None, per_local_rank=True) == 0  # any free port stays any free port


def test_server_serves_metrics_and_a_taken_port_is_a_config_error() -> None:
    server = serve_metrics(LiveProcess("r1"), 0, addr="127.0.0.1", say=lambda _line: None)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=10) as answer:
            assert answer.status == 200
        with socket.socket() as holder:
            holder.bind(("127.0.0.1", 0))
            holder.listen()
            with pytest.raises(ConfigError, match=r"monitor.metrics_port.*--metrics-port"):
                serve_metrics(LiveProcess("r1"), holder.getsockname()[1], addr="127.0.0.1")
    finally:
        server.close()


@pytest.mark.slow
def test_single_process_run_serves_its_generators_and_trainer(tmp_path, tiny_target_dir) -> None:
    """``run``/``quickstart`` wiring: one endpoint over the run's generator threads and trainer."""
    from pipeline.app.config_file import parse_config
    from pipeline.app.runtime import build_online_run
    from pipeline.devkit.chats import markov_conversations, write_jsonl
    from pipeline.devkit.target import TINY_AUX_LAYER_IDS

    data = tmp_path / "data.jsonl"
    write_jsonl(markov_conversations(16, seed=2), str(data))
    config = parse_config({
        "run_id": "metrics-run", "broker": {"bootstrap_servers": "memory"},
        "storage": {"root": str(tmp_path / "features")}, "data": {"path": str(data), "max_length": 128, "partitions": 2},
        "target": {"backend": "hf", "model": str(tiny_target_dir), "aux_layer_ids": list(TINY_AUX_LAYER_IDS)},
        "generate": {"high_watermark": 16, "low_watermark": 8},
        "train": {"batch_size": 2, "ttt_steps": 2, "draft_vocab_size": 64, "output_dir": str(tmp_path / "out")},
    })  # fmt: skip
    online = build_online_run(config)
    live = LiveProcess(config.run_id, online.transport)  # what `run --metrics-port` serves
    result = online.run(watch=live)
    assert result.reason == "end_of_stream"
    got = _samples(RunCollector(live))  # the live objects stay readable after the run
    gen = (("id", "metrics-run-gen-0"), ("role", "generator"), ("run", "metrics-run"))
    rank0 = (("id", "rank-0"), ("role", "trainer"), ("run", "metrics-run"))
    assert got[("specstream_samples_produced_total", gen)] == 16
    assert got[("specstream_feature_bytes_written_total", gen)] > 0
    assert got[("specstream_samples_trained_total", rank0)] == 16
    assert got[("specstream_trainer_step", rank0)] == result.steps
    assert {got[("specstream_consumer_lag", (("partition", p), ("run", "metrics-run")))] for p in "01"} == {0}
