"""Fixed-partition generators, in separate processes: overlapping assignments are refused.

``specstream generate --partitions`` has no consumer group to referee it; the workers claim their
partitions in the run's manifest topic (``pipeline.generate.claims``). Real processes, real
signals: a second worker asking for a partition a live worker holds is refused with one error
line naming the holder and its partitions; a clean exit releases the claim at once; after a
SIGKILL, a restart with the same (default) worker id takes over without waiting for the lease,
while another id waits for it. Group-mode workers started without ``--worker-id`` get distinct ids.
"""

from __future__ import annotations

import re
import signal
import time

import pytest

from pipeline.core.messages import SampleRef
from pipeline.source.publisher import PromptPublisher
from pipeline.transport.kafka import KafkaSettings
from tests.integration.test_generate_failover import _first, _SourceCut
from tests.support import make_prompts, one_error, read_messages, spawn, wait_exit, wait_for_output

pytestmark = pytest.mark.integration

SESSION_MS = 30_000  # lease = 3 session timeouts = 90 s: a test that passes never waited for it


def fixed_args(kafka: KafkaSettings, run_id: str, storage: str, partitions: str, *extra: str) -> list[str]:
    return [
        "generate", "--run-id", run_id, "--storage", storage, "--bootstrap", kafka.bootstrap_servers,
        "--backend", "synthetic", "--hidden-size", "32", "--batch-size", "4", "--partitions", partitions,
        "--session-timeout-ms", str(SESSION_MS), "--transaction-timeout-ms", "10000", "--verbose", *extra,
    ]  # fmt: skip


def open_stream(kafka: KafkaSettings, run_id: str, count: int) -> tuple[PromptPublisher, list]:
    """Half the prompts committed, no end-of-stream: the workers keep running until the rest."""
    prompts = make_prompts(run_id, count)
    publisher = PromptPublisher(kafka, run_id, 4, chunk_size=20)
    with pytest.raises(_SourceCut):
        publisher.publish(_first(prompts, count // 2))
    return publisher, prompts


def test_an_overlapping_assignment_is_refused_until_the_holder_exits(kafka, run_topics, storage_root) -> None:
    run_id = run_topics.run_id
    publisher, prompts = open_stream(kafka, run_id, 80)
    holder = spawn(fixed_args(kafka, run_id, storage_root, "0,1"))  # default id: gen-p0-1
    wait_for_output(holder, r"claimed partitions \[0, 1\]")

    started = time.monotonic()
    code, out = wait_exit(spawn(fixed_args(kafka, run_id, storage_root, "1,2")), timeout_s=60)
    assert code == 2, out
    line = one_error(out)
    assert (
        "gen-p1-2 cannot take partitions 1" in line and "generator gen-p0-1 (its partitions 0,1;" in line
    ), line
    assert time.monotonic() - started < 30  # refused at start, not after a lease
    # Another explicit id on the same partitions is refused too: ids do not get around a claim.
    code, out = wait_exit(
        spawn(fixed_args(kafka, run_id, storage_root, "0", "--worker-id", "other")), timeout_s=60
    )
    assert code == 2 and "gen-p0-1" in one_error(out), out

    holder.send_signal(signal.SIGTERM)
    code, out = wait_exit(holder, timeout_s=60)
    assert code == 0, out
    # The clean exit released the claim: 1,2 is taken at once and runs to its end of stream.
    second = spawn(fixed_args(kafka, run_id, storage_root, "1,2"))
    wait_for_output(second, r"claimed partitions \[1, 2\]", timeout_s=30)
    publisher.publish(prompts)
    code, out = wait_exit(second, timeout_s=120)
    assert code == 0 and "partitions ended [1, 2]" in out, out


def test_a_restart_after_sigkill_takes_over_at_once_with_the_same_id(kafka, run_topics, storage_root) -> None:
    run_id = run_topics.run_id
    publisher, prompts = open_stream(kafka, run_id, 80)
    first = spawn(fixed_args(kafka, run_id, storage_root, "0,1"))
    wait_for_output(first, r"claimed partitions \[0, 1\]")
    read_messages(kafka, run_topics.samples, [0, 1], until=lambda m: len(m) >= 4)  # it committed work
    first.send_signal(signal.SIGKILL)
    code, _ = wait_exit(first, timeout_s=30)
    assert code == -signal.SIGKILL
    killed_at = time.monotonic()

    # Dead but within its lease: another worker id is still refused...
    code, out = wait_exit(
        spawn(fixed_args(kafka, run_id, storage_root, "1", "--worker-id", "gen-x")), timeout_s=60
    )
    assert code == 2 and "generator gen-p0-1 (its partitions 0,1;" in one_error(out), out
    # ...but its own restart (the same default id, the same transactional id) takes over now.
    restart = spawn(fixed_args(kafka, run_id, storage_root, "1,0"))
    wait_for_output(restart, r"claimed partitions \[0, 1\]", timeout_s=30)
    assert time.monotonic() - killed_at < 3 * SESSION_MS / 1000, "the restart waited for the lease"
    publisher.publish(prompts)
    code, out = wait_exit(restart, timeout_s=120)
    assert code == 0 and "partitions ended [0, 1]" in out, out

    refs = read_messages(
        kafka, run_topics.samples, [0, 1], timeout_s=60,
        until=lambda m: sum(1 for _, x in m if not isinstance(x, SampleRef)) == 2,  # both end-of-stream markers
    )  # fmt: skip
    ids = [x.prompt_id for _, x in refs if isinstance(x, SampleRef)]
    expected = [p.prompt_id for i, p in enumerate(prompts) if i % 4 in (0, 1)]
    assert sorted(ids) == sorted(expected)  # every prompt of 0 and 1 exactly once across the two


def test_group_workers_without_an_id_get_distinct_ids(kafka, run_topics, storage_root) -> None:
    run_id = run_topics.run_id
    args = [
        "generate", "--run-id", run_id, "--storage", storage_root, "--bootstrap", kafka.bootstrap_servers,
        "--backend", "synthetic", "--hidden-size", "32", "--session-timeout-ms", "6000", "--verbose",
    ]  # fmt: skip
    workers = [spawn(args), spawn(args)]
    started = [wait_for_output(w, r"generator \S+ \(transactional id")[-1] for w in workers]
    found = [
        re.search(r"generator (\S+) \(transactional id (\S+)\): partitions from the group", s)
        for s in started
    ]
    assert all(found), started
    ids = {m.group(1) for m in found if m}
    transactional_ids = {m.group(2) for m in found if m}
    assert len(ids) == 2 and len(transactional_ids) == 2, started
    assert {f"{run_id}.generate.{w}" for w in ids} == transactional_ids
    PromptPublisher(kafka, run_id, 4).publish(make_prompts(run_id, 40))
    total = 0
    for w in workers:
        code, out = wait_exit(w, timeout_s=120)
        assert code == 0, out
        total += int(re.search(r"generator \S+: (\d+) samples", out).group(1))  # type: ignore[union-attr]
    assert total == 40
