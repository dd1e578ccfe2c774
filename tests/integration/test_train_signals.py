"""SIGTERM while the trainer waits for data: it finishes the step, checkpoints, commits, exits 0;
a second SIGINT (Ctrl-C twice) ends it at once with 130.

The samples topic holds 12 refs and no end-of-stream marker, so after 6 steps (2 samples each)
the trainer blocks waiting for more. SIGTERM then must not wait for data that never comes.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from pipeline.core.topics import RunTopics
from pipeline.train.checkpoint import CheckpointManager
from pipeline.transport.kafka import KafkaAdmin, KafkaSettings
from tests.support import wait_for_output
from tests.train_support import (
    publish_open_stream,
    spawn_train,
    train_cmd,
    wait_for_step,
    wait_train,
    write_run_vocab,
    write_tiny_target,
)

pytestmark = pytest.mark.integration


def test_sigterm_while_waiting_for_data_checkpoints_and_exits_zero(
    kafka: KafkaSettings, run_topics: RunTopics, storage_root: str, tmp_path: Path
) -> None:
    run_id = run_topics.run_id
    publish_open_stream(kafka, run_id, storage_root, 4, 12)
    write_run_vocab(storage_root, run_id)
    proc = spawn_train(
        train_cmd(
            tmp_path / "run.yaml",
            kafka=kafka,
            run_id=run_id,
            storage=storage_root,
            out=tmp_path / "out",
            target=write_tiny_target(tmp_path / "target"),
            train={"batch_size": 2, "ttt_steps": 2, "lr_schedule": "constant", "save_interval": 100},
        )
    )
    wait_for_step(kafka, run_id, proc, 6)
    proc.send_signal(signal.SIGTERM)
    code, out = wait_train(proc, timeout_s=60)
    assert code == 0, out[-4000:]
    assert "stopped at step 6" in out, out[-4000:]
    latest_ckpt = CheckpointManager(tmp_path / "out" / "checkpoints").latest()
    assert latest_ckpt is not None and (latest_ckpt.step, latest_ckpt.end) == (6, False)
    with KafkaAdmin(kafka) as admin:
        committed = admin.group_offsets(run_topics.trainer_group, run_topics.samples)
    assert {p: c.offset for p, c in committed.items()} == {0: 3, 1: 3, 2: 3, 3: 3}
    assert {c.metadata for c in committed.values()} == {"step=6"}


def test_a_second_sigint_ends_a_waiting_trainer_at_once_with_130(
    kafka: KafkaSettings, run_topics: RunTopics, storage_root: str, tmp_path: Path
) -> None:
    run_id = run_topics.run_id
    publish_open_stream(kafka, run_id, storage_root, 4, 4)  # two steps, then it waits for data
    write_run_vocab(storage_root, run_id)
    proc = spawn_train(
        train_cmd(
            tmp_path / "run.yaml", kafka=kafka, run_id=run_id, storage=storage_root, out=tmp_path / "out",
            target=write_tiny_target(tmp_path / "target"),
            train={"batch_size": 2, "ttt_steps": 2, "lr_schedule": "constant", "save_interval": 100},
        )
    )  # fmt: skip
    wait_for_step(kafka, run_id, proc, 2)
    proc.send_signal(signal.SIGINT)
    wait_for_output(proc, r"SIGINT: finishing the current step", timeout_s=30)
    proc.send_signal(signal.SIGINT)
    sent = time.monotonic()
    code, out = wait_train(proc, timeout_s=30)
    assert code == 130, out[-4000:]
    assert time.monotonic() - sent < 5
    assert "SIGINT again: exiting now" in out and "optimizer steps" not in out, out[-4000:]
