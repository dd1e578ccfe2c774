"""Issue 8 item 4: a failure a user causes at start is one `error:` line that names the fix, exit 2,
and nothing written. None of these needs a broker: the checks come before any Kafka client, or
the broker's address answers nowhere. (SASL, fencing, the quickstart's workdir and replay's
``--out`` need a real broker: ``tests/integration/test_start_errors.py``.)
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from tests.app.test_cli import nothing_written, run, write
from tests.support import one_error, specstream_command

NOWHERE = "kafka.invalid:9092"  # RFC 6761: never resolves, so it fails at once, on every machine
QUICK = {"bootstrap.timeout.ms": 2000}  # a bootstrap that cannot succeed gives up after 2 s

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")


def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    return run([specstream_command(), *args], env=env)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """A valid config (synthetic target, data present) whose broker answers nowhere."""
    (tmp_path / "data.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    return edit(write(tmp_path), broker={"bootstrap_servers": NOWHERE, "client_options": QUICK})


@pytest.fixture(scope="module")
def without_s3fs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment of a machine without the s3 extra: a package first on the path whose import
    fails the way a missing one does (CI installs s3fs for the S3 tests)."""
    shadow = tmp_path_factory.mktemp("no-s3fs")
    (shadow / "s3fs").mkdir()
    (shadow / "s3fs" / "__init__.py").write_text(
        'raise ModuleNotFoundError("No module named \'s3fs\'", name="s3fs")\n'
    )
    path = os.pathsep.join(p for p in (str(shadow), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path}


def edit(path: Path, **sections: dict[str, Any]) -> Path:
    raw = yaml.safe_load(path.read_text())
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    path.write_text(yaml.safe_dump(raw))
    return path


def hf_target(tmp_path: Path, **target: Any) -> dict[str, Any]:
    """An hf target section over a directory that passes the model check (a config.json)."""
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text("{}")
    return {"backend": "hf", "model": str(model), **target}


# --- storage and devices ---------------------------------------------------------------------


@pytest.mark.parametrize("command", ["run", "source", "generate", "train", "export", "replay"])
def test_an_s3_root_without_s3fs_names_the_extra(
    config: Path, tmp_path: Path, command: str, without_s3fs: dict[str, str]
) -> None:
    edit(config, storage={"root": "s3://bucket/features"})
    extra = ["--out", str(tmp_path / "replay")] if command == "replay" else []
    code, out = cli(command, "--config", str(config), *extra, env=without_s3fs)
    assert code == 2, out
    line = one_error(out)
    assert "storage.root" in line and "pip install 'specstream[s3]'" in line
    assert nothing_written(tmp_path) and not (tmp_path / "replay").exists()


@pytest.mark.skipif(importlib.util.find_spec("gcsfs") is not None, reason="gcsfs is installed here")
def test_a_gcs_root_without_gcsfs_names_the_extra(config: Path, tmp_path: Path) -> None:
    code, out = cli("run", "--config", str(edit(config, storage={"root": "gs://bucket/features"})))
    assert code == 2, out
    assert "storage.root" in (line := one_error(out)) and "pip install 'specstream[gcs]'" in line
    assert nothing_written(tmp_path)


def test_s3_data_without_s3fs_names_the_key(config: Path, tmp_path: Path, without_s3fs: dict[str, str]) -> None:
    config = edit(config, data={"path": "s3://bucket/chats.jsonl"})
    code, out = cli("source", "--config", str(config), env=without_s3fs)
    assert code == 2, out
    assert "data.path" in (line := one_error(out)) and "pip install 'specstream[s3]'" in line
    assert nothing_written(tmp_path)


@no_cuda
@pytest.mark.parametrize(
    ("command", "section"), [("train", "train"), ("run", "train"), ("generate", "target"), ("run", "target")]
)
def test_cuda_without_cuda_stops_the_stage_that_uses_the_device(
    config: Path, tmp_path: Path, command: str, section: str
) -> None:
    if section == "target":
        edit(config, target=hf_target(tmp_path, device="cuda"))
    else:
        edit(config, train={"device": "cuda"})
    code, out = cli(command, "--config", str(config))
    assert code == 2, out
    line = one_error(out)
    assert f"`{section}.device`" in line and "CUDA is not available here" in line and "use cpu" in line
    assert nothing_written(tmp_path)


@pytest.mark.parametrize("device", ["cdua", "gpu"])
@pytest.mark.parametrize("section", ["train", "target"])
def test_a_misspelt_device_lists_the_valid_ones(config: Path, tmp_path: Path, section: str, device: str) -> None:
    edit(config, **{section: {"device": device}})
    code, out = cli("run", "--config", str(config))
    assert code == 2, out
    line = one_error(out)
    assert f"`{section}.device`" in line and "did you mean `cuda`" in line and "use cpu, cuda, cuda:N or mps" in line
    assert nothing_written(tmp_path)


# --- Kafka client options, on every stage ------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "options", "key", "fix"),
    [
        ("run", {"sasl.mechansim": "PLAIN"}, "sasl.mechansim", "did you mean `sasl.mechanism`"),
        ("source", {"security.protocol": "SASL_PLAIN"}, "security.protocol", "did you mean `SASL_PLAINTEXT`"),
        ("generate", {"security.protocol": "SASL_SSL", "sasl.mechanism": "PLAIN"}, "sasl.username",
         "${KAFKA_PASSWORD}"),
        ("train", {"group.id": "mine"}, "group.id", "specstream sets it"),
        ("status", {"request.timeout.ms": "30s"}, "request.timeout.ms", "a number"),
    ],
)  # fmt: skip
def test_a_wrong_client_option_stops_every_stage(
    config: Path, tmp_path: Path, command: str, options: dict[str, Any], key: str, fix: str
) -> None:
    edit(config, broker={"client_options": options})
    code, out = cli(command, "--config", str(config))
    assert code == 2, out
    line = one_error(out)
    assert f"broker.client_options.{key}" in line and fix in line
    assert nothing_written(tmp_path)


