"""The eval set's keys: checked at start, and wired into each stage's settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.app.config_file import parse_config
from pipeline.app.preflight import check_local
from pipeline.app.settings import generator_settings, source_settings, trainer_settings
from pipeline.core.errors import ConfigError
from pipeline.core.topics import RunTopics


def _raw(tmp_path: Path, **data: object) -> dict[str, object]:
    conversations = tmp_path / "data.jsonl"
    conversations.write_text("")
    return {"run_id": "r1", "storage": {"root": str(tmp_path / "features")},
            "data": {"path": str(conversations), **data}, "target": {"backend": "synthetic"},
            "train": {"output_dir": str(tmp_path / "out"), "eval_interval": 7}}  # fmt: skip


def test_a_missing_eval_file_is_named_at_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        check_local(parse_config(_raw(tmp_path, eval_path=str(tmp_path / "nope.jsonl"))), ("source",))
    assert info.value.key == "data.eval_path" and "nope.jsonl does not exist" in str(info.value)


def test_the_eval_set_reaches_every_stage_as_the_eval_sub_run(tmp_path: Path) -> None:
    held_out = tmp_path / "eval.jsonl"
    held_out.write_text("")
    cfg = parse_config(_raw(tmp_path, eval_path=str(held_out)))
    check_local(cfg, ("source",))
    assert RunTopics("r1").eval_prompts == "r1.eval.prompts" and RunTopics("r1").eval_samples == "r1.eval.samples"
    assert source_settings(cfg).eval_data == str(held_out)
    assert generator_settings(cfg, "g", None).eval_run_id == "r1.eval"
    trainer = trainer_settings(cfg, schedule_steps=None)
    assert (trainer.eval_run_id, trainer.eval_interval) == ("r1.eval", 7)
    assert trainer.eval_metrics_path == str(tmp_path / "out" / "eval.jsonl")

    plain = parse_config(_raw(tmp_path))
    assert source_settings(plain).eval_data is None and generator_settings(plain, "g", None).eval_run_id is None
    assert trainer_settings(plain, schedule_steps=None).eval_run_id is None


def test_the_worker_of_partition_0_or_every_group_member_captures_the_eval_set() -> None:
    from pipeline.generate.config import GeneratorConfig
    from pipeline.generate.eval_capture import eval_config

    def capture(partitions: list[int] | None) -> list[int] | None | str:
        found = eval_config(GeneratorConfig("r1", "g", partitions=partitions, eval_run_id="r1.eval"))
        return "skip" if found is None else found.partitions

    assert (capture([0, 2]), capture([1, 3]), capture(None)) == ([0], "skip", None)
    found = eval_config(GeneratorConfig("r1", "g", partitions=[0], eval_run_id="r1.eval"))
    assert found is not None and (found.run_id, found.eval_run_id, found.backpressure) == ("r1.eval", None, None)
    assert eval_config(GeneratorConfig("r1", "g", partitions=[0])) is None
