"""Orphans of aborted attempts are swept by ``specstream sweep`` and at the end of a run (issue 9.4).

A real aborted attempt: a generator process SIGKILLs itself after it stored a batch's feature
files and sent their refs, before the commit (crash point ``generate.before_commit``). Its
restart with the same worker id fences it (the broker aborts the transaction) and captures the
batch again under new, attempt-unique file names, so the killed attempt's files are orphans:
no committed ref names them. The committed refs are read here with a plain reader, apart from
the code under test.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.core.messages import EndOfStream, SampleRef
from pipeline.core.topics import RunTopics
from pipeline.storage import FeatureStore
from tests.integration.test_runtime import write_config
from tests.support import read_messages, spawn, wait_exit

pytestmark = [pytest.mark.integration, pytest.mark.faults]

CONVERSATIONS = 16  # 2 partitions, 4 batches of 4: below the watermark, no trainer needed to finish


def aborted_attempt(
    kafka, run_id: str, tmp_path: Path, target: Path
) -> tuple[Path, FeatureStore, set[str], set[str]]:
    """Config, store, the committed files and the orphans of a generator killed before a commit."""
    path = write_config(tmp_path, kafka, run_id, target, conversations=CONVERSATIONS, data={"partitions": 2})
    code, out = wait_exit(spawn(["source", "--config", str(path)]), timeout_s=180)
    assert code == 0, out
    args = ["generate", "--config", str(path), "--worker-id", "g1"]
    code, out = wait_exit(spawn(args, env={"SPECSTREAM_CRASH_AT": "generate.before_commit:2"}), timeout_s=180)
    assert code == -9, f"expected SIGKILL, got {code}:\n{out}"
    code, out = wait_exit(spawn(args), timeout_s=180)  # fences the dead attempt, captures its batch again
    assert code == 0, out
    refs = read_messages(
        kafka, RunTopics(run_id).samples, [0, 1], timeout_s=60,
        until=lambda got: sum(isinstance(m, EndOfStream) for _, m in got) == 2,
    )  # fmt: skip
    committed = {m.uri for _, m in refs if isinstance(m, SampleRef)}
    store = FeatureStore(str(tmp_path / "features"), run_id)
    stored = set(store.list())
    assert len(committed) == CONVERSATIONS and committed <= stored
    orphans = stored - committed
    assert orphans, "the killed attempt stored files before it died"
    return path, store, committed, orphans


def test_sweep_removes_exactly_the_orphans_and_the_run_still_trains_and_audits(
    kafka, run_id, tmp_path, tiny_target_dir
) -> None:
    path, store, committed, orphans = aborted_attempt(kafka, run_id, tmp_path, tiny_target_dir)
    sizes = store.listing()
    orphan_bytes = sum(sizes[uri][0] for uri in orphans)
    sweep = ["sweep", "--config", str(path)]

    code, out = wait_exit(spawn([*sweep, "--dry-run", "--grace-s", "0"]), timeout_s=120)
    assert code == 0, out
    assert f"would remove {len(orphans)} orphaned feature files ({orphan_bytes} bytes)" in out
    assert set(store.list()) == committed | orphans

    code, out = wait_exit(spawn(sweep), timeout_s=120)  # the default grace protects young files
    assert code == 0, out
    assert f"removed 0 orphaned feature files (0 bytes) of aborted attempts; kept {CONVERSATIONS} committed, " \
           f"{len(orphans)} younger than the grace period" in out  # fmt: skip
    assert set(store.list()) == committed | orphans

    code, out = wait_exit(spawn([*sweep, "--grace-s", "0"]), timeout_s=120)
    assert code == 0, out
    assert f"removed {len(orphans)} orphaned feature files ({orphan_bytes} bytes)" in out
    assert set(store.list()) == committed, "exactly the orphans are gone, every committed file is there"

    code, out = wait_exit(spawn(["train", "--config", str(path)]), timeout_s=300)
    assert code == 0, out
    assert f"{CONVERSATIONS} of {CONVERSATIONS} prompts trained, 0 missing" in out
    assert "orphaned" not in out  # nothing left for the end-of-run sweep
    code, out = wait_exit(spawn(["audit", "--config", str(path)]), timeout_s=120)
    assert code == 0, out


def test_the_end_of_a_run_sweeps_every_orphan(kafka, run_id, tmp_path, tiny_target_dir) -> None:
    path, store, committed, orphans = aborted_attempt(kafka, run_id, tmp_path, tiny_target_dir)
    code, out = wait_exit(spawn(["train", "--config", str(path)]), timeout_s=300)
    assert code == 0, out
    assert f"{CONVERSATIONS} of {CONVERSATIONS} prompts trained, 0 missing" in out
    assert f"removed {len(orphans)} orphaned feature files" in out
    assert set(store.list()) == committed, "zero orphans after the run"
    code, out = wait_exit(spawn(["audit", "--config", str(path)]), timeout_s=120)
    assert code == 0, out
