"""Two trainer ranks under torchrun (gloo, CPU) on five uneven partitions end together, without a hang.

23 samples over 5 partitions are 5,5,5,4,4; rank 0 reads partitions 0,2,4 (14 samples), rank 1
reads 1,3 (9). With 2 x 2 samples per rank per step, rank 1 runs out after 2 steps; both ranks
must stop at step 2 (one vote per step), drain their streams to the end-of-stream markers and
report the tail: 6 samples on rank 0, 1 on rank 1. The subprocess has a hard timeout: a hang fails.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import pytest

from pipeline.core.topics import RunTopics
from pipeline.ledger import effective_history, read_ledger
from pipeline.train.checkpoint import CheckpointManager
from pipeline.transport.kafka import KafkaAdmin, KafkaSettings
from tests.train_support import publish_samples, run_train, train_cmd, write_run_vocab, write_tiny_target

pytestmark = pytest.mark.integration

PARTITIONS, SAMPLES = 5, 23


@pytest.fixture
def run_topics(kafka: KafkaSettings):
    """Makes a fresh run's topics with N partitions; deletes every run it made at the end."""
    made: list[RunTopics] = []

    def make(partitions: int) -> RunTopics:
        topics = RunTopics(f"t{uuid.uuid4().hex[:12]}")
        with KafkaAdmin(kafka) as admin:
            admin.ensure_run_topics(topics, partitions)
        made.append(topics)
        return topics

    yield make
    with KafkaAdmin(kafka) as admin:
        for topics in made:
            admin.delete_topics([topics.prompts, topics.samples, topics.ledger, topics.dlq, topics.manifest])


@pytest.fixture
def five_partitions(run_topics) -> RunTopics:
    return run_topics(PARTITIONS)


def test_two_ranks_on_uneven_partitions_end_at_the_same_step(
    kafka: KafkaSettings, tmp_path: Path, five_partitions: RunTopics
) -> None:
    run_id = five_partitions.run_id
    storage = str(tmp_path / "features")
    publish_samples(kafka, run_id, storage, PARTITIONS, SAMPLES)
    write_run_vocab(storage, run_id)
    args = train_cmd(
        tmp_path / "run.yaml",
        kafka=kafka,
        run_id=run_id,
        storage=storage,
        out=tmp_path / "out",
        target=write_tiny_target(tmp_path / "target"),
        retention="retain",
        train={"world_size": 2, "batch_size": 2, "grad_accum": 2, "ttt_steps": 2, "lr_schedule": "constant",
               "save_interval": 0},
    )  # the config says 4 partitions (a run config refuses 5 over 2 ranks); the topic has 5
    code, out = run_train(args, torchrun=2, timeout_s=240)
    assert code == 0, out[-6000:]
    assert "16 of 23 prompts trained, 0 missing, 0 duplicates dropped, 7 tail samples not stepped" in out, (
        out[-4000:]
    )
    ended = set(re.findall(r"rank (\d) ended at step (\d+) with (\d+) tail samples", out))
    assert ended == {("0", "2", "6"), ("1", "2", "1")}, out[-4000:]

    history = effective_history(read_ledger(kafka, run_id))
    assert [r.step for r in history] == [1, 2]
    for record in history:
        assert [len(rank.sample_ids) for rank in record.ranks] == [4, 4]
        assert [sorted(o.partition for o in rank.next_offsets) for rank in record.ranks] == [
            [0, 2, 4],
            [1, 3],
        ]

    latest = CheckpointManager(tmp_path / "out" / "checkpoints").latest()
    assert latest is not None and latest.end and latest.step == 2


def test_two_ranks_train_three_epochs_each_sample_once_per_epoch(
    kafka: KafkaSettings, tmp_path: Path, run_topics
) -> None:
    topics = run_topics(4)
    storage = str(tmp_path / "features")
    publish_samples(kafka, topics.run_id, storage, 4, 24)  # 12 samples per rank
    write_run_vocab(storage, topics.run_id)
    args = train_cmd(
        tmp_path / "run.yaml", kafka=kafka, run_id=topics.run_id, storage=storage, out=tmp_path / "out",
        target=write_tiny_target(tmp_path / "target"), retention="delete",
        train={"world_size": 2, "batch_size": 2, "ttt_steps": 2, "lr_schedule": "constant", "save_interval": 5,
               "keep_last": 1, "epochs": 3},
    )  # fmt: skip
    code, out = run_train(args, torchrun=2, timeout_s=300)
    assert code == 0, out[-6000:]
    assert "72 of 72 sample passes trained (24 prompts x 3 epochs), 0 missing" in out, out[-4000:]
    history = effective_history(read_ledger(kafka, topics.run_id))
    assert len(history) == 18 and [r.epoch for r in history] == [e for e in range(3) for _ in range(6)]
    seen = [(e, s) for r in history for rank in r.ranks for e, s in zip(rank.sample_epochs(r.epoch), rank.sample_ids)]
    assert len(seen) == len(set(seen)) == 72  # every sample once in each epoch, on its own rank
    # retention delete with keep_last 1: every feature went once the final checkpoint covered it
    assert not list((tmp_path / "features" / topics.run_id / "features").rglob("*.safetensors"))


def test_a_two_rank_run_of_two_epochs_replays_bit_identically_under_torchrun(
    kafka: KafkaSettings, tmp_path: Path, run_topics
) -> None:
    topics = run_topics(4)
    storage = str(tmp_path / "features")
    publish_samples(kafka, topics.run_id, storage, 4, 16)
    write_run_vocab(storage, topics.run_id)
    args = train_cmd(
        tmp_path / "run.yaml", kafka=kafka, run_id=topics.run_id, storage=storage, out=tmp_path / "out",
        target=write_tiny_target(tmp_path / "target"), retention="retain",
        train={"world_size": 2, "batch_size": 2, "ttt_steps": 2, "lr_schedule": "constant", "save_interval": 3,
               "deterministic": True, "epochs": 2},
    )  # fmt: skip
    code, out = run_train(args, torchrun=2, timeout_s=300)
    assert code == 0 and "32 of 32 sample passes trained (16 prompts x 2 epochs)" in out, out[-4000:]
    replay = ["replay", *args[1:], "--out", str(tmp_path / "replay")]  # args: train --config FILE
    code, out = run_train(replay, torchrun=2, timeout_s=300)
    assert code == 0, out[-6000:]
    assert out.count("8 of 8 replayed steps bit-identical to the ledger") == 1, out[-4000:]  # rank 0 alone
    assert len(read_ledger(kafka, topics.run_id)) == 8  # the replay wrote nothing to the run's ledger
