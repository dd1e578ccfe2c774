"""Config: bad settings stop at start with the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.app.config import load_config, parse_config
from pipeline.core.errors import ConfigError

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
BASE = {"run_id": "r1", "data": {"path": "x.jsonl"}, "target": {"backend": "synthetic"}}


@pytest.mark.parametrize("name", ["tiny-cpu.yaml", "production-8b.yaml"])
def test_examples_are_valid(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)
    config = load_config(EXAMPLES / name)
    assert config.global_batch >= 1 and len(config.fingerprint()) == 16


@pytest.mark.parametrize(
    ("override", "key", "fix"),
    [
        ({"trian": {}}, "trian", "did you mean `train`"),
        ({"train": {"lrate": 1}}, "train.lrate", "did you mean `train.lr`"),
        ({"target": {"backend": "hf"}}, "target.model", "local model directory"),
        ({"train": {"batch_size": "four"}}, "train.batch_size", ""),
        ({"generate": {"high_watermark": 2, "low_watermark": 1}}, "generate.high_watermark", "at least 5"),
        ({"generate": {"high_watermark": 10, "low_watermark": 20}}, "generate.low_watermark", "below"),
        ({"run_id": "no spaces"}, "run_id", ""),
        ({"generate": {"high_watermark": 64, "low_watermark": 64}}, "generate.low_watermark", ""),
        ({"data": {"path": "x", "partitions": 5}, "train": {"world_size": 2}}, "data.partitions", "multiple of 2"),
        ({"data": {"path": "x", "partitions": 3}, "train": {"batch_size": 4},
          "generate": {"high_watermark": 20, "low_watermark": 10}}, "generate.high_watermark", ">= 21"),
        ({"train": {"output_dir": "s3://bucket/out"}}, "train.output_dir", "filesystem path"),
    ],
)
def test_bad_settings_name_the_key_and_the_fix(override: dict, key: str, fix: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({**BASE, **override})
    assert info.value.key == key
    assert fix in str(info.value)


def test_missing_section(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="`data`: is required"):
        parse_config({"run_id": "r", "target": {"backend": "synthetic"}})


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run_id: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_environment_overrides_broker_and_storage(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "k:9092")
    monkeypatch.setenv("SPECSTREAM_STORAGE", "memory://x")
    config = parse_config(BASE)
    assert config.broker.bootstrap_servers == "k:9092" and config.storage.root == "memory://x"


def test_fingerprint_ignores_where_the_run_executes() -> None:
    a = parse_config({**BASE, "broker": {"bootstrap_servers": "a:1"}})
    b = parse_config({**BASE, "broker": {"bootstrap_servers": "b:2"}})
    c = parse_config({**BASE, "train": {"lr": 0.5}})
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
