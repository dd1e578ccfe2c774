"""Storage that fills up or turns read-only mid-run: the generator stops with an error, commits
no ref to a missing or partial file, and the same command completes the run once storage is back.

The feature storage root is a small tmpfs mounted for the test (root only; unmounted by the
fixture's finalizer). For ENOSPC a filler file leaves room for about 40 % of the run's features;
for read-only the trainer stops itself after its first step (a SIGSTOP crash point), which holds
the generator at its backpressure watermark while the mount turns read-only, then goes on.
Every stage is a ``specstream`` process; each run ends with ``specstream audit`` clean.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.core.messages import Prompt, decode
from pipeline.core.topics import RunTopics, read_to_end
from pipeline.storage import FeatureStore
from pipeline.transport.kafka import KafkaSettings
from tests.faults.harness import audit_clean, check_committed_files, committed_refs, stage, wait_stopped
from tests.integration.test_runtime import write_config
from tests.support import tmpfs, wait_exit, wait_for_output

pytestmark = [pytest.mark.integration, pytest.mark.faults]

CONVERSATIONS, PARTITIONS = 24, 2


@pytest.fixture
def tmpfs_root(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs of its own, unmounted afterwards (whatever the test left mounted there)."""
    mountpoint = tmp_path / "tmpfs"
    with tmpfs(mountpoint, "16m"):
        yield mountpoint


def _sourced(kafka: KafkaSettings, run_id: str, tmp_path: Path, target: Path, root: Path) -> Path:
    """The run's config (features on ``root``), and its source stage run to the end."""
    config = write_config(
        tmp_path, kafka, run_id, target, conversations=CONVERSATIONS, data={"partitions": PARTITIONS},
        storage={"root": str(root)}, generate={"high_watermark": 8, "low_watermark": 6},
        train={"prefetch": 1, "save_interval": 100},
    )  # fmt: skip
    code, out = wait_exit(stage("source", config), timeout_s=180)
    assert code == 0, out
    return config


def _feature_bytes(kafka: KafkaSettings, run_id: str, target: Path) -> int:
    """What the run's features take on the tmpfs (whole pages), from its published prompts."""
    hidden = json.loads((target / "config.json").read_text())["hidden_size"]
    per_token = 8 + 1 + 4 * hidden * 4  # input_ids, loss_mask, 3 aux + 1 final fp32 hidden states
    total = 0
    for record in read_to_end(kafka, RunTopics(run_id).prompts, range(PARTITIONS), timeout_s=60):
        message = decode(record.value or b"")
        if isinstance(message, Prompt):
            total += math.ceil((len(message.input_ids) * per_token + 1024) / 4096) * 4096
    return total


def _fill(root: Path, leave: int) -> Path:
    """A filler file that leaves about ``leave`` bytes free on the mount."""
    st = os.statvfs(root)
    filler = root / "filler.bin"
    with open(filler, "wb") as f:
        f.truncate(0)
        f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))  # tmpfs allocates on write
    return filler


def _after_the_failure(kafka: KafkaSettings, run_id: str, root: Path, generator_out: str, cause: str) -> None:
    """The generator's failure was a clear error, and it left only whole, committed-and-correct
    files behind: some refs committed (mid-run), every one naming its exact bytes, no temp file."""
    assert "error" in generator_out.lower() or cause in generator_out, generator_out
    refs = committed_refs(kafka, run_id, PARTITIONS)
    assert 0 < len(refs) < CONVERSATIONS, f"{len(refs)} refs committed: the fault was not mid-run"
    check_committed_files(FeatureStore(str(root), run_id), refs)
    assert not list(root.rglob("*.tmp")), "a partial temp file was left behind"


def _complete(
    config: Path, trainer: subprocess.Popen[str], kafka: KafkaSettings, run_id: str, root: Path
) -> None:
    """The same generator command again, then the waiting trainer ends the run; audit clean."""
    code, out = wait_exit(stage("generate", config, "--worker-id", "g1"), timeout_s=180)
    assert code == 0, out
    code, out = wait_exit(trainer, timeout_s=300)
    assert code == 0, out
    assert f"{CONVERSATIONS} of {CONVERSATIONS} prompts trained, 0 missing, 0 duplicates dropped" in out
    check_committed_files(FeatureStore(str(root), run_id), committed_refs(kafka, run_id, PARTITIONS))
    audit_clean(config, CONVERSATIONS)


def test_enospc_mid_run_stops_the_generator_and_the_rerun_completes(
    kafka: KafkaSettings, run_id: str, tmp_path: Path, tiny_target_dir: Path, tmpfs_root: Path
) -> None:
    config = _sourced(kafka, run_id, tmp_path, tiny_target_dir, tmpfs_root)
    needed = _feature_bytes(kafka, run_id, tiny_target_dir)
    filler = _fill(tmpfs_root, leave=int(needed * 0.4))
    st = os.statvfs(tmpfs_root)
    print(f"the features need about {needed} bytes; {st.f_bavail * st.f_frsize} left free")
    trainer = stage("train", config)
    try:
        code, out = wait_exit(stage("generate", config, "--worker-id", "g1"), timeout_s=180)
        assert code != 0, out
        _after_the_failure(kafka, run_id, tmpfs_root, out, "No space left on device")
        filler.unlink()  # space freed
        _complete(config, trainer, kafka, run_id, tmpfs_root)
    finally:
        if trainer.poll() is None:
            trainer.kill()


def test_read_only_storage_mid_run_stops_the_generator_and_the_rerun_completes(
    kafka: KafkaSettings, run_id: str, tmp_path: Path, tiny_target_dir: Path, tmpfs_root: Path
) -> None:
    config = _sourced(kafka, run_id, tmp_path, tiny_target_dir, tmpfs_root)
    trainer = stage("train", config, env={"SPECSTREAM_CRASH_AT": "train.after_step:1:SIGSTOP"})
    generator = stage("generate", config, "--worker-id", "g1")
    try:
        # The trainer holds still after its first step; the generator, at most a watermark ahead
        # of it, cannot finish. The mount turns read-only under both, then the trainer goes on.
        wait_for_output(trainer, r"crash point train\.after_step .*SIGSTOP", timeout_s=240)
        wait_stopped(trainer.pid, timeout_s=30)
        subprocess.run(["mount", "-o", "remount,ro", str(tmpfs_root)], check=True, timeout=30)
        trainer.send_signal(signal.SIGCONT)
        code, out = wait_exit(generator, timeout_s=180)
        assert code != 0, out
        _after_the_failure(kafka, run_id, tmpfs_root, out, "Read-only file system")
        subprocess.run(["mount", "-o", "remount,rw", str(tmpfs_root)], check=True, timeout=30)
        _complete(config, trainer, kafka, run_id, tmpfs_root)
    finally:
        for proc in (trainer, generator):
            if proc.poll() is None:
                proc.kill()
