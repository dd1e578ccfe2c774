"""The held-out eval set on a real broker: captured once, evaluated every ``eval_interval`` steps."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pipeline.app.config_file import load_config
from pipeline.app.runtime import build_online_run
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


def test_group_mode_workers_and_a_source_rerun_capture_the_eval_set_exactly_once(
    kafka, run_id, tmp_path, tiny_target_dir
) -> None:
    """Two workers in the generators' group (``specstream generate`` without partitions) both
    try the eval sub-run: the broker gives its one partition to one of them, the transactions do
    the rest. A rerun of the source publishes no eval prompt twice."""
    import threading

    from pipeline.app.manifest import claim_run
    from pipeline.devkit.chats import markov_conversations, write_jsonl

    held_out = tmp_path / "eval.jsonl"
    write_jsonl(markov_conversations(EVAL_CONVERSATIONS, seed=7), str(held_out))
    path = write_config(
        tmp_path, kafka, run_id, tiny_target_dir, conversations=8,
        data={"eval_path": str(held_out), "partitions": 2},
        generate={"high_watermark": 1000, "low_watermark": 500},  # no trainer in this test
    )  # fmt: skip
    online = build_online_run(load_config(path))
    claim_run(online.transport, online.config)
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
