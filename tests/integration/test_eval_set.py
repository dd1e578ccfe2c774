"""The held-out eval set on a real broker: captured once, evaluated every ``eval_interval`` steps."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

from pipeline.app.config_file import load_config
from pipeline.app.runtime import OnlineRun, build_online_run
from pipeline.core.messages import EndOfStream, SampleRef, decode
from pipeline.core.topics import RunTopics, read_to_end
from pipeline.storage import FeatureStore
from tests.integration.test_runtime import no_open_transactions, write_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EVAL_CONVERSATIONS = 6


def test_eval_set_is_captured_once_evaluated_every_interval_and_summarised(
    kafka, run_id, tmp_path, tiny_target_dir
) -> None:
    from pipeline.devkit.chats import markov_conversations, write_jsonl

    held_out = tmp_path / "eval.jsonl"
    write_jsonl(markov_conversations(EVAL_CONVERSATIONS, seed=7), str(held_out))
    path = write_config(
        tmp_path, kafka, run_id, tiny_target_dir, conversations=32,
        data={"eval_path": str(held_out)},
        generate={"workers": 2},
        storage={"retention": "delete"},  # training features go after checkpoints, eval features stay
        train={"eval_interval": 3},
    )  # fmt: skip
    result = build_online_run(load_config(path)).run()

    # training totals exclude the eval conversations; the summary carries the final eval figures
    assert result.reason == "end_of_stream" and result.steps == 16
    assert result.source is not None and result.source.prompts == 32
    assert result.source.eval_prompts == EVAL_CONVERSATIONS
    assert result.summary.startswith("32 of 32 prompts trained, 0 missing, 0 duplicates dropped")
    assert "eval (step 16): loss" in result.summary and "accept length" in result.summary
    assert sum(g.refs for g in result.generators) == 32

    # the eval topic holds exactly one sample per eval conversation (two workers), and its marker
    topics = RunTopics(run_id).eval
    records = [decode(r.value or b"") for r in read_to_end(kafka, topics.samples, [0], timeout_s=30)]
    refs = [m for m in records if isinstance(m, SampleRef)]
    markers = [m for m in records if isinstance(m, EndOfStream)]
    assert len(refs) == EVAL_CONVERSATIONS and len({r.sample_id for r in refs}) == EVAL_CONVERSATIONS
    assert [m.count for m in markers] == [EVAL_CONVERSATIONS]
    assert no_open_transactions(kafka, RunTopics(run_id))
    eval_store = FeatureStore(str(tmp_path / "features"), topics.run_id)
    assert len(eval_store.list()) == EVAL_CONVERSATIONS  # retention never touched them

    # one eval row every eval_interval steps, and one at the end
    rows = [json.loads(line) for line in (tmp_path / "out" / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6, 9, 12, 15, 16]
    for row in rows:
        assert row["split"] == "eval" and row["samples"] == EVAL_CONVERSATIONS
        assert math.isfinite(row["loss"]) and all(math.isfinite(x) for x in row["ploss"])
        assert all(0.0 <= a <= 1.0 for a in row["acc"]) and len(row["acc"]) == 2
    assert result.eval is not None and result.eval["loss"] == pytest.approx(rows[-1]["loss"])
    # the eval rows are not training steps: metrics.jsonl has the 16 training steps only
    steps = [json.loads(line)["step"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 17))


def generators_only_run(kafka, run_id: str, tmp_path: Path, target: Path, *, conversations: int) -> OnlineRun:
    """A claimed run of ``conversations`` over 2 partitions with the eval set, for tests that
    drive its source and generators by hand (no trainer: the watermarks never pause them)."""
    from pipeline.app.manifest import claim_run
    from pipeline.devkit.chats import markov_conversations, write_jsonl

    held_out = tmp_path / "eval.jsonl"
    write_jsonl(markov_conversations(EVAL_CONVERSATIONS, seed=7), str(held_out))
    path = write_config(
        tmp_path, kafka, run_id, target, conversations=conversations,
        data={"eval_path": str(held_out), "partitions": 2},
        generate={"high_watermark": 1000, "low_watermark": 500},
    )  # fmt: skip
    online = build_online_run(load_config(path))
    claim_run(online.transport, online.config)
    return online


def test_group_mode_workers_and_a_source_rerun_capture_the_eval_set_exactly_once(
    kafka, run_id, tmp_path, tiny_target_dir
) -> None:
    """Two workers in the generators' group (``specstream generate`` without partitions) both
    try the eval sub-run: the broker gives its one partition to one of them, the transactions do
    the rest. A rerun of the source publishes no eval prompt twice."""
    import threading

    online = generators_only_run(kafka, run_id, tmp_path, tiny_target_dir, conversations=8)
    first = online.source_stage().run()
    again = online.source_stage().run()
    assert (first.eval_prompts, first.prompts) == (EVAL_CONVERSATIONS, 8)
    assert (again.eval_prompts, again.prompts) == (EVAL_CONVERSATIONS, 8)

    workers = [online.generator(f"{run_id}-g{i}", None) for i in range(2)]
    errors: list[BaseException] = []

    def work(index: int) -> None:
        try:
            workers[index].run()
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not errors and not any(t.is_alive() for t in threads)

    topics = RunTopics(run_id).eval
    records = [decode(r.value or b"") for r in read_to_end(kafka, topics.samples, [0], timeout_s=30)]
    refs = [m for m in records if isinstance(m, SampleRef)]
    assert len(refs) == EVAL_CONVERSATIONS and len({r.sample_id for r in refs}) == EVAL_CONVERSATIONS
    assert [m.count for m in records if isinstance(m, EndOfStream)] == [EVAL_CONVERSATIONS]
    assert sum(w.eval_stats.refs for w in workers if w.eval_stats is not None) == EVAL_CONVERSATIONS
    assert sum(w.stats.refs for w in workers) == 8  # the training prompts, counted apart


def test_the_training_capture_does_not_wait_for_the_eval_capture(kafka, run_id, tmp_path, tiny_target_dir) -> None:
    """Another member of the eval sub-run's group holds its one partition (a slow worker on
    another machine): a worker in group mode still captures and commits the whole training
    run meanwhile, and captures the eval set once the partition comes to it."""
    import threading

    from tests.support import read_messages

    online = generators_only_run(kafka, run_id, tmp_path, tiny_target_dir, conversations=8)
    online.source_stage().run()
    topics = RunTopics(run_id)
    holder = online.transport.reader(topics.eval.prompts, group_id=topics.eval.generator_group, start="committed")
    try:
        deadline = time.monotonic() + 60
        while holder.assignment() != [0]:
            assert time.monotonic() < deadline, "the holder never got the eval partition"
            holder.poll(0.5)  # joins the group; what it reads is never committed
        worker = online.generator(f"{run_id}-g0", None)
        errors: list[BaseException] = []

        def work() -> None:
            try:
                worker.run()
            except BaseException as exc:  # reported by the assertion below
                errors.append(exc)

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        # every training prompt is a committed ref while the eval partition is still held
        trained = read_messages(kafka, topics.samples, range(2), timeout_s=120,
                                until=lambda got: sum(isinstance(m, EndOfStream) for _, m in got) == 2)  # fmt: skip
        assert sum(isinstance(m, SampleRef) for _, m in trained) == 8
        assert thread.is_alive() and not errors  # waiting for the eval partition
    finally:
        holder.close()  # the partition moves to the worker
    thread.join(timeout=120)
    assert not errors and not thread.is_alive()
    records = [decode(r.value or b"") for r in read_to_end(kafka, topics.eval.samples, [0], timeout_s=30)]
    assert sum(isinstance(m, SampleRef) for m in records) == EVAL_CONVERSATIONS
    assert worker.eval_stats is not None and worker.eval_stats.refs == EVAL_CONVERSATIONS
    assert worker.stats.refs == 8


def settled(kafka, topic: str, partitions) -> bool:
    """Whether ``topic``'s partitions hold no open transaction (end offsets equal for both isolations)."""
    with kafka.admin() as admin:
        return admin.end_offsets(topic, partitions) == admin.end_offsets(topic, partitions, committed_only=False)


