"""``train_groups``: each group validated like ``train`` (errors name ``train_groups.<name>.<key>``),
its own train section and output dir, the fingerprint and topics of a run without groups unchanged."""

from __future__ import annotations

from typing import Any

import pytest

from pipeline.app.config_file import parse_config
from pipeline.app.config_groups import group_config, group_names, topic_policy, widest_train
from pipeline.core.errors import ConfigError
from pipeline.core.topic_plan import run_topic_plan
from pipeline.core.topics import RunTopics
from pipeline.generate.backlog import slowest

BASE: dict[str, Any] = {"run_id": "r1", "data": {"path": "x.jsonl"}, "target": {"backend": "synthetic"},
                        "train": {"output_dir": "/out", "ttt_steps": 5}}  # fmt: skip
GROUPS = {"deep": {"ttt_steps": 7}, "shallow": {"ttt_steps": 3, "lr": 3e-4}}


@pytest.fixture(autouse=True)
def _no_environment_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SPECSTREAM_BOOTSTRAP_SERVERS", "KAFKA_BOOTSTRAP_SERVERS", "SPECSTREAM_DEVICE"):
        monkeypatch.delenv(name, raising=False)


def test_each_group_is_the_train_section_with_its_overrides_and_its_own_output_dir() -> None:
    cfg = parse_config({**BASE, "train_groups": GROUPS})
    assert group_names(cfg) == ("deep", "shallow")
    deep, shallow = group_config(cfg, "deep"), group_config(cfg, "shallow")
    assert (deep.train.ttt_steps, deep.train.lr, deep.train.output_dir) == (7, 1e-4, "/out/deep")
    assert (shallow.train.ttt_steps, shallow.train.lr, shallow.train.output_dir) == (3, 3e-4, "/out/shallow")
    assert deep.train_groups == {} and cfg.train.output_dir == "/out"
    own = parse_config({**BASE, "train_groups": {"a": {"output_dir": "/elsewhere"}}})
    assert group_config(own, "a").train.output_dir == "/elsewhere"  # a group's own output_dir, as given


def test_a_run_without_groups_is_the_run_of_before() -> None:
    cfg = parse_config(BASE)
    assert group_names(cfg) == (None,) and group_config(cfg, None) is cfg
    assert "train_groups" not in cfg.fingerprint_values()  # older manifests still match
    grouped = parse_config({**BASE, "train_groups": GROUPS})
    assert grouped.fingerprint() != cfg.fingerprint()
    assert isinstance(grouped.fingerprint_values()["train_groups"], str)  # the manifest stores plain values
    plan = run_topic_plan(RunTopics("r1"), 4, topic_policy(cfg))
    assert sorted(plan) == sorted(["r1.prompts", "r1.samples", "r1.ledger", "r1.dlq", "r1.manifest", "r1.heartbeats"])
    assert RunTopics("r1").trainer_group == "r1.trainers"


def test_each_group_has_its_own_ledger_topic_and_consumer_group() -> None:
    cfg = parse_config({**BASE, "train_groups": GROUPS})
    plan = run_topic_plan(RunTopics("r1"), 4, topic_policy(cfg))
    assert {"r1.ledger.deep", "r1.ledger.shallow", "r1.ledger"} <= set(plan)
    assert plan["r1.ledger.deep"].partitions == 1 and plan["r1.ledger.deep"].configs["retention.ms"] == "-1"
    assert RunTopics("r1", "deep").trainer_group == "r1.trainers.deep"
    assert RunTopics("r1", "deep").samples == "r1.samples"  # one stream for every group


@pytest.mark.parametrize(
    ("groups", "key", "words"),
    [
        ({"deep": {"ttt_step": 3}}, "train_groups.deep.ttt_step", "did you mean `ttt_steps`"),
        ({"deep": {"lr": -1}}, "train_groups.deep.lr", "greater than 0"),
        ({"deep": {"device": "gpu"}}, "train_groups.deep.device", "did you mean `cuda`"),
        ({"a.b": {}}, "train_groups.a.b", "not a valid group name"),
        ({"deep": 3}, "train_groups.deep", "dictionary"),
        ({"deep": {"batch_size": 400}}, "generate.high_watermark", "with trainer group 'deep'"),
        ({"a": {"output_dir": "/x"}, "b": {"output_dir": "/x"}}, "train_groups", "share an output_dir"),
    ],
)  # fmt: skip
def test_a_bad_group_is_one_error_naming_its_key(groups: dict[str, Any], key: str, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({**BASE, "train_groups": groups})
    assert caught.value.key == key and words in str(caught.value), str(caught.value)


def test_an_undeclared_group_is_refused() -> None:
    with pytest.raises(ConfigError, match="'wide' is not a declared trainer group"):
        group_config(parse_config({**BASE, "train_groups": GROUPS}), "wide")


def test_the_generators_leave_room_for_the_widest_group_and_follow_the_slowest() -> None:
    cfg = parse_config({**BASE, "generate": {"high_watermark": 512}, "train_groups": {"a": {}, "b": {"batch_size": 4}}})
    assert widest_train(cfg).batch_size == 4
    assert slowest([{0: 10, 1: 4}, {0: 6}, {0: 8, 1: 9}]) == {0: 6, 1: 0}  # a group without partition 1: 0
    assert slowest([{}]) == {}
