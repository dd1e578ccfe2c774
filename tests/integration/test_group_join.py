"""A group member takes every rebalance, even one whose join outlives the poll that started it.

kafka-python 3.0.12 loses such a join (pipeline/transport/group_join.py): the member keeps what it
had, its heartbeats stay off, and the broker evicts it. The CI run that found it was a generator
whose first join came before its client knew the prompts topic: the metadata that arrived next
asked for a rejoin, the join outlived a 50 ms poll, and the worker owned nothing for the rest of
the run. Here the same metadata change is made on purpose (partitions added to the topic) while
the member polls without waiting, as a generator does while it holds a batch.
"""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest
from kafka.admin import KafkaAdminClient, NewPartitions

from pipeline.transport.kafka import KafkaAdmin, KafkaSettings, PartitionReader, PlainProducer

pytestmark = pytest.mark.integration


def _poll_until(reader: PartitionReader, done, *, timeout_s: float, wait_s: float) -> set[int]:
    """Poll (each poll waiting ``wait_s``) until ``done(partitions read)``; the partitions read."""
    seen: set[int] = set()
    work = threading.Event()  # never set: the member's own work between polls (a capture)
    deadline = time.monotonic() + timeout_s
    while not done(seen) and time.monotonic() < deadline:
        seen |= {r.partition for r in reader.poll(wait_s)}
        work.wait(0.02)
    return seen


def test_a_member_that_polls_without_waiting_takes_the_partitions_added_to_its_topic(
    kafka: KafkaSettings, run_id: str
) -> None:
    topic = f"{run_id}.join"
    # Metadata every 0.5 s, so the client sees the new partitions within the test.
    settings = dataclasses.replace(kafka, client_options={"metadata_max_age_ms": 500})
    with KafkaAdmin(kafka) as admin:
        admin.ensure_topics({topic: 2})
    reader = PartitionReader(settings, topic, group_id=f"{run_id}.g", start="earliest")
    producer = PlainProducer(kafka)
    try:
        _poll_until(reader, lambda _: reader.assignment() == [0, 1], timeout_s=30, wait_s=0.2)
        assert reader.assignment() == [0, 1]

        raw = KafkaAdminClient(bootstrap_servers=kafka.bootstrap_servers.split(","))
        try:
            raw.create_partitions({topic: NewPartitions(total_count=4)})
        finally:
            raw.close()
        for p in range(4):
            producer.send(topic, f"record {p}".encode(), partition=p)
        producer.flush()

        seen = _poll_until(reader, lambda s: s == {0, 1, 2, 3}, timeout_s=30, wait_s=0.0)
        assert reader.assignment() == [0, 1, 2, 3]
        assert seen == {0, 1, 2, 3}
    finally:
        producer.close()
        reader.close()
        with KafkaAdmin(kafka) as admin:
            admin.delete_topics([topic])
