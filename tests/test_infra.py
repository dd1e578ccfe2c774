"""infra/ for a platform team: the compose stack validates with Compose itself, and the Kubernetes
layout (not run on a cluster here) parses, has the expected objects and agrees with the
production example it mounts."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.app.config_file import load_config

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
EXAMPLE = ROOT / "examples" / "production-8b.yaml"


def _compose_installed() -> bool:
    plugin = shutil.which("docker") and subprocess.run(
        ["docker", "compose", "version"], capture_output=True, timeout=30, check=False).returncode == 0  # fmt: skip
    return bool(plugin or shutil.which("docker-compose"))


def _check(file: Path | None = None) -> subprocess.CompletedProcess[str]:
    args = ["bash", str(INFRA / "check-compose.sh"), *([str(file)] if file else [])]
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.skipif(not _compose_installed(), reason="no Compose (plugin or docker-compose) installed")
def test_compose_stack_is_valid_for_compose_and_a_broken_one_is_one_error_line(tmp_path: Path) -> None:
    done = _check()
    assert done.returncode == 0, done.stderr
    for service in ("kafka-1", "kafka-2", "kafka-3", "minio", "init", "source", "generator", "trainer"):
        assert f" {service} " in f" {done.stdout.split('services: ')[1]} ", done.stdout

    broken = tmp_path / "compose.yaml"
    text = (INFRA / "compose.yaml").read_text().replace("restart: unless-stopped", "restrat: unless-stopped")
    broken.write_text(text)
    (tmp_path / "compose").mkdir()
    done = _check(broken)
    assert done.returncode == 1 and done.stderr.count("error:") == 1 and "restrat" in done.stderr, done.stderr


def test_compose_stack_is_production_shaped() -> None:
    stack = yaml.safe_load((INFRA / "compose.yaml").read_text())
    services = stack["services"]
    brokers = [s for s in services.values() if s.get("image") == "specstream-kafka:4.3.1"]
    voters = {s["environment"]["KAFKA_QUORUM_VOTERS"] for s in brokers}
    assert len(brokers) == 3 and voters == {"1@kafka-1:9093,2@kafka-2:9093,3@kafka-3:9093"}
    assert {s["environment"]["KAFKA_NODE_ID"] for s in brokers} == {"1", "2", "3"}
    ours = {name for name, s in services.items() if s.get("image") == "specstream:0.1.0"}
    assert {"init", "source", "generator", "trainer"} <= ours
    assert services["generator"]["deploy"]["replicas"] == 2
    assert "topics apply" in " ".join(services["init"]["command"])


def test_compose_run_config_loads_and_replicates_over_the_three_brokers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)  # the file's brokers, not an override
    monkeypatch.delenv("SPECSTREAM_STORAGE", raising=False)
    cfg = load_config(INFRA / "compose" / "run.yaml")
    assert len(cfg.broker.bootstrap_servers.split(",")) == cfg.topics.replication_factor == 3
    assert cfg.topics.min_insync_replicas == 2
    assert cfg.storage.root.startswith("s3://") and cfg.train.output_dir.startswith("s3://")


def _k8s() -> list[dict[str, Any]]:
    docs = []
    for path in sorted((INFRA / "k8s").glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return list(doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []))


def test_k8s_layout_parses_with_the_expected_objects() -> None:
    docs = _k8s()
    kinds = sorted(f"{d['kind']}/{d['metadata']['name']}" for d in docs)
    assert kinds == [
        "ConfigMap/specstream-run", "Job/specstream-source", "Job/specstream-topics", "Job/specstream-trainer",
        "Namespace/specstream", "Service/specstream-trainer", "StatefulSet/specstream-generator",
    ]  # fmt: skip
    workloads = [d for d in docs if _containers(d)]
    for doc in workloads:  # the password by reference to a Secret, never a value
        env = {e["name"]: e for c in _containers(doc) for e in c.get("env", [])}
        assert env["KAFKA_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "specstream-kafka", doc["metadata"]
    configmap = next(d for d in docs if d["kind"] == "ConfigMap")
    assert configmap["data"]["run.yaml"] == EXAMPLE.read_text(), "regenerate infra/k8s/20-config.yaml"


def test_k8s_trainer_and_generators_match_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_PASSWORD", "from-the-secret-store")
    monkeypatch.delenv("SPECSTREAM_STORAGE", raising=False)
    cfg = load_config(EXAMPLE)
    docs = {(d["kind"], d["metadata"]["name"]): d for d in _k8s()}
    job = docs["Job", "specstream-trainer"]
    command = _containers(job)[0]["command"]
    flags = dict(a.removeprefix("--").split("=", 1) for a in command if a.startswith("--") and "=" in a)
    assert int(flags["nnodes"]) * int(flags["nproc-per-node"]) == cfg.train.world_size
    assert job["spec"]["completions"] == int(flags["nnodes"]) and job["spec"]["completionMode"] == "Indexed"
    gpus = _containers(job)[0]["resources"]["limits"]["nvidia.com/gpu"]
    assert gpus == int(flags["nproc-per-node"])
    generators = docs["StatefulSet", "specstream-generator"]
    assert generators["spec"]["replicas"] <= cfg.data.partitions  # more would sit idle in the group
    assert _containers(generators)[0]["resources"]["limits"]["nvidia.com/gpu"] == 1  # one process per GPU
    assert cfg.train.output_dir.startswith("s3://")  # no shared filesystem between trainer nodes
