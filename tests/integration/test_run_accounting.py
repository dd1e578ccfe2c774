"""What a run reports about itself, checked against what really happened (issue 9, item 14):
the summary counts the source's dead letters, and the projected peak storage bounds the files a
run with ``retention: delete`` really keeps (sampled through the run)."""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path

import pytest

from pipeline.app.config_file import load_config
from pipeline.app.runtime import build_online_run
from pipeline.devkit.chats import markov_conversations
from tests.integration.test_runtime import write_config

pytestmark = pytest.mark.integration


class StorageSampler:
    """Counts the files and bytes under a directory every ``interval_s`` on a thread, keeping the peak."""

    def __init__(self, root: Path, interval_s: float = 0.02) -> None:
        self.root = root
        self.interval_s = interval_s
        self.peak_files = self.peak_bytes = self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _count(self) -> tuple[int, int]:
        files = nbytes = 0
        for folder, _, names in os.walk(self.root):
            for name in names:
                try:
                    nbytes += os.stat(os.path.join(folder, name)).st_size
                except FileNotFoundError:  # deleted between the listing and the stat
                    continue
                files += 1
        return files, nbytes

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            files, nbytes = self._count()
            self.peak_files, self.peak_bytes = max(self.peak_files, files), max(self.peak_bytes, nbytes)
            self.samples += 1

    def __enter__(self) -> StorageSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        assert not self._thread.is_alive(), "the storage sampler did not stop"


def test_the_summary_counts_source_dead_letters_and_storage_stays_within_the_projection(
    kafka, run_id, tmp_path, tiny_target_dir
) -> None:
    lines = [json.dumps(c) for c in markov_conversations(96, seed=4)]
    for at in (7, 40, 77):
        lines.insert(at, "\x00\x01 not a conversation")
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    path = write_config(
        tmp_path, kafka, run_id, tiny_target_dir,
        storage={"retention": "delete"}, generate={"high_watermark": 12, "low_watermark": 8},
        train={"save_interval": 3, "keep_last": 2, "prefetch": 2, "ttt_steps": 7},
    )  # fmt: skip
    online = build_online_run(load_config(path))
    kept, backlog = online.projected_peak_samples()
    said: list[str] = []
    with StorageSampler(tmp_path / "features" / run_id) as sampler:
        result = online.run(announce=said.append)
    print(said, result.summary, f"peak {sampler.peak_files} files, {sampler.peak_bytes} bytes "
          f"over {sampler.samples} samples; projected {kept} + {backlog}")  # fmt: skip
    assert result.reason == "end_of_stream"
    assert result.summary.startswith("96 of 96 prompts trained, 0 missing")
    assert result.summary.endswith("3 dead letters (3 input lines, 0 prompts, 0 foreign records)")
    # keep_last x save_interval x global batch; high watermark + trainer window (2 + 2 x 2 over 4 partitions)
    assert (kept, backlog) == (2 * 3 * 2, 12 + 8)
    assert sampler.samples > 50
    assert sampler.peak_files <= kept + backlog + 1  # + the vocabulary mapping
    (line,) = [line for line in said if line.startswith("projected peak feature storage")]
    projected_mb = float(re.search(r"= ([\d,.]+) MB", line).group(1).replace(",", ""))
    vocab = (tmp_path / "features" / run_id / "vocab_mapping.safetensors").stat().st_size
    assert sampler.peak_bytes <= projected_mb * 1e6 + vocab
