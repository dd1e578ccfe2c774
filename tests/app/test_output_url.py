"""train.output_dir as an fsspec URL: which options reach it, where rank 0's files go, the start check."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from pipeline.app.config_file import parse_config
from pipeline.app.outputs import checkpoints, local_outputs, output_options, output_path
from pipeline.app.preflight import check_local
from pipeline.app.settings import trainer_settings
from pipeline.core.errors import ConfigError
from pipeline.train.ckpt_objects import ObjectCheckpoints
from pipeline.train.publish import OutputMirror
from tests.app.test_config import with_

OPTIONS = {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}}


def test_a_url_output_dir_reuses_the_storage_options_of_its_protocol(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SPECSTREAM_HOME", str(tmp_path))
    cfg = parse_config(with_(storage={"root": "s3://b/features", "options": OPTIONS}, train={"output_dir": "s3://b/out/"}))
    assert output_options(cfg) == OPTIONS and output_path(cfg, "checkpoints") == "s3://b/out/checkpoints"
    assert local_outputs(cfg) == tmp_path / "outputs" / "r1"
    settings = trainer_settings(cfg, schedule_steps=None)
    assert settings.checkpoint_dir == "s3://b/out/checkpoints" and settings.publish_url == "s3://b/out/"
    assert settings.metrics_path == str(tmp_path / "outputs" / "r1" / "metrics.jsonl")
    assert dict(settings.output_options) == OPTIONS
    other = parse_config(with_(storage={"root": "/data/f", "options": {"auto_mkdir": True}}, train={"output_dir": "memory://o"}))
    assert output_options(other) == {}  # another protocol: the environment's credentials, not storage's
    assert isinstance(checkpoints(other), ObjectCheckpoints)


def test_a_local_output_dir_is_unchanged(tmp_path: Path) -> None:
    cfg = parse_config(with_(train={"output_dir": str(tmp_path / "out")}))
    settings = trainer_settings(cfg, schedule_steps=None)
    assert settings.checkpoint_dir == str(tmp_path / "out" / "checkpoints") and settings.publish_url is None
    assert settings.metrics_path == str(tmp_path / "out" / "metrics.jsonl") and output_options(cfg) == {}
    assert type(checkpoints(cfg)).__name__ == "CheckpointManager"


@pytest.mark.skipif(importlib.util.find_spec("gcsfs") is not None, reason="gcsfs is installed here")
def test_an_output_url_without_its_package_names_the_key_and_the_extra(tmp_path: Path) -> None:
    cfg = parse_config(with_(storage={"root": str(tmp_path / "f")}, train={"output_dir": "gs://b/out"}))
    with pytest.raises(ConfigError) as caught:
        check_local(cfg, ("train",))
    assert caught.value.key == "train.output_dir" and "specstream[gcs]" in str(caught.value)


def test_the_mirror_publishes_a_file_again_only_when_it_changed(tmp_path: Path) -> None:
    mirror = OutputMirror(tmp_path / "mirror", f"memory://mirror-{tmp_path.name}")
    (tmp_path / "mirror").mkdir()
    (tmp_path / "mirror" / "metrics.jsonl").write_text('{"step": 1}\n')
    (tmp_path / "mirror" / "curves.png").write_bytes(b"png")
    assert mirror.push() == 2
    assert mirror.push() == 0  # nothing changed since: no PUT
    with open(tmp_path / "mirror" / "metrics.jsonl", "a") as rows:
        rows.write('{"step": 2}\n')
    assert mirror.push() == 1
    assert mirror.fs.cat_file(f"{mirror.root}/metrics.jsonl") == b'{"step": 1}\n{"step": 2}\n'
