"""Backpressure on a real broker: with a slow trainer the samples backlog stays bounded.

The "trainer" here reads every samples partition at a fixed, slow pace and reports progress the
way the real one does: one ledger record per step with the records consumed per partition. The
backlog is sampled from outside all along (committed refs in the generators' offset metadata
minus the newest ledger record) and must never exceed the high watermark plus one batch.
"""

from __future__ import annotations

import threading
import time

import pytest

from pipeline.core.messages import LedgerStep, PartitionOffset, RankProgress, StepMetrics, encode, now
from pipeline.core.progress import PartitionCounters
from pipeline.generate.backlog import generator_commits
from pipeline.generate.backpressure import TrainerWindow, Watermarks
from pipeline.generate.synthetic import SyntheticTarget
from pipeline.generate.worker import GeneratorConfig, GeneratorWorker
from pipeline.source.publisher import PromptPublisher
from pipeline.storage import FeatureStore
from pipeline.stream import SampleStream
from pipeline.transport.kafka import KafkaAdmin, KafkaSettings, PlainProducer
from tests.support import make_prompts

pytestmark = pytest.mark.integration

PROMPTS = 160
BATCH = 4
STEP = 8  # the trainer's global batch: world 1 x batch 8 x accum 1
MARKS = Watermarks(high=24, low=12, check_interval_s=0.05)
WINDOW = TrainerWindow(world_size=1, batch_size=STEP, grad_accum=1, prefetch=4)


def slow_trainer(
    kafka: KafkaSettings, store: FeatureStore, run_id: str, consumed: list[int], stop: threading.Event,
    *, partitions: int = 4, prompts: int = PROMPTS, pace_s: float = 0.02,
) -> list[str]:  # fmt: skip
    """Reads every partition, one step of STEP samples at a time, and logs each step."""
    ledger = PlainProducer(kafka)
    stream = SampleStream(kafka, store, run_id, range(partitions), idle_timeout_s=60)
    ids: list[str] = []
    try:
        for step, item in enumerate(stream, start=1):
            ids.append(item.ref.prompt_id)
            stop.wait(pace_s)  # the slow consumer: compute time per sample, not synchronisation
            if len(ids) % STEP == 0 or len(ids) == prompts:
                state = stream.state()
                record = LedgerStep(
                    run_id=run_id, step=len(ids) // STEP + 1, epoch=0, lr=0.0, created_at=now(),
                    metrics=StepMetrics(loss=0.0, ploss=[0.0], acc=[0.0]),
                    ranks=[RankProgress(rank=0, sample_ids=[], next_offsets=[
                        PartitionOffset(partition=p, offset=state.positions[p], records=state.consumed(p))
                        for p in range(partitions)
                    ])],
                )  # fmt: skip
                ledger.send(f"{run_id}.ledger", encode(record), partition=0)
                ledger.flush()
                consumed[0] = sum(state.consumed(p) for p in range(partitions))
    finally:
        stream.close()
        ledger.close()
    return ids


def test_slow_trainer_bounds_the_backlog_by_high_watermark_plus_one_batch(kafka, run_topics, storage_root) -> None:
    run_id = run_topics.run_id
    prompts = make_prompts(run_id, PROMPTS)
    PromptPublisher(kafka, run_id, 4).publish(prompts)
    store = FeatureStore(storage_root, run_id, durable=False)
    worker = GeneratorWorker(
        kafka, store, SyntheticTarget(hidden_size=16),
        GeneratorConfig(run_id=run_id, worker_id="g", batch_size=BATCH, backpressure=MARKS, trainer=WINDOW),
    )  # fmt: skip
    stop = threading.Event()
    errors: list[BaseException] = []
    results: dict[str, object] = {}
    consumed = [0]

    def run(name: str, fn) -> None:
        try:
            results[name] = fn()
        except BaseException as exc:
            errors.append(exc)
            stop.set()

    threads = [
        threading.Thread(target=run, args=("worker", lambda: worker.run(stop))),
        threading.Thread(target=run, args=("trainer", lambda: slow_trainer(kafka, store, run_id, consumed, stop))),
    ]
    for t in threads:
        t.start()
    worst = 0
    deadline = time.monotonic() + 90
    with KafkaAdmin(kafka) as admin:
        while threads[1].is_alive() and time.monotonic() < deadline:
            before = consumed[0]  # read consumed first: the backlog can only be over-estimated
            produced = sum(PartitionCounters.parse(c.metadata).refs for c in generator_commits(admin, run_topics).values())
            worst = max(worst, produced - before)
            threads[1].join(timeout=0.02)
    stop.set()
    for t in threads:
        t.join(timeout=60)
        assert not t.is_alive()
    if errors:
        raise errors[0]
    stats = worker.stats
    assert sorted(results["trainer"]) == sorted(p.prompt_id for p in prompts)  # type: ignore[arg-type]
    assert stats.pauses > 0, "the worker never paused: the test did not exercise backpressure"
    assert worst <= MARKS.high + BATCH, worst
    # Its own view, uncommitted batches included: the per-partition caps hold it to the watermark.
    assert stats.max_backlog <= MARKS.high, stats.max_backlog
    assert worst >= MARKS.low  # and it did fill up to the watermark region, not starve the trainer
