"""Flow control at many partitions on a real broker (issue 13 item 4).

One generator feeds 64 partitions under the default watermarks (256 / 192): each partition's
share (4) is below the generator's batch (8). The worker used to cut every polled batch at the
share and seek back, re-reading most prompts and committing tiny transactions while the trainer
starved; its intake now builds batches across partitions and re-reads nothing.
"""

from __future__ import annotations

import threading

import pytest

from pipeline.core.topics import RunTopics
from pipeline.generate.backpressure import TrainerWindow, Watermarks
from pipeline.generate.synthetic import SyntheticTarget
from pipeline.generate.worker import GeneratorConfig, GeneratorWorker
from pipeline.source.publisher import PromptPublisher
from pipeline.storage import FeatureStore
from pipeline.transport.kafka import KafkaAdmin
from tests.integration.test_generate_backpressure import slow_trainer
from tests.support import make_prompts

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PARTITIONS = 64
PROMPTS = 512
BATCH = 8
MARKS = Watermarks(high=256, low=192, check_interval_s=0.1)


def test_one_generator_over_64_partitions_completes_without_re_reading_a_prompt(kafka, run_id, storage_root) -> None:
    topics = RunTopics(run_id)
    with KafkaAdmin(kafka) as admin:
        admin.ensure_run_topics(topics, PARTITIONS)
    prompts = make_prompts(run_id, PROMPTS)
    PromptPublisher(kafka, run_id, PARTITIONS).publish(prompts)
    store = FeatureStore(storage_root, run_id, durable=False)
    worker = GeneratorWorker(
        kafka, store, SyntheticTarget(hidden_size=16),
        GeneratorConfig(run_id=run_id, worker_id="g", batch_size=BATCH, backpressure=MARKS,
                        trainer=TrainerWindow(world_size=1, batch_size=8, prefetch=8)),
    )  # fmt: skip
    stop = threading.Event()
    errors: list[BaseException] = []
    thread = threading.Thread(target=lambda: worker.run(stop), daemon=True)
    thread.start()
    try:
        ids = slow_trainer(kafka, store, run_id, [0], stop, partitions=PARTITIONS, prompts=PROMPTS, pace_s=0.002)
    except BaseException as exc:  # noqa: BLE001 - reported after the worker stopped
        errors.append(exc)
    finally:
        stop.set()
        thread.join(timeout=60)
    with KafkaAdmin(kafka) as admin:
        admin.delete_topics(topics.all())
    assert not thread.is_alive()
    if errors:
        raise errors[0]
    stats = worker.stats
    assert sorted(ids) == sorted(p.prompt_id for p in prompts)  # N of N, each once
    assert stats.refs == PROMPTS
    assert stats.reread == 0, "prompts were polled, dropped and fetched again"
    assert stats.pauses > 0, "backpressure never held the worker: the shares were not exercised"
    assert stats.max_backlog <= MARKS.high, stats.max_backlog
    # Batches span partitions: a transaction carries more than one partition's share of 4.
    assert stats.refs / stats.batches > MARKS.high // PARTITIONS, (stats.refs, stats.batches)
