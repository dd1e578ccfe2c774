"""Epochs over retained features on the real broker: one target pass, every sample once per epoch,
and a trainer SIGKILLed in its second epoch resumes bit-identically."""

from __future__ import annotations

import os
import random
import signal
import threading
from collections import Counter
from pathlib import Path

import pytest
import yaml

from pipeline.app.audit import audit_run
from pipeline.app.config_file import load_config
from pipeline.app.runtime import build_online_run
from pipeline.generate.hf import HFTarget
from pipeline.ledger import effective_history, read_ledger
from pipeline.storage import FeatureStore
from pipeline.train.metrics import read_metrics
from pipeline.transport.kafka import KafkaSettings
from tests.faults.harness import stage
from tests.integration.test_runtime import write_config
from tests.support import wait_exit

pytestmark = pytest.mark.integration

EPOCHS = 3


def _epoch_counts(kafka: KafkaSettings, run_id: str) -> Counter[tuple[int, str]]:
    """(epoch, sample id) -> times the ledger's effective history trained it."""
    trained: Counter[tuple[int, str]] = Counter()
    for step in effective_history(read_ledger(kafka, run_id)):
        for rank in step.ranks:
            trained.update(zip(rank.sample_epochs(step.epoch), rank.sample_ids))
    return trained


@pytest.mark.slow
def test_three_epochs_run_the_target_once_and_train_every_sample_once_per_epoch(
    kafka: KafkaSettings, run_id: str, tmp_path: Path, tiny_target_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    forwards = Counter[str]()
    lock = threading.Lock()
    original = HFTarget.capture

    def counting(self: HFTarget, prompts):  # type: ignore[no-untyped-def]
        with lock:
            forwards["sequences"] += len(prompts)
        return original(self, prompts)

    monkeypatch.setattr(HFTarget, "capture", counting)
    conversations = 32  # x 3 epochs = 96 passes = 48 steps of 2: no tail
    config = load_config(
        write_config(
            tmp_path, kafka, run_id, tiny_target_dir, conversations=conversations,
            storage={"retention": "delete"}, train={"epochs": EPOCHS, "save_interval": 8},
        )  # fmt: skip
    )
    result = build_online_run(config).run()
    assert result.reason == "end_of_stream"
    assert result.summary.startswith(
        f"{conversations * EPOCHS} of {conversations * EPOCHS} sample passes trained "
        f"({conversations} prompts x {EPOCHS} epochs), 0 missing, 0 duplicates dropped, 0 tail"
    ), result.summary
    assert forwards["sequences"] == conversations  # the target ran once per prompt, not once per epoch

    trained = _epoch_counts(kafka, run_id)
    assert set(trained.values()) == {1}
    assert Counter(epoch for epoch, _ in trained) == {e: conversations for e in range(EPOCHS)}
    # With the store, as `specstream audit --config` runs it: files retention deleted after training
    # are the generators' refs, not foreign records.
    audit = audit_run(kafka, run_id, store=FeatureStore(str(tmp_path / "features"), run_id))
    assert audit.ok and audit.epochs == list(range(EPOCHS)), audit.to_json()
    assert audit.total("refs") == conversations and audit.total("foreign_samples") == 0
    assert audit.total("trained_once") == conversations * EPOCHS and audit.total("never_trained") == 0
    from pipeline.app.status import render_status, run_status

    shown = render_status(run_status(kafka, run_id))
    assert f"step {conversations * EPOCHS // 2} (epoch 3 of 3), {conversations} of {conversations} produced" in shown
    assert f"{conversations * EPOCHS} of {conversations * EPOCHS} sample passes ({conversations} x 3 epochs) trained" in shown
    # Retention delete: the features went, but only after the last epoch read them.
    assert FeatureStore(str(tmp_path / "features"), run_id).list() == []


TRAIN = {
    "batch_size": 2, "grad_accum": 2, "lr_schedule": "constant", "warmup_ratio": 0.0, "save_interval": 2,
    "deterministic": True, "prefetch": 1, "epochs": EPOCHS,
}  # fmt: skip
SAMPLES = 24  # x 3 epochs: 18 optimizer steps of 2 x 2 samples, 6 per epoch, no tail


def _run_config(kafka: KafkaSettings, run_id: str, workdir: Path, target: Path) -> Path:
    workdir.mkdir()
    path = write_config(
        workdir, kafka, run_id, target, conversations=SAMPLES, data={"partitions": 2}, train=TRAIN,
        generate={"high_watermark": 64, "low_watermark": 48},  # the generator finishes before the trainer starts
    )  # fmt: skip
    raw = yaml.safe_load(path.read_text())
    raw["target"]["batch_size"] = 1  # every capture independent of its batch: two runs store the same tensors
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.slow
@pytest.mark.faults
def test_a_trainer_sigkilled_in_the_second_epoch_resumes_bit_identically(
    kafka: KafkaSettings, tmp_path: Path, tiny_target_dir: Path
) -> None:
    seed = int(os.environ.get("SPECSTREAM_FAULT_SEED", "20261130"))
    kill_after = random.Random(seed).randint(7, 11)  # steps 7-12 are the second epoch
    print(f"fault seed {seed}: the trainer is SIGKILLed after step {kill_after}")
    base = f"t{os.urandom(5).hex()}"
    done = f"{SAMPLES * EPOCHS} of {SAMPLES * EPOCHS} sample passes trained"
    for name in ("a", "b"):
        config = _run_config(kafka, base + name, tmp_path / name, tiny_target_dir)
        code, out = wait_exit(stage("source", config), timeout_s=180)
        assert code == 0, out
        code, out = wait_exit(stage("generate", config, "--worker-id", "g1"), timeout_s=300)
        assert code == 0, out
        if name == "b":
            crash = {"SPECSTREAM_CRASH_AT": f"train.after_step:{kill_after}"}
            code, out = wait_exit(stage("train", config, env=crash), timeout_s=300)
            assert code == -signal.SIGKILL, f"expected SIGKILL after step {kill_after}, got {code}:\n{out}"
        code, out = wait_exit(stage("train", config), timeout_s=300)
        assert code == 0 and done in out, out

    rows_a = read_metrics(tmp_path / "a" / "out" / "metrics.jsonl")
    rows_b = read_metrics(tmp_path / "b" / "out" / "metrics.jsonl")
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b] == list(range(1, SAMPLES * EPOCHS // 4 + 1))
    for ra, rb in zip(rows_a, rows_b, strict=True):
        assert (ra["loss"], ra["ploss"], ra["acc"]) == (rb["loss"], rb["ploss"], rb["acc"]), ra["step"]
    histories = [effective_history(read_ledger(kafka, base + n)) for n in "ab"]
    assert [s.epoch for s in histories[0]] == [s.epoch for s in histories[1]] == [e for e in range(EPOCHS) for _ in range(6)]
    for name in "ab":
        trained = _epoch_counts(kafka, base + name)
        assert set(trained.values()) == {1} and len(trained) == SAMPLES * EPOCHS
        audit = audit_run(kafka, base + name)
        assert audit.ok and audit.total("trained_once") == SAMPLES * EPOCHS, audit.to_json()
