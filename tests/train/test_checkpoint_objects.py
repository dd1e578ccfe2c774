"""Checkpoints on an object store: published by a manifest written last, trusted only when complete.

Each behaviour runs on fsspec's in-memory filesystem and on a real S3 server (moto's server mode).
"""

from __future__ import annotations

import json
import uuid

import pytest
import torch

from pipeline.core.errors import StreamError
from pipeline.train.checkpoint import INTERVAL_FILE, MODEL_FILE, config_hash
from pipeline.train.ckpt_objects import (
    MANIFEST_FILE,
    ObjectCheckpoints,
    open_checkpoints,
    read_checkpoint_file,
)
from pipeline.train.retention import apply_retention
from tests.train.test_trainer_checkpoint import CONFIG, save


@pytest.fixture(params=["memory", pytest.param("s3", marks=pytest.mark.integration)])
def where(request) -> tuple[str, dict]:
    """A checkpoint root URL and its storage options."""
    if request.param == "memory":
        return f"memory://ck-{uuid.uuid4().hex[:8]}/checkpoints", {}
    s3_root = request.getfixturevalue("s3_root")
    return f"{s3_root.url}/checkpoints", s3_root.options


def manager_at(where: tuple[str, dict], **kwargs) -> ObjectCheckpoints:
    manager = open_checkpoints(where[0], storage_options=where[1], **kwargs)
    assert isinstance(manager, ObjectCheckpoints)
    return manager


def test_save_list_load_round_trip(where) -> None:
    manager = manager_at(where)
    save(manager, 2)
    save(manager, 4, end=True)
    assert [(i.step, i.end) for i in manager.list()] == [(2, False), (4, True)]
    latest = manager.latest()
    assert latest is not None and str(latest.path) == f"{where[0]}/step-000000004-end"
    other = manager_at(where)  # another machine: a fresh client finds the same checkpoints
    loaded = other.load(other.find(str(latest.path)), config=CONFIG, world_size=1)
    assert torch.equal(loaded.model["fc.weight"], torch.full((2, 2), 4.0)) and loaded.state["step"] == 4
    assert other.interval(latest) == ["features/0/s4.safetensors"]
    assert read_checkpoint_file(str(latest.path), INTERVAL_FILE, where[1]) == b'["features/0/s4.safetensors"]'


def test_a_crash_before_the_manifest_leaves_no_checkpoint_and_is_swept(where) -> None:
    manager = manager_at(where)
    save(manager, 2)
    unpublished = []

    def die(prefix: str) -> None:
        unpublished.append(prefix)
        raise KeyboardInterrupt("killed while writing")

    with pytest.raises(KeyboardInterrupt):
        save(manager, 4, before_publish=die)
    fs, root = manager.fs, manager.root
    assert fs.find(f"{root}/step-000000004")  # every file of step 4 is stored, but no manifest
    assert [i.step for i in manager.list()] == [2] and manager.latest().step == 2  # type: ignore[union-attr]
    assert manager.sweep_temp() == 1
    assert fs.find(f"{root}/step-000000004") == [] and [i.step for i in manager.list()] == [2]


def test_a_manifest_that_does_not_match_its_files_is_not_trusted(where) -> None:
    manager = manager_at(where)
    info = save(manager, 2)
    save(manager, 4)
    manifest = json.loads(manager.fs.cat_file(f"{manager.root}/step-000000004/{MANIFEST_FILE}"))
    model_key = f"{manager.root}/step-000000004/{manifest['token']}/{MODEL_FILE}"
    data = manager.fs.cat_file(model_key)
    manager.fs.pipe_file(model_key, data[:-4])  # truncated: the sizes no longer match
    assert [i.step for i in manager.list()] == [2]
    flipped = bytearray(data)
    flipped[-1] ^= 0xFF  # same size, other bytes: listed, refused on load
    manager.fs.pipe_file(model_key, bytes(flipped))
    assert [i.step for i in manager.list()] == [2, 4]
    with pytest.raises(StreamError, match="does not match its manifest"):
        manager.load(manager.latest(), config=CONFIG, world_size=1)  # type: ignore[arg-type]
    assert manager.load(info, config=CONFIG, world_size=1).step == 2


def test_resaving_a_step_replaces_it_and_removes_the_old_files(where) -> None:
    manager = manager_at(where)
    save(manager, 2)
    first = json.loads(manager.fs.cat_file(f"{manager.root}/step-000000002/{MANIFEST_FILE}"))["token"]
    manager.save(2, end=False, model={"fc.weight": torch.ones(2, 2)}, state={"step": 9},
                 meta={"config": CONFIG, "config_hash": config_hash(CONFIG), "world_size": 1}, interval=[])
    tokens = {k.split("/")[-2] for k in manager.fs.find(f"{manager.root}/step-000000002") if MANIFEST_FILE not in k}
    assert first not in tokens and len(tokens) == 1
    assert manager.load(manager.latest(), config=CONFIG, world_size=1).state["step"] == 9  # type: ignore[arg-type]


def test_retention_prunes_checkpoints_and_marks_features(where) -> None:
    manager = manager_at(where, keep_last=1)
    deleted: list[str] = []
    for step in (1, 2, 3):
        save(manager, step)
    report = apply_retention(manager, "delete", deleted.append)
    assert report.checkpoints_removed == ["step-000000001", "step-000000002"]
    assert deleted == [f"features/0/s{s}.safetensors" for s in (1, 2, 3)]
    assert [i.step for i in manager.list()] == [3] and manager.features_deleted(manager.latest())  # type: ignore[arg-type]
    assert manager.fs.find(f"{manager.root}/step-000000001") == []
    assert apply_retention(manager, "delete", deleted.append).features_deleted == 0  # idempotent
