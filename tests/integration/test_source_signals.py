"""SIGTERM reaches the source stage (a real process, a real signal).

``specstream source`` signalled mid-publish aborts its open chunk and exits 0 with a line that
says to rerun; the rerun publishes the rest, and the prompts topic holds every prompt once, numbered
without a gap, with end-of-stream counts that agree. (A second Ctrl-C: test_train_signals.py.)
"""

from __future__ import annotations

import signal
import time

import pytest

from pipeline.core.messages import EndOfStream, Prompt
from pipeline.core.topics import RunTopics
from pipeline.transport.kafka import KafkaAdmin, KafkaSettings
from tests.integration.test_runtime import write_config
from tests.support import read_messages, spawn, wait_exit

pytestmark = pytest.mark.integration

CONVERSATIONS = 6000  # a few seconds of publishing on a loaded 2-core machine


def committed_prompts(kafka: KafkaSettings, topics: RunTopics) -> int:
    with KafkaAdmin(kafka) as admin:
        if topics.prompts not in admin.topics():
            return 0
        return sum(admin.end_offsets(topics.prompts, range(4)).values())


def test_sigterm_stops_the_source_mid_publish_and_a_rerun_publishes_each_prompt_once(
    kafka, run_id, tmp_path, tiny_target_dir
) -> None:
    config = write_config(tmp_path, kafka, run_id, tiny_target_dir, conversations=CONVERSATIONS)
    topics = RunTopics(run_id)
    proc = spawn(["source", "--config", str(config)])
    deadline = time.monotonic() + 120
    while committed_prompts(kafka, topics) == 0:  # mid-publish: the first chunk is committed
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        assert time.monotonic() < deadline, "the source committed nothing in 120 s"
        time.sleep(0.05)  # polling an observable condition, not timing a race
    proc.send_signal(signal.SIGTERM)
    code, out = wait_exit(proc, timeout_s=60)
    assert code == 0, out
    assert "SIGTERM" in out and "source stopped before the end" in out and "prompts published" not in out, out
    first = committed_prompts(kafka, topics)

    code, out = wait_exit(spawn(["source", "--config", str(config)]), timeout_s=300)
    assert code == 0, out
    total = int(out.split(" prompts published")[0].split()[-1])
    assert 0 < first < total, (first, total)  # the first attempt really stopped in the middle
    messages = read_messages(
        kafka, topics.prompts, range(4), timeout_s=120,
        until=lambda m: sum(isinstance(x, EndOfStream) for _, x in m) == 4,
    )  # fmt: skip
    prompts = [(p, x) for p, x in messages if isinstance(x, Prompt)]
    assert len(prompts) == total and len({x.prompt_id for _, x in prompts}) == total  # each exactly once
    for p in range(4):  # numbered without a gap, and the markers' counts agree
        seqs = [x.seq for q, x in prompts if q == p]
        assert seqs == list(range(len(seqs)))
        marker = next(x for q, x in messages if q == p and isinstance(x, EndOfStream))
        assert marker.count == len(seqs)
