"""``specstream dlq`` on a run fed with bad records at every stage, on the real broker.

Bad input lines in the conversations file (the source letters them), a garbage record in the
prompts topic (the generator) and a garbage and a non-ref JSON record in the samples topic (the
trainer), the strays written before the run with a plain producer as any other client could.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from pipeline.core.topics import RunTopics
from pipeline.transport.kafka import KafkaSettings
from tests.integration.test_runtime import write_config
from tests.support import one_error, spawn, wait_exit

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _dlq(*args: str) -> dict[str, Any]:
    code, out = wait_exit(spawn(["dlq", *args, "--json"]), timeout_s=120)
    assert code == 0, out
    return json.loads(out[out.index("{") :])


def test_dlq_lists_each_stages_letters_with_reasons_counts_and_filters(kafka: KafkaSettings, run_id, tmp_path, tiny_target_dir) -> None:
    path = write_config(tmp_path, kafka, run_id, tiny_target_dir, conversations=16, data={"partitions": 2})
    with (tmp_path / "data.jsonl").open("a") as data:  # bad input lines after the good ones
        data.write("this line is not json\n{\"messages\": 5}\nneither is line 19\n")
    topics = RunTopics(run_id)
    with kafka.admin() as admin:
        admin.ensure_run_topics(topics, 2)
    outsider = kafka.plain_producer()
    outsider.send(topics.prompts, b"garbage prompt", partition=1)
    outsider.send(topics.samples, b"\x00\xffnot json at all", partition=0)
    outsider.send(topics.samples, json.dumps({"schema": "specstream.unknown/1", "run_id": run_id}).encode(), partition=1)
    outsider.flush()
    outsider.close()

    code, out = wait_exit(spawn(["run", "--config", str(path)]), timeout_s=300)
    assert code == 0, out

    everything = _dlq("--config", str(path))
    stages = sorted(letter["stage"] for letter in everything["letters"])
    assert everything["count"] == 6 and stages == ["generate"] + ["source"] * 3 + ["train"] * 2, everything
    assert sum(group["count"] for group in everything["by_reason"]) == 6
    train = {(x["partition"], x["offset"]) for x in everything["letters"] if x["stage"] == "train"}
    assert train == {(0, 0), (1, 0)}  # where each stray sits in the samples topic
    stray = next(x for x in everything["letters"] if x["stage"] == "train" and x["partition"] == 0)
    assert stray["error"] == "DecodeError" and "not a UTF-8 JSON document" in stray["reason"]
    assert "not json at all" in stray["excerpt"]
    # The two unparsable lines (17 and 19) are one cause; the wrong-shape line is another.
    source_groups = sorted(g["count"] for g in everything["by_reason"] if g["stage"] == "source")
    assert source_groups == [1, 2], everything["by_reason"]

    train_only = _dlq("--config", str(path), "--stage", "train")
    assert train_only["count"] == 2 and {x["stage"] for x in train_only["letters"]} == {"train"}
    unknown = _dlq("--run-id", run_id, "--bootstrap", kafka.bootstrap_servers, "--reason", "UNKNOWN SCHEMA")
    assert unknown["count"] == 1 and unknown["letters"][0]["partition"] == 1
    capped = _dlq("--config", str(path), "--limit", "2")
    assert capped["count"] == 6 and len(capped["letters"]) == 2 and capped["by_reason"] == everything["by_reason"]

    code, text = wait_exit(spawn(["status", "--config", str(path), "--json"]), timeout_s=60)
    assert code == 0, text
    status = json.loads(text[text.index("{") :])
    assert status["dead_letters"] == 6, status
    by_reason = {(g["stage"], g["reason"]): g["count"] for g in status["dead_letters_by_reason"]}
    assert by_reason == {(g["stage"], g["reason"]): g["count"] for g in everything["by_reason"]}

    code, text = wait_exit(spawn(["dlq", "--config", str(path), "--run-id", "no-such-run"]), timeout_s=60)
    assert code != 0 and "run no-such-run has no topics on this broker" in one_error(text), text
    code, text = wait_exit(spawn(["dlq", "--config", str(path), "--stage", "nope"]), timeout_s=60)
    assert code != 0 and "--stage" in text and "source, generate, train" in text, text
    code, text = wait_exit(spawn(["dlq", "--config", str(path)]), timeout_s=60)
    assert code == 0 and "6 dead letters" in text and "by reason:" in text and "[train] DecodeError" in text, text
