"""SIGKILL of a stage process in a real multi-process run: nothing lost, nothing repeated.

Every stage runs as its own ``specstream`` process on the real broker. A generator dies by SIGKILL
inside a transaction (its files written, its refs in the log, nothing committed) and a new
generator with another worker id takes over; a trainer dies by SIGKILL after a randomly chosen
step and the same command resumes it, bit-identical to an uninterrupted run of the same data.
Each run ends with ``specstream audit`` clean.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipeline.core.topics import RunTopics
from pipeline.ledger import effective_history, read_ledger
from pipeline.storage import FeatureStore
from pipeline.train.checkpoint import CheckpointManager
from pipeline.train.metrics import read_metrics
from pipeline.transport.kafka import KafkaSettings
from tests.faults.harness import (
    audit_clean,
    check_committed_files,
    committed_refs,
    open_transaction_records,
    stage,
)
from tests.integration.test_runtime import write_config
from tests.support import wait_exit

pytestmark = [pytest.mark.integration, pytest.mark.faults]

PARTITIONS = 2
#: The trainer kill's step comes from this seed (print it, rerun with it to reproduce a failure).
FAULT_SEED = int(os.environ.get("SPECSTREAM_FAULT_SEED", "20240611"))


def test_generator_sigkilled_mid_transaction_is_replaced_and_nothing_is_lost(
    kafka: KafkaSettings, run_id: str, tmp_path: Path, tiny_target_dir: Path
) -> None:
    conversations = 24
    config = write_config(
        tmp_path, kafka, run_id, tiny_target_dir, conversations=conversations,
        data={"partitions": PARTITIONS}, generate={"high_watermark": 8, "low_watermark": 6},
        train={"prefetch": 1, "save_interval": 100},
    )  # fmt: skip
    code, out = wait_exit(stage("source", config), timeout_s=180)
    assert code == 0, out
    trainer = stage("train", config)
    replacement = None
    try:
        # The second transaction of the first generator: its files are stored and its refs
        # flushed to the log, then SIGKILL before the commit.
        doomed = stage(
            "generate", config, "--worker-id", "g1", env={"SPECSTREAM_CRASH_AT": "generate.before_commit:2"}
        )
        code, out = wait_exit(doomed, timeout_s=180)
        assert code == -signal.SIGKILL, f"expected SIGKILL, got {code}:\n{out}"
        assert open_transaction_records(kafka, run_id, PARTITIONS) > 0, (
            "the killed transaction's refs are in the log"
        )
        store = FeatureStore(str(tmp_path / "features"), run_id)
        visible = committed_refs(kafka, run_id, PARTITIONS)
        assert len(store.list()) > len(visible), "the killed batch's files were written"

        # A new generator (another worker id, as on another machine) takes the partitions once
        # the dead member's session expires; the broker aborts the dead transaction at its timeout.
        replacement = stage("generate", config, "--worker-id", "g2")
        code, trained = wait_exit(trainer, timeout_s=300)
        assert code == 0, trained
        assert (
            f"{conversations} of {conversations} prompts trained, 0 missing, 0 duplicates dropped" in trained
        )
        code, out = wait_exit(replacement, timeout_s=120)
        assert code == 0, out
    finally:
        for proc in (trainer, replacement):
            if proc is not None and proc.poll() is None:
                proc.kill()

    assert open_transaction_records(kafka, run_id, PARTITIONS) == 0
    refs = committed_refs(kafka, run_id, PARTITIONS)
    assert len(refs) == conversations and {r.producer_id for r in refs} <= {"g1", "g2"}
    check_committed_files(FeatureStore(str(tmp_path / "features"), run_id), refs)
    audit_clean(config, conversations)


# --- the trainer ----------------------------------------------------------------------------

TRAIN = {
    "batch_size": 2, "grad_accum": 2, "lr_schedule": "constant", "warmup_ratio": 0.0, "save_interval": 2,
    "deterministic": True, "prefetch": 1,
}  # fmt: skip
SAMPLES = 24  # 6 optimizer steps of 2 x 2 samples, no tail


def _run_config(kafka: KafkaSettings, run_id: str, workdir: Path, target: Path) -> Path:
    """One run of the shared data: target batch size 1 makes every capture independent of the
    batch it fell into, so two runs of the same prompts store the same tensors bit for bit."""
    workdir.mkdir()
    path = write_config(
        workdir, kafka, run_id, target, conversations=SAMPLES, data={"partitions": PARTITIONS}, train=TRAIN
    )
    raw = yaml.safe_load(path.read_text())
    raw["target"]["batch_size"] = 1  # (write_config's own `target` argument is the model directory)
    path.write_text(yaml.safe_dump(raw))
    return path


def _source_and_generator(config: Path) -> subprocess.Popen[str]:
    """The source (to its end), then one generator process, left running beside the trainer."""
    code, out = wait_exit(stage("source", config), timeout_s=180)
    assert code == 0, out
    return stage("generate", config, "--worker-id", "g1")


def _suffix(sample_id: str) -> str:
    return sample_id.split(".", 1)[1]  # drop the run id: both runs name the same prompt alike


def test_trainer_sigkilled_at_a_random_step_resumes_bit_identically(
    kafka: KafkaSettings, tmp_path: Path, tiny_target_dir: Path
) -> None:
    rng = random.Random(FAULT_SEED)
    kill_after = rng.randint(1, SAMPLES // 4 - 1)
    print(f"fault seed {FAULT_SEED}: the trainer is SIGKILLed after step {kill_after}")
    base = f"t{os.urandom(5).hex()}"
    straight, killed = f"{base}a", f"{base}b"
    config_a = _run_config(kafka, straight, tmp_path / "a", tiny_target_dir)
    config_b = _run_config(kafka, killed, tmp_path / "b", tiny_target_dir)
    done = f"{SAMPLES} of {SAMPLES} prompts trained, 0 missing, 0 duplicates dropped"

    generators = []
    try:
        generators.append(_source_and_generator(config_a))
        code, out = wait_exit(stage("train", config_a), timeout_s=300)
        assert code == 0 and done in out, out

        generators.append(_source_and_generator(config_b))
        crash = {"SPECSTREAM_CRASH_AT": f"train.after_step:{kill_after}"}
        code, out = wait_exit(stage("train", config_b, env=crash), timeout_s=300)
        assert code == -signal.SIGKILL, f"expected SIGKILL after step {kill_after}, got {code}:\n{out}"
        # The same command again resumes from the last checkpoint; the generator never stopped.
        code, out = wait_exit(stage("train", config_b), timeout_s=300)
        assert code == 0 and done in out, out
        for generator in generators:
            code, out = wait_exit(generator, timeout_s=120)
            assert code == 0, out
    finally:
        for generator in generators:
            if generator.poll() is None:
                generator.kill()

    rows_a = read_metrics(tmp_path / "a" / "out" / "metrics.jsonl")
    rows_b = read_metrics(tmp_path / "b" / "out" / "metrics.jsonl")
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b] == list(range(1, SAMPLES // 4 + 1))
    for ra, rb in zip(rows_a, rows_b, strict=True):
        assert (ra["loss"], ra["ploss"], ra["acc"]) == (rb["loss"], rb["ploss"], rb["acc"]), ra["step"]

    end_a = CheckpointManager(tmp_path / "a" / "out" / "checkpoints").latest()
    end_b = CheckpointManager(tmp_path / "b" / "out" / "checkpoints").latest()
    assert end_a is not None and end_b is not None and end_a.end and end_b.end and end_a.step == end_b.step
    wa, wb = (
        load_file(str(end_a.path / "model.safetensors")),
        load_file(str(end_b.path / "model.safetensors")),
    )
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)

    history_a = effective_history(read_ledger(kafka, straight))
    history_b = effective_history(read_ledger(kafka, killed))
    batches = lambda history: [[_suffix(s) for rank in r.ranks for s in rank.sample_ids] for r in history]
    assert batches(history_a) == batches(history_b)
    audit_clean(config_a, SAMPLES)
    audit_clean(config_b, SAMPLES)
    for run in (straight, killed):
        topics = RunTopics(run)
        with kafka.admin() as admin:
            admin.delete_topics([topics.prompts, topics.samples, topics.ledger, topics.dlq, topics.manifest])
