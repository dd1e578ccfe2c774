"""A storage budget on the real broker: the run keeps what fits, captures the rest again for each
later epoch, never holds more bytes than the budget, and trains every sample once per epoch."""

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
from pipeline.app.config_budget import feature_budget
from pipeline.app.config_file import load_config
from pipeline.app.runtime import build_online_run
from pipeline.core.messages import SampleRef, decode
from pipeline.devkit.storage_peak import StoragePeak
from pipeline.core.topics import RunTopics, read_to_end
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
PROMPTS = 32  # x 3 epochs = 96 passes = 48 steps of 2: no tail
PARTITIONS = 2
TRAIN = {"epochs": EPOCHS, "save_interval": 1, "keep_last": 1, "prefetch": 1, "grad_accum": 1, "batch_size": 2}
# The smallest window the trainer allows (a global step plus its prefetch): a small transient reserve.
FLOW = {"high_watermark": 4, "low_watermark": 2}


def _prompt_of(sample_id: str) -> str:
    """``<run>[.regen].e<epoch>.<prompt id>`` -> the prompt id."""
    return sample_id.split(".e", 1)[1].split(".", 1)[1]


def _run(kafka: KafkaSettings, run_id: str, tmp_path: Path, target: Path, max_bytes: int, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    forwards = Counter[str]()
    original = HFTarget.capture
    lock = threading.Lock()

    def counting(self: HFTarget, prompts):  # type: ignore[no-untyped-def]
        with lock:
            forwards["sequences"] += len(prompts)
        return original(self, prompts)

    monkeypatch.setattr(HFTarget, "capture", counting)
    path = write_config(
        tmp_path, kafka, run_id, target, conversations=PROMPTS, data={"partitions": PARTITIONS, "max_length": 64},
        storage={"retention": "delete", "max_bytes": max_bytes}, train=TRAIN, generate=FLOW,
    )  # fmt: skip
    raw = yaml.safe_load(path.read_text())
    raw["target"]["batch_size"] = 2  # within each partition's share of the small watermark
    path.write_text(yaml.safe_dump(raw))
    config = load_config(path)
    with StoragePeak(str(tmp_path / "features" / run_id / "features"), every_s=0.01) as peak:
        result = build_online_run(config).run()
    return config, result, forwards["sequences"], peak.peak


def _refs(kafka: KafkaSettings, topic: str) -> list[SampleRef]:
    messages = [decode(r.value or b"") for r in read_to_end(kafka, topic, range(PARTITIONS), timeout_s=60)]
    return [m for m in messages if isinstance(m, SampleRef)]


@pytest.mark.slow
@pytest.mark.parametrize("share", ["half", "zero"])
def test_a_budget_keeps_what_fits_and_captures_the_rest_again_each_epoch(
    kafka: KafkaSettings, run_id: str, tmp_path: Path, tiny_target_dir: Path, monkeypatch: pytest.MonkeyPatch,
    share: str,
) -> None:
    # Half of what the online pass stores (measured by the zero run's refs, the same prompts), or 0:
    # every later epoch runs the target again, the online baseline.
    online_bytes = 32 * 63_000  # ~63 KB per sample of the tiny target at max_length 64 (checked below)
    max_bytes = online_bytes // 2 if share == "half" else 0
    config, result, forwards, peak = _run(kafka, run_id, tmp_path, tiny_target_dir, max_bytes, monkeypatch)
    assert result.reason == "end_of_stream"
    assert result.summary.startswith(
        f"{PROMPTS * EPOCHS} of {PROMPTS * EPOCHS} sample passes trained ({PROMPTS} prompts x {EPOCHS} epochs), "
        "0 missing, 0 duplicates dropped, 0 tail"
    ), result.summary

    online = _refs(kafka, RunTopics(run_id).samples)
    again = _refs(kafka, RunTopics(run_id).regen.samples)
    assert len(online) == PROMPTS
    stored = sum(r.nbytes for r in online)
    budget = feature_budget(config)
    assert budget is not None
    print(f"{share}: budget {max_bytes:,} of {stored:,} online bytes; {budget.describe()}; peak {peak:,}; "
          f"{len(again)} captured again; {forwards} target sequences")  # fmt: skip
    if share == "half":
        assert 0.4 < max_bytes / stored < 0.6  # about half of the run's features
        assert 0 < peak <= max_bytes  # sampled every 10 ms through the run
    # Every later epoch captures again exactly what the budget did not keep: the same prompts each epoch.
    by_epoch = {e: sorted(r.prompt_id for r in again if r.epoch == e) for e in range(EPOCHS)}
    assert by_epoch[0] == [] and by_epoch[1] == by_epoch[2]
    if share == "zero":
        assert len(by_epoch[1]) == PROMPTS
    else:
        assert 0 < len(by_epoch[1]) < PROMPTS, "the half budget should keep some samples and not others"
    for ref in again:  # the regenerated refs carry their epoch, in the field and in the sample id
        assert ref.sample_id == f"{run_id}.regen.e{ref.epoch:03d}.{ref.prompt_id}"
    assert forwards == PROMPTS + len(again)  # the target ran for the online pass and for what was not kept

    # Every epoch trained every prompt exactly once, kept or captured again.
    trained: Counter[tuple[int, str]] = Counter()
    for step in effective_history(read_ledger(kafka, run_id)):
        for rank in step.ranks:
            trained.update((e, _prompt_of(s)) for e, s in zip(rank.sample_epochs(step.epoch), rank.sample_ids))
    assert set(trained.values()) == {1}
    prompts = sorted(r.prompt_id for r in online)
    for epoch in range(EPOCHS):
        assert sorted(p for e, p in trained if e == epoch) == prompts, epoch
    audit = audit_run(kafka, run_id, store=FeatureStore(str(tmp_path / "features"), run_id))
    assert audit.ok and audit.total("trained_once") == PROMPTS * EPOCHS, audit.to_json()
    assert audit.unknown_trained == 0 and audit.total("never_trained") == 0
    assert FeatureStore(str(tmp_path / "features"), run_id).list() == []  # retention delete: nothing left


@pytest.mark.slow
@pytest.mark.faults
def test_a_trainer_sigkilled_while_samples_are_captured_again_resumes_bit_identically(
    kafka: KafkaSettings, tmp_path: Path, tiny_target_dir: Path
) -> None:
    """Generator and trainer as processes; run b's trainer dies in the second epoch, with
    regenerated samples published, captured and in flight, and the same command resumes it."""
    seed = int(os.environ.get("SPECSTREAM_FAULT_SEED", "20261201"))
    kill_after = random.Random(seed).randint(18, 30)  # steps 17-32 are the second epoch
    print(f"fault seed {seed}: the trainer is SIGKILLed after step {kill_after}")
    base = f"t{os.urandom(5).hex()}"
    done = f"{PROMPTS * EPOCHS} of {PROMPTS * EPOCHS} sample passes trained"
    for name in ("a", "b"):
        workdir = tmp_path / name
        workdir.mkdir()
        path = write_config(
            workdir, kafka, base + name, tiny_target_dir, conversations=PROMPTS,
            data={"partitions": PARTITIONS, "max_length": 64}, generate=FLOW,
            storage={"retention": "delete", "max_bytes": 32 * 63_000 // 2},
            train={**TRAIN, "lr_schedule": "constant", "warmup_ratio": 0.0, "deterministic": True},
        )  # fmt: skip
        raw = yaml.safe_load(path.read_text())
        raw["target"]["batch_size"] = 1  # every capture independent of its batch: both runs store the same tensors
        path.write_text(yaml.safe_dump(raw))
        code, out = wait_exit(stage("source", path), timeout_s=180)
        assert code == 0, out
        generator = stage("generate", path, "--worker-id", "g1")  # serves the regeneration sub-run too
        if name == "b":
            crash = {"SPECSTREAM_CRASH_AT": f"train.after_step:{kill_after}"}
            code, out = wait_exit(stage("train", path, env=crash), timeout_s=300)
            assert code == -signal.SIGKILL, f"expected SIGKILL after step {kill_after}, got {code}:\n{out}"
        code, out = wait_exit(stage("train", path), timeout_s=300)
        assert code == 0 and done in out, out
        code, out = wait_exit(generator, timeout_s=120)  # it leaves once every rank closed the sub-run
        assert code == 0, out

    rows_a = read_metrics(tmp_path / "a" / "out" / "metrics.jsonl")
    rows_b = read_metrics(tmp_path / "b" / "out" / "metrics.jsonl")
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b] == list(range(1, PROMPTS * EPOCHS // 2 + 1))
    for ra, rb in zip(rows_a, rows_b, strict=True):
        assert (ra["loss"], ra["ploss"], ra["acc"]) == (rb["loss"], rb["ploss"], rb["acc"]), ra["step"]
    for name in "ab":
        again = _refs(kafka, RunTopics(base + name).regen.samples)
        assert again and len({r.sample_id for r in again}) == len(again)  # each need captured once, the kill notwithstanding
        audit = audit_run(kafka, base + name)
        assert audit.ok and audit.total("trained_once") == PROMPTS * EPOCHS, audit.to_json()
