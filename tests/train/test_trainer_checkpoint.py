"""Checkpoints: atomic publication, newest-first discovery, keep-last, and refusal of foreign ones."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from pipeline.core.errors import RunMismatchError
from pipeline.train.checkpoint import STATE_FILE, CheckpointManager, config_hash

CONFIG = {"batch_size": 2, "grad_accum": 2, "lr": 1e-3, "world_size": 1}


def save(
    manager: CheckpointManager,
    step: int,
    *,
    end: bool = False,
    config: dict | None = None,
    world_size: int = 1,
    **kwargs: object,
):
    config = config or CONFIG
    return manager.save(
        step,
        end=end,
        model={"fc.weight": torch.full((2, 2), float(step))},
        state={"optimizer": {"state": {}, "param_groups": []}, "step": step},
        meta={"config": config, "config_hash": config_hash(config), "world_size": world_size},
        interval=[f"features/0/s{step}.safetensors"],
        **kwargs,  # type: ignore[arg-type]
    )


def test_a_crash_before_publication_leaves_no_checkpoint(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    save(manager, 2)

    def die(_tmp: Path) -> None:
        raise KeyboardInterrupt("killed while writing")

    with pytest.raises(KeyboardInterrupt):
        save(manager, 4, before_publish=die)
    assert [i.step for i in manager.list()] == [2]
    assert [p.name for p in tmp_path.iterdir()] == ["step-000000002"]  # the temp dir is gone too


def test_leftover_temp_dirs_are_ignored_and_swept(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    save(manager, 2)
    (tmp_path / ".tmp-step-000000004-deadbeef").mkdir()  # SIGKILL mid-write leaves this
    (tmp_path / "step-000000006").mkdir()  # no meta.json: not a complete checkpoint
    assert manager.latest().step == 2  # type: ignore[union-attr]
    assert manager.sweep_temp() == 1
    assert not (tmp_path / ".tmp-step-000000004-deadbeef").exists()


def test_latest_is_the_end_checkpoint_of_the_newest_step(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in (2, 4, 6):
        save(manager, step)
    save(manager, 6, end=True)
    assert [(i.step, i.end) for i in manager.list()] == [(2, False), (4, False), (6, False), (6, True)]
    assert [(i.step, i.end) for i in manager.retained()] == [(6, False), (6, True)]
    loaded = manager.load(manager.latest(), config=CONFIG, world_size=1)  # type: ignore[arg-type]
    assert loaded.step == 6 and loaded.info.end
    assert torch.equal(loaded.model["fc.weight"], torch.full((2, 2), 6.0))
    assert loaded.state["step"] == 6


def test_a_checkpoint_of_another_config_is_refused_with_the_difference(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    info = save(manager, 2)
    with pytest.raises(RunMismatchError, match=r"batch_size: checkpoint 2 != this run 4"):
        manager.load(info, config={**CONFIG, "batch_size": 4}, world_size=1)


def test_a_checkpoint_of_another_world_size_is_refused(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    info = save(manager, 2, world_size=2)
    with pytest.raises(RunMismatchError, match="2 trainer ranks, this run has 1"):
        manager.load(info, config=CONFIG, world_size=1)


class _Evil:
    def __reduce__(self):  # what a tampered state.pt could carry
        return (print, ("pwned",))


def test_state_is_loaded_with_weights_only(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    info = save(manager, 2)
    torch.save({"optimizer": _Evil()}, info.path / STATE_FILE)
    with pytest.raises(pickle.UnpicklingError):
        manager.load(info, config=CONFIG, world_size=1)
