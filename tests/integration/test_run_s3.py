"""A whole run on object storage: features (``storage.root``) and checkpoints, metrics and the
export (``train.output_dir``) on a real S3 server (moto's server mode), with one ``specstream run``
process that reaches it through the config's ``storage.options`` alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipeline.storage import FeatureStore
from pipeline.train.ckpt_objects import ObjectCheckpoints
from pipeline.train.export import load_exported
from pipeline.train.metrics import read_metrics
from tests.integration.test_runtime import write_config
from tests.support import spawn, wait_exit

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def s3_config(tmp_path: Path, kafka, run_id: str, target: Path, s3_root, **train) -> Path:
    path = write_config(
        tmp_path, kafka, run_id, target, conversations=24,
        storage={"root": f"{s3_root.url}/features", "options": s3_root.options},
        train={"output_dir": f"{s3_root.url}/out", **train},
    )  # fmt: skip
    assert "endpoint_url" in path.read_text()  # the subprocess learns the endpoint from the config
    return path


def test_a_whole_run_on_s3_then_a_resume_from_its_checkpoint(
    kafka, run_id, tmp_path, tiny_target_dir, s3_root, monkeypatch
) -> None:
    monkeypatch.setenv("SPECSTREAM_HOME", str(tmp_path / "home"))  # the local metrics mirror goes here
    path = s3_config(tmp_path, kafka, run_id, tiny_target_dir, s3_root, max_steps=3, lr_schedule="constant")
    code, out = wait_exit(spawn(["run", "--config", str(path)]), timeout_s=300)
    assert code == 0, out
    assert not (tmp_path / "out").exists() and not (tmp_path / "features").exists()  # nothing on local disk

    fs, out_url = s3_root.fs(), f"{s3_root.url}/out"
    manager = ObjectCheckpoints(f"{out_url}/checkpoints", storage_options=s3_root.options)
    assert [i.step for i in manager.list()][-1] == 3
    assert fs.exists(f"{out_url}/checkpoints/step-000000003/MANIFEST.json")
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_bytes(fs.cat_file(f"{out_url}/metrics.jsonl"))
    assert [r["step"] for r in read_metrics(metrics)] == [1, 2, 3]
    export = tmp_path / "export"
    fs.get(f"{out_url}/export/", str(export), recursive=True)
    assert json.loads((export / "config.json").read_text())["architectures"] == ["LlamaForCausalLMEagle3"]
    assert load_exported(export, tiny_target_dir) is not None
    # `specstream export` of a named S3 checkpoint, to a local directory.
    step3 = f"{out_url}/checkpoints/step-000000003"
    code, out = wait_exit(spawn(["export", "--config", str(path), "--checkpoint", step3, "--out", str(tmp_path / "e2")]))
    assert code == 0, out
    assert load_exported(tmp_path / "e2", tiny_target_dir) is not None
    store = FeatureStore(f"{s3_root.url}/features", run_id, storage_options=s3_root.options)
    assert store.list()  # the generators' features are in the bucket

    # A second attempt resumes from the S3 checkpoint (a fresh local mirror: another machine).
    monkeypatch.setenv("SPECSTREAM_HOME", str(tmp_path / "home2"))
    raw = yaml.safe_load(path.read_text())
    raw["train"]["max_steps"] = 5
    path.write_text(yaml.safe_dump(raw))
    code, out = wait_exit(spawn(["run", "--config", str(path)]), timeout_s=300)
    assert code == 0, out
    assert "checkpoint step 3" in out
    assert [i.step for i in manager.list()][-1] == 5
    metrics.write_bytes(fs.cat_file(f"{out_url}/metrics.jsonl"))
    assert [r["step"] for r in read_metrics(metrics)] == [1, 2, 3, 4, 5]
