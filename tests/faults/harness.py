"""What the fault scenarios share: the run's stages as ``specstream`` processes, the audit from
outside, and a check of every committed ref against the bytes of its file.

Every helper is bounded in time; none sleeps to synchronise.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

from pipeline.core.features import check_ref
from pipeline.core.messages import SampleRef, decode
from pipeline.core.topics import RunTopics, read_to_end
from pipeline.storage import FeatureStore, checksum_of
from pipeline.transport.kafka import KafkaSettings
from tests.support import spawn, wait_exit

__all__ = (
    "audit_clean",
    "check_committed_files",
    "committed_refs",
    "open_transaction_records",
    "stage",
    "wait_stopped",
)


def stage(name: str, config: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """``specstream NAME --config CONFIG ARGS``: one stage process, as a user starts it."""
    return spawn([name, "--config", str(config), *args], env=env)


def audit_clean(config: Path, prompts: int, *, duplicates: int = 0) -> dict[str, Any]:
    """``specstream audit --json`` after the run: exit 0, nothing lost or repeated, every prompt
    a committed ref trained exactly once, no foreign sample (an own ref whose file fails its
    checks counts as foreign: the audit verifies each file as the trainer does)."""
    code, out = wait_exit(spawn(["audit", "--config", str(config), "--json"]), timeout_s=120)
    assert code == 0, out
    report = json.loads(out[out.index("{") :])
    totals = report["totals"]
    assert report["ok"] and report["lost"] == 0 and report["repeated"] == 0, out
    assert totals["prompts"] == totals["refs"] == totals["trained_once"] == prompts, totals
    assert totals["trained_repeatedly"] == totals["never_trained"] == 0, totals
    assert totals["duplicates"] == duplicates and totals["foreign_samples"] == 0, totals
    assert report["unknown_trained"] == 0, report
    return report


def committed_refs(kafka: KafkaSettings, run_id: str, partitions: int) -> list[SampleRef]:
    """The numbered refs committed to the samples topic so far (``read_committed``: what a
    trainer can see), from any producer."""
    topics = RunTopics(run_id)
    refs = []
    for record in read_to_end(kafka, topics.samples, range(partitions), timeout_s=60):
        message = decode(record.value or b"")
        if isinstance(message, SampleRef):
            refs.append(message)
    return refs


def check_committed_files(store: FeatureStore, refs: list[SampleRef]) -> None:
    """Every committed ref names a complete file whose size and CRC-32C are the ref's, read
    directly from storage (then the store's own verification, header included, agrees)."""
    assert refs, "no committed ref to check"
    for ref in refs:
        check_ref(ref)
        path = Path(store.resolve(ref.uri))
        assert path.is_file(), f"committed ref {ref.sample_id} names a missing file {ref.uri}"
        data = path.read_bytes()
        assert len(data) == ref.nbytes, f"{ref.uri}: {len(data)} bytes, its ref says {ref.nbytes}"
        assert checksum_of(data) == ref.checksum, f"{ref.uri}: bytes differ from its committed ref"
        store.read_verified(ref)


def open_transaction_records(kafka: KafkaSettings, run_id: str, partitions: int) -> int:
    """Records in the samples log beyond what ``read_committed`` readers can see: an open (or
    aborted) transaction's refs."""
    topics = RunTopics(run_id)
    with kafka.admin() as admin:
        written = admin.end_offsets(topics.samples, range(partitions), committed_only=False)
        visible = admin.end_offsets(topics.samples, range(partitions), committed_only=True)
    return sum(written.values()) - sum(visible.values())


def wait_stopped(pid: int, *, timeout_s: float = 60.0) -> None:
    """Until the kernel reports the process stopped (state ``T``), bounded: a process that says
    it stops itself may not have stopped yet, and a SIGCONT sent before would be lost."""
    deadline = time.monotonic() + timeout_s
    state = "?"
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        if state in ("T", "t"):
            return
        time.sleep(0.05)  # polling the kernel's view of the process, bounded by the deadline
    raise TimeoutError(f"process {pid} not stopped within {timeout_s} s (state {state})")
