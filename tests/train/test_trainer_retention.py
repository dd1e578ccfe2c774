"""Retention: feature files go only when no retained checkpoint can need them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.train.checkpoint import CheckpointManager
from pipeline.train.retention import apply_retention


def uri(n: int) -> str:
    return f"features/0/s{n:03d}.safetensors"


def checkpoint(manager: CheckpointManager, step: int, consumed: range) -> None:
    """A checkpoint whose interval holds the samples consumed since the previous one."""
    manager.save(
        step,
        end=False,
        model={"w": torch.zeros(1)},
        state={},
        meta={"world_size": 1},
        interval=[uri(n) for n in consumed],
    )


def test_delete_removes_exactly_the_files_before_the_oldest_retained_checkpoint(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=2)
    deleted: list[str] = []
    checkpoint(manager, 2, range(4))
    apply_retention(manager, "delete", deleted.append)
    # Only checkpoint 2 exists: it resumes at sample 4, so samples 0-3 are no longer needed.
    assert deleted == [uri(n) for n in range(4)]
    checkpoint(manager, 4, range(4, 8))
    report = apply_retention(manager, "delete", deleted.append)
    # Retained: 2 and 4. Resuming from 2 needs samples 4-7: nothing new may go.
    assert report.checkpoints_removed == [] and len(deleted) == 4
    checkpoint(manager, 6, range(8, 12))
    report = apply_retention(manager, "delete", deleted.append)
    # Retained: 4 and 6; checkpoint 2 is pruned; samples 4-7 are before checkpoint 4's positions.
    assert report.checkpoints_removed == ["step-000000002"]
    assert sorted(deleted) == [uri(n) for n in range(8)]
    assert [i.step for i in manager.list()] == [4, 6]


def test_retain_prunes_checkpoints_but_keeps_every_file(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=1)
    deleted: list[str] = []
    for step in (2, 4, 6):
        checkpoint(manager, step, range(step * 2 - 4, step * 2))
        apply_retention(manager, "retain", deleted.append)
    assert deleted == []
    assert [i.step for i in manager.list()] == [6]


def test_a_crash_during_deletion_repeats_harmlessly_and_never_loses_a_needed_file(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=1)
    checkpoint(manager, 2, range(4))
    checkpoint(manager, 4, range(4, 8))
    calls: list[str] = []

    def crash_on_third(u: str) -> None:
        calls.append(u)
        if len(calls) == 3:
            raise OSError("storage went away")

    with pytest.raises(OSError):
        apply_retention(manager, "delete", crash_on_third)
    assert [i.step for i in manager.list()] == [2, 4]  # nothing pruned before its files are gone
    deleted: list[str] = []
    apply_retention(manager, "delete", deleted.append)
    assert sorted(set(calls[:2] + deleted)) == [uri(n) for n in range(8)]
    assert [i.step for i in manager.list()] == [4]
    again: list[str] = []
    apply_retention(manager, "delete", again.append)
    assert again == []  # marked done: no repeated deletes on every checkpoint


def test_unknown_policy_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="retention policy"):
        apply_retention(CheckpointManager(tmp_path), "forever", lambda u: None)  # type: ignore[arg-type]
