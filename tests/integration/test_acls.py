"""Issue 11 item 3: SASL (SCRAM-SHA-512) with the standard authorizer, each role least privilege.

One broker for the module (SCRAM listener, ACLs deny by default, ``admin`` a super user). The
admin grants the run's ACLs with ``specstream acls --apply``; then source, generator and trainer
run as ``specstream`` processes, each with its own user and its password from ``${ENV}`` in its
config; status and audit read with the read-only user. A wrong password and a write outside a
role's grants are each one clear line; no password appears in any output or file written.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from pipeline.core.errors import BrokerError
from pipeline.core.topics import RunTopics
from pipeline.transport import kafka_jars
from pipeline.transport.broker import LocalKafka
from pipeline.transport.kafka import KafkaSettings
from tests.integration.test_runtime import write_config
from tests.support import one_error, spawn, wait_exit

pytestmark = [pytest.mark.integration, pytest.mark.slow]

USERS = {"admin": "admin-pw-1", "src": "src-pw-2", "gen": "gen-pw-3", "trn": "trn-pw-4", "ro": "ro-pw-5"}
ROLE_USERS = {"source": "src", "generate": "gen", "train": "trn", "read-only": "ro"}
VARIABLE = "SPECSTREAM_T_KAFKA_PASSWORD"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafka]:
    if not (shutil.which("java") and kafka_jars.libs_dir().is_dir()):
        if os.environ.get("CI") or os.environ.get("KAFKA_TEST_REQUIRED"):
            pytest.fail("the SCRAM broker needs java and the Kafka jars (specstream broker install)")
        pytest.skip("the SCRAM broker needs java and the Kafka jars (specstream broker install)")
    with LocalKafka(
        tmp_path_factory.mktemp("kafka-scram"), scram_users=USERS, super_users=("admin",)
    ) as broker:
        yield broker


def client_options(user: str) -> dict[str, object]:
    return {
        "security.protocol": "SASL_PLAINTEXT",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": user,
        "sasl.password": "${" + VARIABLE + "}",
        "bootstrap.timeout.ms": 10000,
    }


def settings(broker: LocalKafka, user: str, password: str | None = None) -> KafkaSettings:
    options = {**client_options(user), "sasl.password": password or USERS[user]}
    return KafkaSettings(broker.sasl_bootstrap, options)


def role_configs(tmp_path: Path, broker: LocalKafka, run_id: str, target: Path) -> dict[str, Path]:
    """One config per user: the same run, only the client options differ (they are not fingerprinted)."""
    base = write_config(tmp_path, KafkaSettings(broker.sasl_bootstrap), run_id, target, conversations=8,
                        data={"partitions": 2})  # fmt: skip
    raw = yaml.safe_load(base.read_text())
    paths = {}
    for user in USERS:
        raw["broker"]["client_options"] = client_options(user)
        paths[user] = tmp_path / f"{user}.yaml"
        paths[user].write_text(yaml.safe_dump(raw))
    return paths


def run_as(user: str, args: list[str], password: str | None = None) -> tuple[int, str]:
    return wait_exit(spawn(args, env={VARIABLE: password or USERS[user]}), timeout_s=300)


def grant(configs: dict[str, Path]) -> None:
    roles = [arg for role, user in ROLE_USERS.items() for arg in (f"--{role}", user)]
    code, out = run_as("admin", ["acls", "--apply", "--config", str(configs["admin"]), *roles])
    assert code == 0 and "ACL bindings for source src" in out, out


def test_each_stage_runs_with_its_own_principal_and_no_password_is_shown(
    secure_broker: LocalKafka, tmp_path: Path, run_id: str, tiny_target_dir: Path
) -> None:
    configs = role_configs(tmp_path, secure_broker, run_id, tiny_target_dir)
    code, out = run_as("src", ["source", "--config", str(configs["src"])])
    assert code == 2, out  # no ACL yet: deny by default
    topics = RunTopics(run_id)
    assert (
        f"not authorized: the Kafka broker refused principal User:src CREATE on topic {topics.dlq}, "
        in one_error(out)
    )
    grant(configs)
    outputs = [out]
    code, out = run_as("src", ["source", "--config", str(configs["src"])])
    outputs.append(out)
    assert code == 0 and "8 prompts published" in out, out
    trainer = spawn(["train", "--config", str(configs["trn"])], env={VARIABLE: USERS["trn"]})
    code, out = run_as("gen", ["generate", "--config", str(configs["gen"]), "--worker-id", "g0"])
    outputs.append(out)
    assert code == 0 and "8 samples" in out, out
    code, out = wait_exit(trainer, timeout_s=300)
    outputs.append(out)
    assert code == 0 and "8 of 8 prompts trained, 0 missing" in out, out
    for command in ("status", "audit"):
        code, out = run_as("ro", [command, "--config", str(configs["ro"])])
        outputs.append(out)
        assert code == 0 and run_id in out, out
    code, out = run_as("ro", ["config", "check", str(configs["ro"])])
    outputs.append(out)
    written = [p.read_text(errors="replace") for p in tmp_path.rglob("*") if p.is_file() and p.suffix in
               (".yaml", ".json", ".jsonl", ".txt", ".log", ".md")]  # fmt: skip
    written += [p.read_text(errors="replace") for p in secure_broker.workdir.glob("*.*") if p.is_file()]
    for password in USERS.values():
        assert not any(password in text for text in outputs + written), password


def test_a_wrong_password_fails_at_start_with_one_line(
    secure_broker: LocalKafka, tmp_path: Path, run_id: str, tiny_target_dir: Path
) -> None:
    configs = role_configs(tmp_path, secure_broker, run_id, tiny_target_dir)
    code, out = run_as("src", ["source", "--config", str(configs["src"])], password="not-the-password")
    assert code == 2, out
    line = one_error(out)
    assert "answered, but authentication failed for user 'src' (SASL SCRAM-SHA-512)" in line, line
    assert "not-the-password" not in out


def test_a_trainer_cannot_write_to_the_prompts_topic(
    secure_broker: LocalKafka, run_id: str, tmp_path: Path
) -> None:
    """infra/acls.sh grants the trainer its ACLs with Kafka's own kafka-acls; a write to prompts
    is then one line naming the principal, the permission and the topic; its ledger it may write."""
    topics = RunTopics(run_id)
    with settings(secure_broker, "admin").admin() as admin:
        admin.ensure_run_topics(topics, 1)
    admin_properties = tmp_path / "admin.properties"
    admin_properties.write_text(
        "security.protocol=SASL_PLAINTEXT\nsasl.mechanism=SCRAM-SHA-512\nsasl.jaas.config="
        f'org.apache.kafka.common.security.scram.ScramLoginModule required username="admin" password="{USERS["admin"]}";\n'
    )
    script = [str(REPO / "infra" / "acls.sh"), "--bootstrap-server", secure_broker.sasl_bootstrap,
              "--command-config", str(admin_properties), "--", "--run-id", run_id, "--train", "trn"]  # fmt: skip
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # the `specstream` under test
    done = subprocess.run(
        script, capture_output=True, text=True, timeout=300, check=False, env={**os.environ, "PATH": path}
    )
    assert done.returncode == 0 and done.stdout.count("granted: ") == 6, done.stdout + done.stderr
    producer = settings(secure_broker, "trn").plain_producer()
    try:
        producer.send(topics.ledger, b"ok", partition=0)  # the control: its own ledger it may write
        producer.flush(timeout_s=30, ride_out=False)
        producer.send(topics.prompts, b"forged", partition=0)
        with pytest.raises(BrokerError) as caught:
            producer.flush(timeout_s=30, ride_out=False)
    finally:
        producer.close()
    message = str(caught.value)
    assert "\n" not in message
    assert f"refused principal User:trn WRITE on topic {topics.prompts}: no ACL grants it" in message, message


def test_a_user_added_through_the_admin_api_can_log_in(secure_broker: LocalKafka) -> None:
    with settings(secure_broker, "admin").admin() as admin:
        admin.upsert_scram_users({"late": "late-pw-6"})
    with KafkaSettings(
        secure_broker.sasl_bootstrap, {**client_options("late"), "sasl.password": "late-pw-6"}
    ).admin() as admin:
        assert admin.topics() == set()  # authenticated; no ACL lets it see any topic


def test_a_wrong_password_is_not_ridden_out_like_an_outage(secure_broker: LocalKafka) -> None:
    """A process that has reached the broker before rides out an outage when it opens a client;
    a refused password is no outage: it fails at once (within the bootstrap timeout)."""
    with settings(secure_broker, "admin").admin() as admin:
        admin.topics()  # this process has now reached the broker
    started = time.monotonic()
    with pytest.raises(BrokerError) as caught:
        settings(secure_broker, "trn", password="not-the-password").admin()
    assert time.monotonic() - started < 60  # the outage budget is 180 s
    assert "answered, but authentication failed for user 'trn' (SASL SCRAM-SHA-512)" in str(caught.value)
    assert "not-the-password" not in str(caught.value)
