"""The one entry point: `specstream`, also under torchrun; a wrong setting is one `error:` line,
exit 2, and nothing written. None of these reach a broker: the checks come first."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import one_error, specstream_command

UNREACHABLE = "127.0.0.1:1"  # nothing may try it: every case here fails before a client is made


def write(tmp_path: Path, **train: Any) -> Path:
    raw = {
        "run_id": "cli-run",
        "broker": {"bootstrap_servers": UNREACHABLE},
        "storage": {"root": str(tmp_path / "features")},
        "data": {"path": str(tmp_path / "data.jsonl"), "partitions": 4},
        "target": {"backend": "synthetic"},
        "train": {"output_dir": str(tmp_path / "out"), **train},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def run(cmd: list[str], *, env: dict[str, str] | None = None, timeout_s: float = 120) -> tuple[int, str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(
        cmd, env={**clean, "OMP_NUM_THREADS": "1", **(env or {})}, capture_output=True, text=True, timeout=timeout_s
    )
    return proc.returncode, proc.stdout + proc.stderr


def nothing_written(tmp_path: Path) -> bool:
    return not (tmp_path / "features").exists() and not (tmp_path / "out").exists()


def test_python_m_pipeline_train_is_gone() -> None:
    code, out = run([sys.executable, "-m", "pipeline.train", "--help"])
    assert code != 0 and "pipeline.train" in out


def test_world_size_above_one_without_torchrun_stops_at_start(tmp_path: Path) -> None:
    code, out = run([specstream_command(), "train", "--config", str(write(tmp_path, world_size=2))])
    assert code == 2, out
    line = one_error(out)
    assert "train.world_size" in line and "torchrun --nproc-per-node 2 --no-python specstream train" in line
    assert nothing_written(tmp_path)


def test_torchrun_ranks_that_disagree_with_world_size_stop_with_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, world_size=1)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    code, out = run([*launcher, "--no-python", specstream_command(), "train", "--config", str(path)], timeout_s=180)
    assert code != 0, out
    line = one_error(out, launcher_traceback=True)  # rank 0 says it; rank 1 exits quietly
    assert "train.world_size" in line and "torchrun started 2 ranks" in line and "set train.world_size: 2" in line
    assert nothing_written(tmp_path)


def test_an_unknown_client_option_stops_train_at_start(tmp_path: Path) -> None:
    path = write(tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw["broker"]["client_options"] = {"sasl.mechansim": "PLAIN"}
    path.write_text(yaml.safe_dump(raw))
    code, out = run([specstream_command(), "train", "--config", str(path)])
    assert code == 2, out
    assert "broker.client_options.sasl.mechansim" in one_error(out) and "did you mean `sasl.mechanism`" in out
    assert nothing_written(tmp_path)


def test_an_unset_variable_is_one_long_line_whatever_the_terminal(tmp_path: Path) -> None:
    path = write(tmp_path)
    path.write_text(path.read_text().replace("cli-run", "cli-run-${SPECSTREAM_T_UNSET}"))
    code, out = run([specstream_command(), "config", "check", "--config", str(path)], env={"COLUMNS": "40"})
    assert code == 2, out
    line = one_error(out)
    assert "`run_id`" in line and "SPECSTREAM_T_UNSET is not set" in line and line.endswith("in the file)")


@pytest.mark.parametrize("command", ["train", "source", "generate", "run"])
def test_every_stage_refuses_a_typo_with_exit_2(tmp_path: Path, command: str) -> None:
    path = write(tmp_path, lrate=1)
    code, out = run([specstream_command(), command, "--config", str(path)])
    assert code == 2, out
    assert "did you mean `train.lr`" in one_error(out)
    assert nothing_written(tmp_path)
