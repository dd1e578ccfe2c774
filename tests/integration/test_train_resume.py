"""Exact resume on the real broker: SIGKILL between two checkpoints, resume, compare with a straight run.

Two runs read identical samples (same prompts, same synthetic features; only the run ids differ).
Run A trains straight to the end of the stream. Run B is SIGKILLed after step 5 (checkpoints every
2 steps, so the last one is step 4) and resumed. B's losses and final weights must equal A's bit for
bit (CPU, deterministic algorithms), its ledger must hold every sample exactly once, the trainer
group's offsets must carry ``step=N``, and retention (``delete``, keep 1) must have removed exactly
the feature files no retained checkpoint needs, at the crash as at the end.
"""

from __future__ import annotations

import json
import signal
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.core.messages import SampleRef
from pipeline.core.topics import RunTopics
from pipeline.ledger import effective_history, latest_ledger_step, read_ledger
from pipeline.storage import FeatureStore
from pipeline.train.checkpoint import CheckpointManager
from pipeline.train.metrics import read_metrics
from pipeline.transport.kafka import KafkaAdmin, KafkaSettings
from tests.support import read_messages
from tests.train_support import publish_samples, run_train, train_cmd, write_run_vocab, write_tiny_target

pytestmark = pytest.mark.integration

SAMPLES, PARTITIONS = 26, 4  # 6 steps of 2 x 2 samples, 2 tail samples
COMMON = {
    "batch_size": 2, "grad_accum": 2, "lr": 3e-3, "lr_schedule": "constant", "warmup_ratio": 0.0,
    "ttt_steps": 3, "max_length": 64, "save_interval": 2, "deterministic": True,
}  # fmt: skip


@pytest.fixture
def two_runs(kafka: KafkaSettings, tmp_path: Path):
    """Run ids A and B with identical samples; topics deleted afterwards."""
    base = f"t{uuid.uuid4().hex[:10]}"
    runs = {name: RunTopics(f"{base}{name}") for name in ("a", "b")}
    storage = str(tmp_path / "features")
    with KafkaAdmin(kafka) as admin:
        for topics in runs.values():
            admin.ensure_run_topics(topics, PARTITIONS)
    for topics in runs.values():
        publish_samples(kafka, topics.run_id, storage, PARTITIONS, SAMPLES)
    yield runs, storage
    with KafkaAdmin(kafka) as admin:
        for t in runs.values():
            admin.delete_topics([t.prompts, t.samples, t.ledger, t.dlq, t.manifest])


def _sample_refs(kafka: KafkaSettings, run_id: str) -> list[SampleRef]:
    got = read_messages(
        kafka,
        RunTopics(run_id).samples,
        range(PARTITIONS),
        until=lambda out: sum(1 for _, m in out if isinstance(m, SampleRef)) >= SAMPLES,
        timeout_s=60,
    )
    return [m for _, m in got if isinstance(m, SampleRef)]


def _suffix(sample_id: str) -> str:
    return sample_id.split(".", 1)[1]  # drop the run id: A and B name the same prompt alike


