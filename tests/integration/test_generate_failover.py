"""Generator workers in group mode, in separate processes: SIGKILL and SIGTERM lose nothing.

Two ``specstream generate`` processes share the 4 prompt partitions through the
generators' consumer group. One is killed by SIGKILL in the middle of a batch (its refs are in
the log, its transaction open); the survivor takes its partitions after the session timeout,
resumes the per-partition counts from the committed offset metadata, and the samples topic read
``read_committed`` holds every prompt exactly once with end-of-stream counts that add up.
"""

from __future__ import annotations

import re
import signal
import time

import pytest

from pipeline.core.messages import SampleRef
from pipeline.core.topics import RunTopics
from pipeline.generate.backlog import generator_commits
from pipeline.source.publisher import PromptPublisher
from pipeline.storage import FeatureStore
from pipeline.stream import SampleStream
from pipeline.transport.kafka import KafkaAdmin, KafkaSettings
from tests.support import make_prompts, read_messages, spawn, wait_exit, wait_for_group

pytestmark = pytest.mark.integration

SESSION_MS = 6000  # the broker's group.min.session.timeout.ms
TXN_MS = 10000


def group_args(kafka: KafkaSettings, run_id: str, storage: str, worker: str, *, session_ms: int = SESSION_MS) -> list[str]:
    return [
        "generate", "--run-id", run_id, "--storage", storage, "--bootstrap", kafka.bootstrap_servers, "--backend", "synthetic",
        "--worker-id", worker, "--hidden-size", "32", "--batch-size", "8",
        "--session-timeout-ms", str(session_ms), "--transaction-timeout-ms", str(TXN_MS), "--verbose",
    ]  # fmt: skip


def wait_for_commits(kafka: KafkaSettings, topics: RunTopics, minimum: int, timeout_s: float = 60) -> int:
    """Poll the generators' committed offsets until at least ``minimum`` prompts are committed."""
    deadline = time.monotonic() + timeout_s
    with KafkaAdmin(kafka) as admin:
        while time.monotonic() < deadline:
            done = sum(c.offset for c in generator_commits(admin, topics).values())
            if done >= minimum:
                return done
            time.sleep(0.1)  # polling a condition with a deadline
    raise TimeoutError(f"generators did not commit {minimum} prompt offsets in {timeout_s} s")


def samples_of(output: str) -> int:
    match = re.search(r"generator gen-\w: (\d+) samples", output)
    assert match, output
    return int(match.group(1))


def read_all(kafka: KafkaSettings, storage: str, run_id: str) -> tuple[list[str], SampleStream]:
    stream = SampleStream(kafka, FeatureStore(storage, run_id), run_id, range(4), idle_timeout_s=60)
    try:
        ids = [item.ref.prompt_id for item in stream]
    finally:
        stream.close()
    return ids, stream


def test_sigkill_mid_batch_moves_the_partitions_to_the_survivor(kafka, run_topics, storage_root) -> None:
    run_id = run_topics.run_id
    prompts = make_prompts(run_id, 240)
    PromptPublisher(kafka, run_id, 4).publish(prompts)

    # The doomed worker starts alone, so it owns all four partitions, commits two batches and
    # dies with its third batch's refs flushed to the log inside an open transaction.
    doomed = spawn(group_args(kafka, run_id, storage_root, "gen-a"), env={"SPECSTREAM_CRASH_AT": "generate.before_commit:3"})
    wait_for_commits(kafka, run_topics, 1)
    survivor = spawn(group_args(kafka, run_id, storage_root, "gen-b"))

    code, out = wait_exit(doomed, timeout_s=60)
    assert code == -signal.SIGKILL, f"expected SIGKILL, got {code}:\n{out}"
    code, out = wait_exit(survivor, timeout_s=120)
    assert code == 0, out
    assert "partitions ended [0, 1, 2, 3]" in out, out  # it forwarded every EOS: it took them all

    ids, stream = read_all(kafka, storage_root, run_id)
    assert sorted(ids) == sorted(p.prompt_id for p in prompts)  # every prompt exactly once
    summary = stream.summary()
    assert (summary.expected, summary.used, summary.missing, summary.duplicates) == (240, 240, 0, 0)
    with KafkaAdmin(kafka) as admin:
        written = admin.end_offsets(run_topics.samples, range(4), committed_only=False)
    # the log holds more than the visible refs + markers: the killed batch's refs, aborted
    assert sum(written.values()) > 240 + 4


class _SourceCut(Exception):
    pass


def _first(items: list, n: int):
    """The first ``n`` items, then a failure: the source commits them, no end-of-stream yet."""
    yield from items[:n]
    raise _SourceCut


def test_sigterm_finishes_the_batch_and_leaves_the_group_at_once(kafka, run_topics, storage_root) -> None:
    run_id = run_topics.run_id
    prompts = make_prompts(run_id, 400)
    publisher = PromptPublisher(kafka, run_id, 4, chunk_size=50)
    # A long session timeout: only a clean LeaveGroup lets the other worker take over quickly.
    args = lambda w: group_args(kafka, run_id, storage_root, w, session_ms=30_000)  # noqa: E731
    leaving, staying = spawn(args("gen-a")), spawn(args("gen-b"))
    # Both in the group before any prompt exists: the first to join cannot take all the work.
    wait_for_group(kafka.bootstrap_servers, run_topics.generator_group, 2)
    with pytest.raises(_SourceCut):  # half the prompts now, so neither worker can finish early
        publisher.publish(_first(prompts, 200))
    read_messages(  # both are members and both have committed work
        kafka, run_topics.samples, range(4), timeout_s=60,
        until=lambda m: {x.producer_id for _, x in m if isinstance(x, SampleRef)} == {"gen-a", "gen-b"},
    )  # fmt: skip
    leaving.send_signal(signal.SIGTERM)
    terminated_at = time.monotonic()
    code, out = wait_exit(leaving, timeout_s=40)
    assert code == 0, out
    assert "SIGTERM" in out
    publisher.publish(prompts)  # the restarted source adds the other half and the markers
    left = samples_of(out)
    code, out = wait_exit(staying, timeout_s=60)
    assert code == 0, out
    assert 0 < left < 400 and left + samples_of(out) == 400, out  # both worked, no overlap
    assert time.monotonic() - terminated_at < 25, "the survivor waited for a session timeout"

    ids, stream = read_all(kafka, storage_root, run_id)
    assert sorted(ids) == sorted(p.prompt_id for p in prompts)
    assert stream.summary().duplicates == 0