def test_a_tls_file_that_is_not_there_is_named(config: Path, tmp_path: Path) -> None:
    edit(config, broker={"client_options": {"security.protocol": "SSL", "ssl.cafile": str(tmp_path / "ca.pem")}})
    code, out = cli("source", "--config", str(config))
    assert code == 2, out
    assert "broker.client_options.ssl.cafile" in (line := one_error(out)) and "ca.pem is not a file" in line
    assert nothing_written(tmp_path)


# --- the broker's address ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "env", "origin"),
    [
        (["run"], {}, "broker.bootstrap_servers"),
        (["status", "--bootstrap", NOWHERE], {}, "--bootstrap"),
        (["status"], {"KAFKA_BOOTSTRAP_SERVERS": NOWHERE}, "KAFKA_BOOTSTRAP_SERVERS"),
    ],
    ids=["config", "flag", "variable"],
)
def test_an_unreachable_remote_broker_names_where_its_address_came_from(
    config: Path, tmp_path: Path, args: list[str], env: dict[str, str], origin: str
) -> None:
    if origin != "broker.bootstrap_servers":  # the flag and the variable override the config's address
        edit(config, broker={"bootstrap_servers": "the-configs-own.invalid:9092"})
    code, out = cli(*args, "--config", str(config), env=env)
    assert code == 2, out
    line = one_error(out)
    assert f"no Kafka broker answers at {NOWHERE} (from {origin}" in line, line
    assert "specstream broker start" not in line and "check the address" in line
    assert nothing_written(tmp_path)


def test_a_local_address_that_is_not_up_advises_the_local_broker(config: Path, tmp_path: Path) -> None:
    code, out = cli("run", "--config", str(edit(config, broker={"bootstrap_servers": "127.0.0.1:1"})))
    assert code == 2, out
    line = one_error(out)
    assert "no Kafka broker answers at 127.0.0.1:1 (from broker.bootstrap_servers)" in line
    assert "specstream broker start" in line
    assert nothing_written(tmp_path)