def test_a_failed_eval_capture_stops_the_worker_and_a_restart_captures_both_exactly_once(
    kafka, run_id, tmp_path, tiny_target_dir
) -> None:
    """The eval sub-run's storage directory cannot be created (a file stands in its place): the
    worker stops with the capture's storage error instead of going on without an eval set, and
    leaves no transaction open; once the path is free, a restart captures the eval set and the
    rest of the training prompts, each exactly once."""
    online = generators_only_run(kafka, run_id, tmp_path, tiny_target_dir, conversations=48)
    online.source_stage().run()
    topics = RunTopics(run_id)
    blocker = tmp_path / "features" / topics.eval.run_id
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("not a directory")

    with pytest.raises(OSError) as failed:
        online.generator(f"{run_id}-g0", [0, 1]).run()
    assert topics.eval.run_id in str(failed.value)
    assert settled(kafka, topics.samples, range(2)) and settled(kafka, topics.eval.samples, [0])  # none left open

    blocker.unlink()
    worker = online.generator(f"{run_id}-g0", [0, 1])
    worker.run()
    refs = [m for m in (decode(r.value or b"") for r in read_to_end(kafka, topics.samples, range(2), timeout_s=30))
            if isinstance(m, SampleRef)]  # fmt: skip
    assert len(refs) == 48 and len({r.sample_id.rsplit("-a", 1)[0] for r in refs}) == 48
    eval_refs = [m for m in (decode(r.value or b"") for r in read_to_end(kafka, topics.eval.samples, [0], timeout_s=30))
                 if isinstance(m, SampleRef)]  # fmt: skip
    assert len(eval_refs) == EVAL_CONVERSATIONS and worker.eval_stats is not None
