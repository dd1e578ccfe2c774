"""A transactional producer fenced by a newer instance with its id stops; it never fences back.

The race on the real broker: the old instance has a transaction open when the new one
initialises. The old one learns it is fenced from the broker's answer to its next produce
request, and kafka-python refuses every send after that with a plain ``KafkaError`` that wraps
the fencing error. That send must raise ``FencedError``, and the abort that follows must not
re-initialise the id (it would fence the new instance, and the old one would carry on).
"""

from __future__ import annotations

import pytest

from pipeline.core.topics import FencedError, RunTopics, read_to_end
from pipeline.transport.kafka import KafkaSettings, TransactionalProducer

pytestmark = pytest.mark.integration


def _send_until_refused(producer: TransactionalProducer, topic: str, attempts: int = 5) -> FencedError:
    """Send and flush until a send is refused; the first flush already carries the broker's answer."""
    for i in range(attempts):
        try:
            producer.send(topic, 0, f"old-{i}".encode())
        except FencedError as exc:
            return exc
        producer.flush(timeout=30)
    raise AssertionError(f"{attempts} sends after fencing were all accepted")


def test_a_producer_fenced_while_sending_stops_without_fencing_its_successor(
    kafka: KafkaSettings, run_topics: RunTopics
) -> None:
    topic = run_topics.samples
    transactional_id = f"{run_topics.run_id}.twin"
    old = TransactionalProducer(kafka, transactional_id)
    new = None
    try:
        old.begin()
        old.send(topic, 0, b"old-open")
        old.flush(timeout=30)
        new = TransactionalProducer(kafka, transactional_id)  # fences old, aborts its transaction

        refused = _send_until_refused(old, topic)
        assert refused.same_id, refused
        with pytest.raises(FencedError):
            old.abort()  # must not re-initialise the id

        new.begin()  # the new instance still owns the id
        new.send(topic, 0, b"new")
        new.commit()
        assert [r.value for r in read_to_end(kafka, topic, [0], timeout_s=60)] == [b"new"]
    finally:
        old.close(timeout_s=5)
        if new is not None:
            new.close(timeout_s=5)