# --- command-line options ----------------------------------------------------------------------


def test_export_of_a_checkpoint_that_does_not_exist_says_what_one_looks_like(config: Path, tmp_path: Path) -> None:
    code, out = cli("export", "--config", str(config), "--checkpoint", "/does/not/exist")
    assert code == 2, out
    line = one_error(out)
    assert "`--checkpoint`: /does/not/exist does not exist" in line and "step-NNNNNNNNN" in line
    assert "meta.json" in line and "train first" in line
    assert nothing_written(tmp_path)


def test_export_of_a_directory_that_is_no_checkpoint_lists_the_runs(config: Path, tmp_path: Path) -> None:
    step = tmp_path / "out" / "checkpoints" / "step-000000004"
    step.mkdir(parents=True)
    (step / "meta.json").write_text("{}")
    code, out = cli("export", "--config", str(config), "--checkpoint", str(tmp_path))
    assert code == 2, out
    line = one_error(out)
    assert f"{tmp_path} is not a checkpoint directory" in line and "pass one of this run's (step-000000004" in line
    assert not (tmp_path / "out" / "export").exists()


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["generate"], "--config"),
        (["status"], "--run-id"),
        # issue 9.3: a generator without a config never falls back to random synthetic features
        (["generate", "--run-id", "r", "--storage", "/tmp/specstream-unused", "--bootstrap", "127.0.0.1:1"], "--backend"),
    ],
    ids=["generate", "status", "generate-backend"],
)
def test_a_missing_option_is_named(args: list[str], option: str) -> None:
    code, out = cli(*args)
    assert code == 2, out
    assert f"option `{option}`: is missing" in one_error(out)


# --- what the project did not foresee -----------------------------------------------------------


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
@pytest.mark.parametrize("verbose", [False, True], ids=["quiet", "verbose"])
def test_a_full_disk_is_one_line_naming_the_cause_with_the_traceback_kept(
    tmp_path: Path, tiny_target_dir: Path, verbose: bool
) -> None:
    """The conversations file is a link to /dev/full: writing it fails with ENOSPC, as on a full disk."""
    workdir, temp = tmp_path / "quickstart", tmp_path / "tmp"
    (workdir / "data").mkdir(parents=True)
    temp.mkdir()
    os.symlink("/dev/full", workdir / "data" / "conversations.jsonl")
    args = ["quickstart", "--workdir", str(workdir), "--bootstrap", NOWHERE, "--conversations", "8"]
    code, out = cli(*args, *(["--verbose"] if verbose else []), env={"TMPDIR": str(temp)})
    assert code == 1, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out
    conversations = workdir / "data" / "conversations.jsonl"
    assert errors[0].startswith(f"error: no space left on device writing {conversations}: free space, or set "), out
    assert "then run the same command again: it resumes exactly" in errors[0]
    kept = list(temp.glob("specstream-traceback-*.txt"))
    if verbose:
        assert "Traceback (most recent call last)" in out and not kept
    else:
        assert "Traceback" not in out and len(kept) == 1 and f"(traceback: {kept[0]})" in errors[0]
        assert "Traceback (most recent call last)" in kept[0].read_text() and "write_jsonl" in kept[0].read_text()
    assert not (workdir / "config.yaml").exists()


def test_a_gpu_index_beyond_the_machines_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """In process, with torch told it sees one GPU: cuda:1 is refused with the count, cuda:0 passes."""
    from pipeline.app.config_file import parse_config
    from pipeline.app.preflight import check_local
    from pipeline.core.errors import ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    raw = {"run_id": "r", "storage": {"root": str(tmp_path / "features")}, "data": {"path": "-"},
           "target": {"backend": "synthetic"}, "train": {"device": "cuda:1"}}  # fmt: skip
    with pytest.raises(ConfigError) as info:
        check_local(parse_config(raw), ("train",))
    assert info.value.key == "train.device" and "this machine has 1 CUDA device(s)" in str(info.value)
    check_local(parse_config({**raw, "train": {"device": "cuda:0"}}), ("train",))
