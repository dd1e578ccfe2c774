"""``specstream generate --device``: one generator process per GPU, each with its own device,
from one shared config file; the device is not part of the run's fingerprint."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.app.cli_common import with_device
from pipeline.app.config_file import parse_config
from pipeline.core.errors import ConfigError
from tests.support import one_error, spawn, wait_exit

BASE = {"run_id": "r1", "data": {"path": "x.jsonl"}, "target": {"backend": "synthetic", "device": "cuda"}}


def test_each_process_gets_its_own_device_and_the_same_fingerprint() -> None:
    cfg = parse_config(BASE)
    per_gpu = [with_device(cfg, f"cuda:{i}") for i in range(4)]
    assert [c.target.device for c in per_gpu] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert {c.fingerprint() for c in per_gpu} == {cfg.fingerprint()}
    assert with_device(cfg, None) is cfg
    with pytest.raises(ConfigError) as caught:
        with_device(cfg, "gpu1")
    assert caught.value.key == "target.device" and "cuda:N" in str(caught.value)


def test_a_bad_device_flag_is_one_error_line(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**BASE, "broker": {"bootstrap_servers": "memory"}}))
    code, out = wait_exit(spawn(["generate", "--config", str(config), "--device", "gpu"]), timeout_s=60)
    assert code == 2, out
    assert "`target.device`" in one_error(out) and "did you mean `cuda`" in out, out
