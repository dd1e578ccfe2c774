"""Resuming from a checkpoint on a real S3 server is bit-identical to a straight run, and rank 0's
metrics are published beside the checkpoints (train.output_dir on an object store)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.train.ckpt_objects import ObjectCheckpoints
from pipeline.train.metrics import read_metrics
from pipeline.train.model import ModelSpec
from pipeline.train.resume import trainable_state
from tests.train.test_trainer_loop import Ledger, losses, make_trainer, model_files  # noqa: F401 (fixture)

pytestmark = pytest.mark.integration


def test_resuming_from_an_s3_checkpoint_is_bit_identical(model_files: ModelSpec, tmp_path: Path, s3_root) -> None:  # noqa: F811
    straight_trainer = make_trainer(model_files, tmp_path / "a")
    straight = straight_trainer.run()

    out = f"{s3_root.url}/out"
    remote = {"checkpoint_dir": f"{out}/checkpoints", "output_options": s3_root.options, "publish_url": out}
    ledger, deleted = Ledger(), []
    first = make_trainer(model_files, tmp_path / "b", ledger=ledger, deleted=deleted, max_steps=4, **remote).run()
    assert (first.reason, first.step) == ("max_steps", 4)
    assert first.checkpoint == f"{out}/checkpoints/step-000000004"
    assert not (tmp_path / "b" / "checkpoints").exists()  # nothing local but the metrics mirror
    # Another machine (a fresh mirror directory, a fresh S3 client) resumes from the bucket alone.
    second_trainer = make_trainer(model_files, tmp_path / "c", ledger=ledger, deleted=deleted, **remote)
    second = second_trainer.run()
    assert losses(first) + losses(second) == losses(straight)
    a, b = trainable_state(straight_trainer.draft), trainable_state(second_trainer.draft)
    assert all(torch.equal(a[k], b[k]) for k in a)

    fs = s3_root.fs()
    published = tmp_path / "published.jsonl"
    published.write_bytes(fs.cat_file(f"{out}/metrics.jsonl"))
    assert [r["step"] for r in read_metrics(published)] == list(range(1, 8))  # continued across machines
    manager = ObjectCheckpoints(f"{out}/checkpoints", storage_options=s3_root.options)
    assert [i.name for i in manager.list()] == ["step-000000007-end"]  # keep_last=1
