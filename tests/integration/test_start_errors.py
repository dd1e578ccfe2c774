"""Issue 8 item 4 on real brokers: a wrong SASL password, a fenced generator, a quickstart workdir
that holds another run. Each is one `error:` line that says what happened and the fix; the
start-up ones exit 2 and write nothing (no topics, no files).

The SASL cases run against a second local broker with a SASL_PLAINTEXT listener (PLAIN, one
user): the password is really checked by Kafka, not simulated.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
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
from tests.login_cut import SASL_HANDSHAKE, LoginAnswerCut
from tests.support import (
    event_scalars, make_prompts, one_error, read_messages, spawn, specstream_command, tree_state, wait_exit,
    wait_for_output,
)  # fmt: skip

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


def sasl_config(tmp_path: Path, broker: LocalKafka, run_id: str, address: str | None = None) -> Path:
    """A run config for the SASL listener (or ``address`` in front of it), the password from the environment."""
    (tmp_path / "data.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    raw = {
        "run_id": run_id,
        "broker": {"bootstrap_servers": address or broker.sasl_bootstrap, "client_options": SASL},
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
    chosen = {**SASL, "sasl.password": PASSWORD, **options}  # no outage budget: as at start-up, not mid-run
    address = sasl_broker.sasl_bootstrap if listener == "sasl" else sasl_broker.bootstrap
    with pytest.raises(BrokerError) as info:
        KafkaSettings(address, {k: v for k, v in chosen.items() if v is not None}, outage_budget_s=0.0).admin()
    assert said in str(info.value), info.value


def test_a_mechanism_refusal_whose_answer_was_lost_still_says_which_mechanism(sasl_broker: LocalKafka) -> None:
    """The broker refuses the mechanism and closes; its answer is lost on the way (CI saw it on every
    retry of a 10 s bootstrap): the error still names the mechanism to change."""
    relay = LoginAnswerCut(sasl_broker.sasl_bootstrap, SASL_HANDSHAKE)
    with relay as address:
        options = {**SASL, "sasl.password": PASSWORD, "sasl.mechanism": "SCRAM-SHA-512"}
        with pytest.raises(BrokerError) as info:
            KafkaSettings(address, options, outage_budget_s=0.0).admin()
    assert relay.cut, "no handshake answer was cut: the relay did not stand between them"
    assert str(info.value) == (
        f"the Kafka broker at {address} answered, but its listener does not enable SASL mechanism SCRAM-SHA-512: "
        "it closed the connection on receiving the SASL handshake, as Kafka does when the listener lacks the "
        "mechanism: set broker.client_options.sasl.mechanism to one it enables"
    )


def test_a_refusal_whose_answer_the_brokers_close_overtook_still_says_authentication_failed(
    sasl_broker: LocalKafka, tmp_path: Path, run_id: str
) -> None:
    """The broker refuses the password and closes; its answer is lost on the way, as happens under load
    (CI saw it): the client saw only a disconnect mid-login, and says so as a refusal, not as "no Kafka
    handshake"."""
    relay = LoginAnswerCut(sasl_broker.sasl_bootstrap)
    with relay as address:
        path = sasl_config(tmp_path, sasl_broker, run_id, address)
        code, out = wait_exit(spawn(["status", "--config", str(path)], env={PASSWORD_VARIABLE: "not-the-password"}), 120)
    assert code == 2, out
    assert relay.cut, "no login answer was cut: the relay did not stand between them"
    assert one_error(out) == (
        f"error: the Kafka broker at {address} (from broker.bootstrap_servers) answered, but authentication "
        f"failed for user '{USER}' (SASL PLAIN): it closed the connection on receiving the credentials, as Kafka "
        "does when it refuses them: check broker.client_options sasl.username and sasl.password (and "
        "sasl.mechanism) against the broker's users"
    )


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
    code, out, arrived = _timed_run(args, timeout_s=300)
    assert code == 0 and "2 optimizer steps (max_steps)" in out, out
    _assert_phases(out, arrived)
    scalars = event_scalars(workdir / "out" / "tensorboard")  # report_to's default: TensorBoard
    assert [step for step, _ in scalars["train/loss"]] == [1, 2] and "train/acc_0" in scalars, sorted(scalars)
    code, out = wait_exit(spawn(args), timeout_s=300)  # the same quickstart again: its run, continued
    run_id = yaml.safe_load((workdir / "config.yaml").read_text())["run_id"]
    assert code == 0 and f"continuing run {run_id}" in out and "2 optimizer steps (max_steps)" in out, out
    assert re.search(r"^  Resume += checkpoint step 2 \(offsets p0:\d+, p1:\d+, p2:\d+, p3:\d+\)$", out, re.MULTILINE), out

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


def _seconds(duration: str) -> float:
    """``8.0 s``, ``14 s``, ``2 min 41 s``, ``1 h 02 min`` -> seconds."""
    units = {"h": 3600.0, "min": 60.0, "s": 1.0}
    return sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+) (h|min|s)\b", duration))


def _timed_run(args: list[str], *, timeout_s: float) -> tuple[int, str, dict[str, float]]:
    """``specstream ARGS`` off a terminal: exit code, output, and when each line arrived (seconds
    after the spawn). Bytes, not text: universal newlines would turn a '\\r' into '\\n'."""
    started = time.monotonic()
    proc = subprocess.Popen([specstream_command(), *args], env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    chunks: list[bytes] = []
    arrived: dict[str, float] = {}

    def read() -> None:
        assert proc.stdout is not None
        for line in iter(proc.stdout.readline, b""):
            chunks.append(line)
            arrived.setdefault(line.decode(errors="replace").rstrip("\n"), time.monotonic() - started)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"specstream {' '.join(args)} did not exit within {timeout_s} s") from None
    reader.join(10)
    return proc.returncode, b"".join(chunks).decode(errors="replace"), arrived


def _assert_phases(out: str, arrived: dict[str, float]) -> None:
    """Issue 10 items 1-2, off a terminal: the phase lines in order, the banner before the first
    step, the summary after the bar, no carriage returns, and the whole command's wall time."""
    assert "\r" not in out, "a bar wrote carriage returns into a log"
    lines = out.splitlines()

    def index(prefix: str | tuple[str, ...]) -> int:
        found = [i for i, line in enumerate(lines) if line.startswith(prefix)]
        assert found, f"no line starts with {prefix!r}:\n{out}"
        return found[0]

    order = [
        index("building the tiny target"),
        index("publishing the prompts..."),
        index("***** Running training *****"),
        index("  Total optimizer steps"),
        index(("projected peak feature storage", "feature storage grows with the run")),
        index("training: 1 generator(s) and the trainer"),
        index("training: 1/2 steps (50%)"),
        index("training: 2/2 steps (100%)"),
        index("exporting the draft for SGLang..."),
        index("2 optimizer steps (max_steps)"),
        index("done in "),
    ]
    assert order == sorted(order), out
    assert order[5] < index("generation: ") < order[-1], out  # each generator's samples, while training
    assert re.search(r"^\d+ prompts published after ", out, re.MULTILINE), out
    assert lines[order[3]].endswith("= 2 (max_steps)"), lines[order[3]]
    done = lines[order[-1]]
    assert all(f"{phase} " in done for phase in ("target", "source", "training", "export")), done
    wall = _seconds(done.split(":", 1)[0])
    # The whole command up to that line, process start-up included (the interpreter's teardown after
    # it is not counted); the margin is the line's rounding to whole seconds and the spawn.
    assert wall >= arrived[done] - 1.5, f"{done!r}, but the line came {arrived[done]:.1f} s after the spawn"