def test_sigkill_between_checkpoints_resumes_bit_identically(
    kafka: KafkaSettings, tmp_path: Path, two_runs
) -> None:
    runs, storage = two_runs
    target = write_tiny_target(tmp_path / "target")
    a, b = runs["a"].run_id, runs["b"].run_id
    for run_id in (a, b):
        write_run_vocab(storage, run_id)

    def cmd(run_id: str, name: str, retention: str, **train: object) -> list[str]:
        return train_cmd(
            tmp_path / f"{name}.yaml",
            kafka=kafka,
            run_id=run_id,
            storage=storage,
            out=tmp_path / f"out-{name}",
            target=target,
            retention=retention,
            train={**COMMON, **train},
        )

    code, out_a = run_train(cmd(a, "a", "retain"))
    assert code == 0, out_a
    assert "24 of 26 prompts trained, 0 missing, 0 duplicates dropped, 2 tail samples not stepped" in out_a

    # B: killed after step 5, between the checkpoints of steps 4 and 6.
    b_args = cmd(b, "b", "delete", keep_last=1)
    code, out_b1 = run_train(b_args, env={"SPECSTREAM_CRASH_AT": "train.after_step:5"})
    assert code == -signal.SIGKILL, out_b1
    manager = CheckpointManager(tmp_path / "out-b" / "checkpoints", keep_last=1)
    assert [(i.step, i.end) for i in manager.list()] == [(4, False)]
    store = FeatureStore(storage, b)
    refs_b = _sample_refs(kafka, b)
    # Retention at step 4 deleted the 16 files consumed before it, and nothing a resume needs.
    assert len(store.list()) == SAMPLES - 16

    code, out_b2 = run_train(b_args)
    assert code == 0, out_b2
    assert "24 of 26 prompts trained, 0 missing, 0 duplicates dropped, 2 tail samples not stepped" in out_b2

    # Losses: every step of B (the resumed ones included) equals A's, bit for bit.
    rows_a, rows_b = read_metrics(tmp_path / "out-a" / "metrics.jsonl"), read_metrics(tmp_path / "out-b" / "metrics.jsonl")
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(rows_a, rows_b, strict=True):
        assert (ra["loss"], ra["ploss"], ra["acc"]) == (rb["loss"], rb["ploss"], rb["acc"]), ra["step"]
    killed = [json.loads(line) for line in (tmp_path / "out-b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in killed] == [1, 2, 3, 4, 5, 5, 6]  # step 5 ran twice, identically
    assert killed[4]["loss"] == killed[5]["loss"]

    # Final weights equal.
    end_a = CheckpointManager(tmp_path / "out-a" / "checkpoints").latest()
    end_b = manager.latest()
    assert (
        end_a is not None and end_b is not None and end_a.end and end_b.end and end_a.step == end_b.step == 6
    )
    wa, wb = (
        load_file(str(end_a.path / "model.safetensors")),
        load_file(str(end_b.path / "model.safetensors")),
    )
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)

    # Ledger: each sample exactly once, none skipped, same batches as A; the dead attempt's step 5 agrees.
    raw_b = read_ledger(kafka, b)
    history_b, history_a = effective_history(raw_b), effective_history(read_ledger(kafka, a))
    assert [r.step for r in history_b] == [1, 2, 3, 4, 5, 6]
    trained = [sid for r in history_b for rank in r.ranks for sid in rank.sample_ids]
    assert len(trained) == len(set(trained)) == 24
    assert set(trained) <= {ref.sample_id for ref in refs_b}
    assert len({ref.sample_id for ref in refs_b} - set(trained)) == 2  # the reported tail, nothing else
    assert [[_suffix(s) for s in r.ranks[0].sample_ids] for r in history_b] == [
        [_suffix(s) for s in r.ranks[0].sample_ids] for r in history_a
    ]
    fives = [r for r in raw_b if r.step == 5]
    assert all(r.ranks[0].sample_ids == fives[-1].ranks[0].sample_ids for r in fives)
    last = history_b[-1].ranks[0].next_offsets
    assert sum(po.records for po in last) == 24  # consumed records per partition, for backpressure
    newest = latest_ledger_step(kafka, b)
    assert newest is not None and newest.step == 6

    # Group offsets: committed after the end checkpoint, at the end of every partition, with the step.
    with KafkaAdmin(kafka) as admin:
        committed = admin.group_offsets(runs["b"].trainer_group, runs["b"].samples)
        ends = admin.end_offsets(runs["b"].samples, range(PARTITIONS))
    assert {p: c.offset for p, c in committed.items()} == ends
    assert {c.metadata for c in committed.values()} == {"step=6"}

    # Retention at the end (keep 1): no retained checkpoint needs any file, tail included.
    assert store.list() == []
    assert len(FeatureStore(storage, a).list()) == SAMPLES  # policy retain keeps everything
