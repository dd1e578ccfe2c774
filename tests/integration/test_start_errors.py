"""Issue 8 item 4 on real brokers: a wrong SASL password, a fenced generator, a quickstart workdir
that holds another run. Each is one `error:` line that says what happened and the fix; the
start-up ones exit 2 and write nothing (no topics, no files).

The SASL cases run against a second local broker with a SASL_PLAINTEXT listener (PLAIN, one
user): the password is really checked by Kafka, not simulated.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.core.errors import BrokerError
from pipeline.core.messages import SampleRef
from pipeline.source.publisher import PromptPublisher
from pipeline.transport import kafka_jars
from pipeline.transport.broker import LocalKafka
from pipeline.transport.kafka import KafkaSettings
from tests.integration.test_generate_failover import TXN_MS, _first, _SourceCut, read_all
from tests.support import make_prompts, one_error, read_messages, spawn, tree_state, wait_exit, wait_for_output
from tests.train.test_trackers import event_scalars

pytestmark = pytest.mark.integration

USER, PASSWORD = "alice", "alice-secret"
PASSWORD_VARIABLE = "SPECSTREAM_T_KAFKA_PASSWORD"
SASL = {
    "security.protocol": "SASL_PLAINTEXT",
    "sasl.mechanism": "PLAIN",
    "sasl.username": USER,
    "sasl.password": "${" + PASSWORD_VARIABLE + "}",
    "bootstrap.timeout.ms": 10000,  # room for the handshake on a loaded 2-core machine (CI)
}


@pytest.fixture(scope="module")
def sasl_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafka]:
    """A local broker whose second listener asks for a SASL PLAIN login (user alice)."""
    if not (shutil.which("java") and (kafka_jars.libs_dir().is_dir() or shutil.which("mvn"))):
        message = "the SASL broker needs java and the Kafka jars (specstream broker install)"
        if os.environ.get("CI") or os.environ.get("KAFKA_TEST_REQUIRED"):
            pytest.fail(message)
        pytest.skip(message)
    with LocalKafka(tmp_path_factory.mktemp("kafka-sasl"), sasl_users={USER: PASSWORD}) as broker:
        yield broker


def sasl_config(tmp_path: Path, broker: LocalKafka, run_id: str) -> Path:
    (tmp_path / "data.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    raw = {
        "run_id": run_id,
        "broker": {"bootstrap_servers": broker.sasl_bootstrap, "client_options": SASL},
        "storage": {"root": str(tmp_path / "features")},
        "data": {"path": str(tmp_path / "data.jsonl")},
        "target": {"backend": "synthetic"},
        "train": {"output_dir": str(tmp_path / "out")},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def topics_of(bootstrap: str, run_id: str) -> set[str]:
    with KafkaSettings(bootstrap).admin() as admin:
        return {t for t in admin.topics() if t.startswith(run_id)}


# --- SASL --------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["run", "source", "generate", "train", "status"])
def test_a_wrong_password_says_the_broker_answered_and_authentication_failed(
    sasl_broker: LocalKafka, tmp_path: Path, run_id: str, command: str
) -> None:
    path = sasl_config(tmp_path, sasl_broker, run_id)
    code, out = wait_exit(spawn([command, "--config", str(path)], env={PASSWORD_VARIABLE: "not-the-password"}), 120)
    assert code == 2, out
    line = one_error(out)
    assert (
        f"the Kafka broker at {sasl_broker.sasl_bootstrap} (from broker.bootstrap_servers) answered, "
        f"but authentication failed for user '{USER}' (SASL PLAIN)"
    ) in line
    assert "sasl.password" in line and "specstream broker start" not in line
    assert not topics_of(sasl_broker.bootstrap, run_id)
    assert not (tmp_path / "features").exists() and not (tmp_path / "out").exists()


def test_the_right_password_gets_past_authentication(sasl_broker: LocalKafka, tmp_path: Path, run_id: str) -> None:
    """The control: the same config with the right password reaches the broker (the run does not exist)."""
    path = sasl_config(tmp_path, sasl_broker, run_id)
    code, out = wait_exit(spawn(["status", "--config", str(path)], env={PASSWORD_VARIABLE: PASSWORD}), 120)
    assert code == 2, out
    assert f"run {run_id} has no topics on this broker" in one_error(out)


@pytest.mark.parametrize(
    ("listener", "options", "said"),
    [
        ("sasl", {"sasl.mechanism": "SCRAM-SHA-512"}, "answered, but its listener does not enable SASL mechanism SCRAM-SHA-512"),
        ("plain", {}, "answered, but that listener does not speak SASL"),
        ("sasl", {"security.protocol": "PLAINTEXT", "sasl.mechanism": None, "sasl.username": None,
                  "sasl.password": None}, "security.protocol (PLAINTEXT) is the listener's"),
    ],
    ids=["mechanism", "sasl-client-plain-listener", "plain-client-sasl-listener"],
)  # fmt: skip
def test_a_client_that_does_not_match_the_listener_is_told_what_to_set(
    sasl_broker: LocalKafka, listener: str, options: dict[str, Any], said: str
) -> None:
    chosen = {**SASL, "sasl.password": PASSWORD, **options}
    address = sasl_broker.sasl_bootstrap if listener == "sasl" else sasl_broker.bootstrap
    with pytest.raises(BrokerError) as info:
        KafkaSettings(address, {k: v for k, v in chosen.items() if v is not None}).admin()
    assert said in str(info.value), info.value


# --- fencing -----------------------------------------------------------------------------------


def test_a_generator_replaced_by_one_with_its_worker_id_exits_with_one_line(kafka, run_topics, storage_root) -> None:
    run_id = run_topics.run_id
    prompts = make_prompts(run_id, 240)
    publisher = PromptPublisher(kafka, run_id, 4, chunk_size=40)
    with pytest.raises(_SourceCut):  # half the prompts, no end of stream: the first worker waits for more
        publisher.publish(_first(prompts, 120))
    args = [
        "generate", "--run-id", run_id, "--storage", storage_root, "--bootstrap", kafka.bootstrap_servers, "--backend", "synthetic",
        "--worker-id", "gen-a", "--partitions", "0,1,2,3", "--hidden-size", "32", "--batch-size", "8",
        "--transaction-timeout-ms", str(TXN_MS),
    ]  # fmt: skip
    first = spawn(args)
    read_messages(  # the first worker has committed everything published: it is idle, its producer open
        kafka, run_topics.samples, range(4), timeout_s=90,
        until=lambda m: sum(isinstance(x, SampleRef) for _, x in m) == 120,
    )  # fmt: skip
    second = spawn([*args, "--verbose"])
    try:
        started = wait_for_output(second, r"at the committed offsets", timeout_s=90)  # its producer fenced the first
        publisher.publish(prompts)  # the rest and the end markers: both try to capture them
        code, out = wait_exit(first, timeout_s=90)
    finally:
        if first.poll() is None:
            first.kill()
    assert code == 1, out
    assert out.strip().splitlines() == [one_error(out)], out  # the whole output is the one line
    assert out.startswith(
        "error: generator gen-a was fenced: another process with the same worker id started "
        f"(transactional id {run_id}.generate.gen-a)"
    ), out
    assert "nothing is lost" in out and "own worker id" in out
    code, rest = wait_exit(second, timeout_s=120)
    assert code == 0, "".join(started) + rest
    ids, stream = read_all(kafka, storage_root, run_id)
    assert sorted(ids) == sorted(p.prompt_id for p in prompts) and stream.summary().duplicates == 0


# --- the quickstart's workdir --------------------------------------------------------------------


def test_a_quickstart_continues_its_own_run_and_refuses_another(kafka, tmp_path: Path, tiny_target_dir: Path) -> None:
    workdir = tmp_path / "quickstart"
    args = ["quickstart", "--workdir", str(workdir), "--bootstrap", kafka.bootstrap_servers,
            "--conversations", "48", "--max-steps", "2"]  # fmt: skip
    code, out = wait_exit(spawn(args), timeout_s=300)
    assert code == 0 and "2 optimizer steps (max_steps)" in out, out
    scalars = event_scalars(workdir / "out" / "tensorboard")  # report_to's default: TensorBoard
    assert [step for step, _ in scalars["train/loss"]] == [1, 2] and "train/acc_0" in scalars, sorted(scalars)
    code, out = wait_exit(spawn(args), timeout_s=300)  # the same quickstart again: its run, continued
    run_id = yaml.safe_load((workdir / "config.yaml").read_text())["run_id"]
    assert code == 0 and f"continuing run {run_id}" in out and "2 optimizer steps (max_steps)" in out, out

    other = tmp_path / "other"  # a workdir whose config.yaml is another run's
    other.mkdir()
    raw = yaml.safe_load((workdir / "config.yaml").read_text())
    raw["run_id"], raw["data"]["path"] = "someone-elses-run", str(tmp_path / "their-chats.jsonl")
    (other / "config.yaml").write_text(yaml.safe_dump(raw))
    with kafka.admin() as admin:
        topics = admin.topics()
    states = {workdir: tree_state(workdir), other: tree_state(other)}
    for where, changed, difference in [
        (workdir, ["--conversations", "64"], "data.limit: 48 in the run, 64 here"),
        (workdir, ["--max-steps", "4"], "train.max_steps: 2 in the run, 4 here"),
        (other, ["--workdir", str(other)], "data.path"),
    ]:
        code, out = wait_exit(spawn([*args, *changed]), timeout_s=120)
        assert code == 2, out
        line = one_error(out)
        assert f"`--workdir`: {where} holds run" in line and difference in line, line
        assert f"specstream run --config {where / 'config.yaml'}" in line and "--workdir <a new directory>" in line
        assert {w: tree_state(w) for w in states} == states, "a refused quickstart wrote into a workdir"
        with kafka.admin() as admin:
            assert admin.topics() == topics, "a refused quickstart created topics"
