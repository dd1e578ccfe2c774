"""The plain producer (ledger, dead letters, manifest) over a long run between flushes."""

from __future__ import annotations

import gc

from kafka.producer.future import FutureRecordMetadata

from pipeline.core.topics import RunTopics
from pipeline.transport.kafka import KafkaSettings


def _live_futures() -> int:
    # type(), not isinstance(): isinstance asks each object for __class__, which warns on deprecated
    # proxies (torch.distributed.reduce_op); the futures are never subclassed
    return sum(type(o) is FutureRecordMetadata for o in gc.get_objects())


def test_a_producer_that_flushes_rarely_holds_no_future_per_delivered_record(
    kafka: KafkaSettings, run_topics: RunTopics
) -> None:
    """The ledger flushes only at checkpoints (never before the end with ``save_interval: 0``):
    a multi-day run sends millions of records in between, and must not keep one future each."""
    producer = kafka.plain_producer()
    before = _live_futures()
    try:
        for batch in range(10):
            for i in range(500):
                last = producer.send(run_topics.ledger, f"{batch}-{i}".encode(), partition=0)
            last.get(timeout=60)  # this batch is on the broker: its futures are done
        held = _live_futures() - before
        producer.flush(timeout_s=60)  # still confirms every record, forgotten futures included
    finally:
        producer.close()
    assert held <= 1024 + 500, f"{held} futures held after 5,000 delivered records"
    with kafka.admin() as admin:
        assert admin.end_offsets(run_topics.ledger, [0]) == {0: 5000}
