"""``bounded``: a client call that never returns becomes a retriable error instead of a hang."""

from __future__ import annotations

import re
import threading
import time

import pytest

from pipeline.core.topics import Committed, TransportError
from pipeline.transport.kafka import KafkaSettings
from pipeline.core.errors import BrokerError
from pipeline.transport.outage import OUTAGE, bounded, ride_out


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


def test_a_call_failing_on_its_own_while_others_are_answered_still_ends_at_the_budget() -> None:
    """Another client of the process is answered all along (it restarts the process's outage
    clock); the call that keeps failing still stops past the budget, with a line of its own."""
    done = threading.Event()

    def answered_meanwhile() -> None:
        while not done.wait(0.05):  # another client's calls succeeding, every 50 ms
            OUTAGE.answered("127.0.0.1:9")

    def held() -> None:
        raise TransportError("KafkaTimeoutError: held by an open transaction", retriable=True)

    outcome: list[BaseException] = []

    def call() -> None:
        try:
            ride_out(held, what="committed offsets of t.prompts", where="127.0.0.1:9", budget_s=1.0)
        except BaseException as exc:  # noqa: BLE001 - handed to the test's thread
            outcome.append(exc)

    other = threading.Thread(target=answered_meanwhile, daemon=True)
    caller = threading.Thread(target=call, daemon=True)
    other.start()
    caller.start()
    caller.join(15)  # without its own clock the call retries for ever: bounded here
    done.set()
    other.join(5)
    assert not caller.is_alive(), "the call still retried after 15 s"
    assert len(outcome) == 1 and isinstance(outcome[0], BrokerError), outcome
    assert re.match(r"committed offsets of t\.prompts has failed for \d+ s while the Kafka broker at 127\.0\.0\.1:9 "
                    r"answers other calls \(broker\.outage_budget_s is 1; last error: KafkaTimeoutError", str(outcome[0]))


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
