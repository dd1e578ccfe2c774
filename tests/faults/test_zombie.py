"""A zombie writer: a generator frozen (SIGSTOP) while it holds prompt partitions and a captured
batch, resumed (SIGCONT) after the group moved its partitions to the other generator and that
one committed every sample, the zombie's included.

The zombie wakes up with a batch it believes is its own: it stores the batch's files and tries
to commit. Nothing it does may change what a committed ref describes: every committed ref must
still point at bytes of its own size and CRC, the zombie's commit must be refused (it exits with
its fenced line, or rejoins the group and finds the work done), the run completes and
``specstream audit`` is clean. Every stage is a ``specstream`` process on the real broker.
"""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest

from pipeline.app.config_file import load_config
from pipeline.app.manifest import claim_run
from pipeline.core.messages import EndOfStream
from pipeline.core.topics import RunTopics
from pipeline.storage import FeatureStore, checksum_of
from pipeline.transport.kafka import KafkaSettings
from tests.faults.harness import audit_clean, check_committed_files, committed_refs, stage, wait_stopped
from tests.integration.test_runtime import write_config
from tests.support import read_messages, wait_exit, wait_for_group, wait_for_output

pytestmark = [pytest.mark.integration, pytest.mark.faults]

CONVERSATIONS, PARTITIONS = 32, 2


#: Where the zombie freezes: right after capturing its second batch (it will store the batch's
#: files late, then try to commit), or in its writer with the second transaction open (files
#: stored, refs in the log; the broker aborts the transaction at its timeout, then it commits late).
FREEZE_POINTS = {"late-writes": "generate.after_capture", "open-transaction": "generate.before_commit"}


@pytest.mark.parametrize("point", list(FREEZE_POINTS.values()), ids=list(FREEZE_POINTS))
def test_a_zombie_generator_resumed_after_its_partitions_moved_corrupts_nothing(
    kafka: KafkaSettings, run_id: str, tmp_path: Path, tiny_target_dir: Path, point: str
) -> None:
    config = write_config(
        tmp_path, kafka, run_id, tiny_target_dir, conversations=CONVERSATIONS, data={"partitions": PARTITIONS},
        generate={"high_watermark": 8, "low_watermark": 6}, train={"prefetch": 1, "save_interval": 100},
    )  # fmt: skip
    topics = RunTopics(run_id)
    claim_run(kafka, load_config(config))  # the run's topics and manifest, as the source makes them first
    store = FeatureStore(str(tmp_path / "features"), run_id)
    zombie = stage(
        "generate", config, "--worker-id", "zombie", env={"SPECSTREAM_CRASH_AT": f"{point}:2:SIGSTOP"}
    )
    survivor = stage("generate", config, "--worker-id", "survivor")
    trainer = None
    try:
        # Both in the group before any prompt exists: each holds one partition.
        wait_for_group(kafka.bootstrap_servers, topics.generator_group, 2, timeout_s=120)
        code, out = wait_exit(stage("source", config), timeout_s=180)
        assert code == 0, out
        trainer = stage("train", config)
        wait_for_output(zombie, rf"crash point {re.escape(point)} .*SIGSTOP", timeout_s=240)
        wait_stopped(zombie.pid, timeout_s=30)

        # Its session expires: the group is the survivor alone, which takes the zombie's partition
        # and commits every prompt of the run, the zombie's batch included (every partition ends).
        wait_for_group(kafka.bootstrap_servers, topics.generator_group, 1, timeout_s=120)
        read_messages(
            kafka, topics.samples, range(PARTITIONS), timeout_s=180,
            until=lambda got: {p for p, m in got if isinstance(m, EndOfStream)} == set(range(PARTITIONS)),
        )  # fmt: skip
        refs = committed_refs(kafka, run_id, PARTITIONS)
        assert len(refs) == CONVERSATIONS and {r.producer_id for r in refs} == {"zombie", "survivor"}
        before = {uri: checksum_of(Path(store.resolve(uri)).read_bytes()) for uri in store.list()}

        zombie.send_signal(signal.SIGCONT)
        code, out = wait_exit(zombie, timeout_s=180)
        assert code == 0 or "was fenced" in out, (
            f"the zombie neither rejoined nor was fenced ({code}):\n{out}"
        )
        print(f"zombie exit {code}: {out.strip().splitlines()[-1] if out.strip() else ''}")
        code, out = wait_exit(trainer, timeout_s=300)
        assert code == 0, out
        assert f"{CONVERSATIONS} of {CONVERSATIONS} prompts trained, 0 missing, 0 duplicates dropped" in out
        code, out = wait_exit(survivor, timeout_s=120)
        assert code == 0, out
    finally:
        for proc in (zombie, survivor, trainer):
            if proc is not None and proc.poll() is None:
                proc.kill()

    # The committed refs are the same ones, every one still names its own bytes; the zombie's late
    # files (its batch's samples again, each under a name of its own attempt) are orphans.
    after = committed_refs(kafka, run_id, PARTITIONS)
    assert after == refs
    check_committed_files(store, after)
    now = {uri: checksum_of(Path(store.resolve(uri)).read_bytes()) for uri in store.list()}
    assert all(now[uri] == crc for uri, crc in before.items() if uri in now)
    late = sorted(set(now) - set(before))
    named = {r.uri for r in after}
    assert not set(late) & named, "a committed ref names a file the zombie wrote"
    committed_ids = {r.sample_id for r in after}
    assert all(Path(uri).name.rsplit(".", 2)[0] in committed_ids for uri in late), (
        late
    )  # the same samples again
    print(f"the zombie wrote {len(late)} files after it was continued; none of them is committed")
    audit_clean(config, CONVERSATIONS)
