"""A full or read-only feature filesystem in the middle of a run (issue 9.15).

The run's ``features/`` directory is a real tmpfs: a few hundred KB (it fills up on the first
batch: ENOSPC) or remounted read-only (EROFS). The storage root above it stays writable, so the
start-up checks pass and the fault hits the generator's writer thread, whose error the
interleaved runtime re-raises on the main thread. ``specstream run`` must print exactly one
``error:`` line naming the cause, the path and what to do, exit 1, and keep the traceback in a
file (or print it with ``--verbose``); after the space is freed, the same command completes
with nothing lost and no orphaned file of the failed attempt left behind.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline.storage import FeatureStore
from tests.integration.test_runtime import write_config
from tests.support import one_error, spawn, tmpfs, wait_exit

pytestmark = [pytest.mark.integration, pytest.mark.faults]

CONVERSATIONS = 16  # 2 partitions, batch 2: 8 steps, no tail


@pytest.mark.parametrize("fault", ["no-space", "read-only-verbose"])
def test_a_storage_fault_mid_run_is_one_line_and_the_same_command_then_resumes(
    kafka, run_id, tmp_path: Path, tiny_target_dir: Path, fault: str
) -> None:
    path = write_config(
        tmp_path, kafka, run_id, tiny_target_dir, conversations=CONVERSATIONS, data={"partitions": 2}
    )
    features, temp = tmp_path / "features" / run_id / "features", tmp_path / "tmp"
    temp.mkdir()
    verbose = fault.endswith("verbose")
    with tmpfs(features, "256k") as remount:
        if fault.startswith("read-only"):
            remount("ro")
        args = ["run", "--config", str(path), *(["--verbose"] if verbose else [])]
        code, out = wait_exit(spawn(args, env={"TMPDIR": str(temp)}), timeout_s=300)
        assert code == 1, out
        errors = [line for line in out.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, out
        line = errors[0]
        cause = "no space left on device" if fault == "no-space" else "read-only file system"
        assert line.startswith(f"error: {cause} writing {features}/"), out
        assert "set storage.root / train.output_dir to another filesystem" in line
        assert "then run the same command again: it resumes exactly" in line
        kept = list(temp.glob("specstream-traceback-*.txt"))
        if verbose:
            assert "Traceback (most recent call last)" in out and not kept, out
        else:
            one_error(out)  # no traceback printed
            assert len(kept) == 1 and line.endswith(f"(traceback: {kept[0]})"), line
            assert re.search(r"_write_local|put", kept[0].read_text()), kept[0].read_text()
        assert not (tmp_path / "out" / "export").exists()

        remount("rw", "size=64m")  # the space is freed, the filesystem writable again
        code, out = wait_exit(spawn(["run", "--config", str(path)]), timeout_s=300)
        assert code == 0, out
        assert f"{CONVERSATIONS} of {CONVERSATIONS} prompts trained, 0 missing" in out
        store = FeatureStore(str(tmp_path / "features"), run_id)
        assert len(store.list()) == CONVERSATIONS, (
            "the failed attempt's files are swept at the end of the run"
        )
