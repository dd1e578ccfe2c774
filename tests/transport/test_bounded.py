"""``bounded``: a client call that never returns becomes a retriable error instead of a hang."""

from __future__ import annotations

import threading
import time

import pytest

from pipeline.core.topics import Committed, TransportError
from pipeline.transport.kafka import KafkaSettings
from pipeline.transport.outage import bounded


def test_a_call_that_never_returns_is_a_retriable_error_after_the_deadline() -> None:
    never = threading.Event()  # a kafka-python wait nothing will ever complete
    started = time.monotonic()
    with pytest.raises(TransportError) as raised:
        bounded(never.wait, what="committed offsets of t.prompts", timeout_s=0.5)
    assert raised.value.retriable
    assert "committed offsets of t.prompts" in str(raised.value)
    assert 0.5 <= time.monotonic() - started < 5


def test_a_value_and_an_error_come_back_to_the_caller() -> None:
    assert bounded(lambda: 42, what="x", timeout_s=5) == 42

    def fails() -> None:
        raise KeyError("the client's own error")

    with pytest.raises(KeyError, match="the client's own error"):
        bounded(fails, what="x", timeout_s=5)


@pytest.mark.integration
def test_a_reader_whose_committed_fetch_never_returns_gets_a_fresh_client(kafka_bootstrap, run_topics) -> None:
    """The client's own fetch is held forever once (what a request lost in a broker restart did);
    the reader replaces the client and the retry reads the group's committed offset."""
    settings = KafkaSettings(kafka_bootstrap, request_timeout_ms=1000)
    group = f"{run_topics.run_id}.g"
    first = settings.reader(run_topics.prompts, partitions=[0], group_id=group)
    try:
        first.commit({0: 0}, metadata="m")
    finally:
        first.close()
    reader = settings.reader(run_topics.prompts, partitions=[0, 1], group_id=group, start="earliest")
    try:
        stuck = reader._consumer
        never = threading.Event()
        stuck.committed = lambda *a, **k: never.wait()  # type: ignore[method-assign]
        assert reader.committed([0]) == {0: Committed(0, "m")}
        assert reader._consumer is not stuck
        assert reader.assignment() == [0, 1]
    finally:
        reader.close()
