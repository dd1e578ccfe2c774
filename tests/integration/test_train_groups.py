"""Two trainer groups of different TTT depth on one generator pass, on the real broker: each
trains every sample (``N of N``) with its own ledger, checkpoints and export, and retention
``delete`` removes a feature only after both groups have trained it, leaving none at the end."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from pipeline.app.audit import audit_run
from pipeline.app.config_file import load_config
from pipeline.app.export_job import export_run
from pipeline.app.runtime import build_online_run
from pipeline.app.status import run_status
from pipeline.core.errors import ConfigError, OptionError
from pipeline.core.topics import RunTopics
from pipeline.ledger import effective_history, read_ledger
from pipeline.storage import FeatureStore
from pipeline.train.group_retention import RELEASED_DIR
from pipeline.transport.kafka import KafkaSettings
from tests.faults.harness import stage
from tests.integration.test_runtime import write_config
from tests.support import spawn, wait_exit

pytestmark = pytest.mark.integration

GROUPS = {"deep": {"ttt_steps": 3}, "shallow": {"ttt_steps": 1, "lr": 1e-3}}


def _sample_id(uri: str) -> str:
    """``features/<p>/<sample id>.<attempt>.safetensors`` -> the sample id."""
    return uri.rsplit("/", 1)[1].rsplit(".", 2)[0]


@pytest.mark.slow
def test_two_groups_train_every_sample_and_delete_features_only_after_both(
    kafka: KafkaSettings, run_id: str, tmp_path: Path, tiny_target_dir: Path
) -> None:
    from pipeline.train.export import load_exported

    conversations = 32  # 16 steps of 2 per group, no tail
    config = load_config(write_config(
        tmp_path, kafka, run_id, tiny_target_dir, conversations=conversations,
        storage={"retention": "delete"}, train={"save_interval": 2, "keep_last": 2}, train_groups=GROUPS,
    ))  # fmt: skip
    store = FeatureStore(str(tmp_path / "features"), run_id)
    first_seen: dict[str, float] = {}  # uri -> when the sampler first saw it
    gone_at: dict[str, float] = {}  # uri -> when the sampler first saw it deleted
    done = threading.Event()

    def sample_storage() -> None:  # bounded by the run: it ends when the run returns
        while not done.is_set():
            now, present = time.time(), set(store.list())
            for uri in present:
                first_seen.setdefault(uri, now)
            for uri in set(first_seen) - present:
                gone_at.setdefault(uri, now)
            done.wait(0.05)

    sampler = threading.Thread(target=sample_storage, daemon=True)
    sampler.start()
    try:
        result = build_online_run(config).run()
    finally:
        done.set()
        sampler.join(timeout=10)
    assert result.reason == "end_of_stream"
    assert set(result.groups) == set(GROUPS)
    for name, group in result.groups.items():
        assert group.summary.startswith(f"{conversations} of {conversations} prompts trained, 0 missing"), (name, group)
        assert group.export_dir == str(tmp_path / "out" / name / "export")
        assert load_exported(group.export_dir, tiny_target_dir) is not None
        assert (tmp_path / "out" / name / "metrics.jsonl").is_file()
        assert list((tmp_path / "out" / name / "checkpoints").iterdir())

    # Each group has its own ledger, and each audits clean; the run's own ledger stays empty.
    trained_at: dict[str, dict[str, float]] = {}
    for name in GROUPS:
        assert RunTopics(run_id, name).ledger == f"{run_id}.ledger.{name}"
        audit = audit_run(kafka, run_id, group=name)
        assert audit.ok and audit.total("trained_once") == conversations, audit.to_json()
        history = effective_history(read_ledger(kafka, run_id, group=name))
        assert len(history) == result.groups[name].steps == conversations // 2
        trained_at[name] = {sid: step.created_at for step in history for r in step.ranks for sid in r.sample_ids}
    assert read_ledger(kafka, run_id, timeout_s=10) == []
    with pytest.raises(OptionError, match="trainer groups: deep, shallow"):
        audit_run(kafka, run_id)  # which ledger? one audit per group
    assert load_exported(export_run(config, None, tmp_path / "again", "shallow"), tiny_target_dir) is not None
    with pytest.raises(ConfigError, match="declares trainer groups"):
        export_run(config, None, tmp_path / "again")
    depth = {name: len(effective_history(read_ledger(kafka, run_id, group=name))[-1].metrics.ploss) for name in GROUPS}
    assert depth == {"deep": 3, "shallow": 1}  # each group trained its own draft, at its own TTT depth

    # Retention: no feature went before both groups had trained it; none is left, nor any marker.
    assert gone_at, "the sampler saw no deletion during the run"
    for uri, when in gone_at.items():
        sid = _sample_id(uri)
        for name in GROUPS:
            assert sid in trained_at[name], (uri, name)
            assert when >= trained_at[name][sid], f"{uri} deleted before group {name} trained it"
    assert store.list() == []
    released = tmp_path / "features" / run_id / RELEASED_DIR
    assert not released.exists() or not [p for p in released.rglob("*") if p.is_file()]

    status = run_status(kafka, run_id)
    assert {name: g.latest.step for name, g in status.groups.items() if g.latest} == {
        name: conversations // 2 for name in GROUPS}  # fmt: skip
    assert status.consumed == conversations


def test_train_on_a_run_with_groups_names_its_group(kafka: KafkaSettings, run_id: str, tmp_path: Path,
                                                    tiny_target_dir: Path) -> None:  # fmt: skip
    config = write_config(tmp_path, kafka, run_id, tiny_target_dir, train_groups=GROUPS)
    code, out = wait_exit(spawn(["train", "--config", str(config)]), timeout_s=120)
    assert code != 0 and "`--group`" in out and "deep, shallow" in out, out
    code, out = wait_exit(spawn(["train", "--config", str(config), "--group", "wide"]), timeout_s=120)
    assert code != 0 and "'wide' is not a declared trainer group" in out, out


@pytest.mark.slow
def test_two_groups_as_processes_each_train_their_own_group(
    kafka: KafkaSettings, run_id: str, tmp_path: Path, tiny_target_dir: Path
) -> None:
    """``specstream train --group NAME`` per group beside the source and one generator process."""
    conversations = 16
    config = write_config(tmp_path, kafka, run_id, tiny_target_dir, conversations=conversations,
                          storage={"retention": "delete"}, train_groups=GROUPS)  # fmt: skip
    trainers = {name: stage("train", config, "--group", name) for name in GROUPS}  # before the source: they wait
    code, out = wait_exit(stage("source", config), timeout_s=180)
    assert code == 0, out
    code, out = wait_exit(stage("generate", config, "--worker-id", "g1"), timeout_s=300)
    assert code == 0, out
    for name, trainer in trainers.items():
        code, out = wait_exit(trainer, timeout_s=300)
        assert code == 0 and f"trainer group {name}: {conversations} of {conversations} prompts trained" in out, out
        assert list((tmp_path / "out" / name / "checkpoints").iterdir())
        # by run id: with --config the audit also verifies each ref's file, which retention deleted
        audit = ["audit", "--run-id", run_id, "--bootstrap", kafka.bootstrap_servers, "--group", name, "--json"]
        code, out = wait_exit(spawn(audit), timeout_s=120)
        assert code == 0, out
        report = json.loads(out[out.index("{") :])
        assert report["ok"] and report["totals"]["trained_once"] == conversations, report["totals"]
    assert FeatureStore(str(tmp_path / "features"), run_id).list() == []
