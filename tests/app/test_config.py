"""Config: bad settings stop at start with the key and the fix; secrets come from the environment;
Kafka's own client property names work; the fingerprint covers only what changes the result."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pipeline.app.config import FINGERPRINT_KEYS, fingerprint_differences
from pipeline.app.config_file import load_config, parse_config
from pipeline.core.errors import ConfigError

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
BASE: dict[str, Any] = {"run_id": "r1", "data": {"path": "x.jsonl"}, "target": {"backend": "synthetic"}}


def with_(**sections: dict[str, Any]) -> dict[str, Any]:
    """BASE with some sections' keys replaced."""
    return {**BASE, **{name: {**BASE.get(name, {}), **values} for name, values in sections.items()}}


@pytest.fixture(autouse=True)
def _no_environment_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("KAFKA_BOOTSTRAP_SERVERS", "SPECSTREAM_STORAGE"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("name", ["tiny-cpu.yaml", "production-8b.yaml"])
def test_examples_are_valid(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_PASSWORD", "from-the-secret-store")
    config = load_config(EXAMPLES / name)
    assert config.global_batch >= 1 and len(config.fingerprint()) == 16


def test_production_example_trains_in_bf16_with_the_password_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KAFKA_PASSWORD", "s3cret")
    assert "s3cret" not in (EXAMPLES / "production-8b.yaml").read_text()
    config = load_config(EXAMPLES / "production-8b.yaml")
    assert config.train.bf16 and config.train.world_size == 8
    assert config.broker.client_options == {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "specstream",
        "sasl_plain_password": "s3cret",
        "ssl_cafile": "/etc/ssl/certs/kafka-ca.pem",
    }


@pytest.mark.parametrize(
    ("override", "key", "fix"),
    [
        ({**BASE, "trian": {}}, "trian", "did you mean `train`"),
        (with_(train={"lrate": 1}), "train.lrate", "did you mean `train.lr`"),
        (with_(train={"keep_checkpoints": 3}), "train.keep_checkpoints", "it is now `train.keep_last`"),
        (with_(train={"amp": True}), "train.amp", "it is now `train.bf16`"),
        (with_(target={"backend": "hf"}), "target.model", "local model directory"),
        (with_(train={"batch_size": "four"}), "train.batch_size", "config reference"),
        (with_(generate={"high_watermark": 2, "low_watermark": 1}), "generate.high_watermark", "at least 5"),
        (with_(generate={"high_watermark": 10, "low_watermark": 20}), "generate.low_watermark", "below"),
        ({**BASE, "run_id": "no spaces"}, "run_id", ""),
        (with_(generate={"high_watermark": 64, "low_watermark": 64}), "generate.low_watermark", ""),
        (with_(data={"partitions": 5}, train={"world_size": 2}), "data.partitions", "multiple of 2"),
        (with_(data={"partitions": 3}, train={"batch_size": 4}, generate={"high_watermark": 20, "low_watermark": 10}),
         "generate.high_watermark", ">= 21"),
        (with_(train={"device": "gpu"}), "train.device", "use cpu, cuda"),
        (with_(target={"device": "cdua"}), "target.device", "use cpu, cuda"),
        (with_(train={"lr_schedule": "linear"}), "train.lr_schedule", ""),
        (with_(train={"loss_decay": 1.5}), "train.loss_decay", ""),
        (with_(broker={"client_options": {"sasl.passwrd": "x"}}), "broker.client_options.sasl.passwrd",
         "did you mean `sasl.password`"),
        (with_(broker={"client_options": {"security_protocl": "SSL"}}), "broker.client_options.security_protocl",
         "did you mean `security_protocol`"),
        (with_(broker={"client_options": {"transaction.timeout.ms": 1}}), "broker.client_options.transaction.timeout.ms",
         "broker.transaction_timeout_ms"),
        (with_(broker={"client_options": {"group.id": "mine"}}), "broker.client_options.group.id", "exactly-once"),
        (with_(broker={"client_options": {"ssl_context": "x"}}), "broker.client_options.ssl_context", "remove it"),
        # Wrong values: kafka-python would not refuse them, its bootstrap would time out instead.
        (with_(broker={"client_options": {"security.protocol": "SASL_PLAIN"}}),
         "broker.client_options.security.protocol", "did you mean `SASL_PLAINTEXT`"),
        (with_(broker={"client_options": {"security.protocol": "SASL_SSL", "sasl.mechanism": "plain"}}),
         "broker.client_options.sasl.mechanism", "did you mean `PLAIN`"),
        (with_(broker={"client_options": {"security.protocol": "SASL_SSL"}}),
         "broker.client_options.sasl.mechanism", "SCRAM-SHA-512"),
        (with_(broker={"client_options": {"security.protocol": "SASL_SSL", "sasl.mechanism": "PLAIN",
                                          "sasl.username": "alice"}}),
         "broker.client_options.sasl.password", "${KAFKA_PASSWORD}"),
        (with_(broker={"client_options": {"sasl.mechanism": "PLAIN"}}), "broker.client_options.security.protocol",
         "SASL_SSL or SASL_PLAINTEXT"),
        (with_(broker={"client_options": {"request.timeout.ms": "30s"}}), "broker.client_options.request.timeout.ms",
         "a number"),
        (with_(broker={"client_options": {"ssl.check.hostname": "yes"}}), "broker.client_options.ssl.check.hostname",
         "true or false"),
        (with_(target={"device": "gpu"}), "target.device", "did you mean `cuda`"),
    ],
)  # fmt: skip
def test_bad_settings_name_the_key_and_the_fix(override: dict[str, Any], key: str, fix: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(override)
    assert info.value.key == key
    assert fix in str(info.value)


def test_missing_section() -> None:
    with pytest.raises(ConfigError, match="`data`: is required"):
        parse_config({"run_id": "r", "target": {"backend": "synthetic"}})


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run_id: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML at line 1") as info:
        load_config(bad)
    assert "\n" not in str(info.value)


def test_environment_overrides_broker_and_storage(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "k:9092")
    monkeypatch.setenv("SPECSTREAM_STORAGE", "memory://x")
    config = parse_config(BASE)
    assert config.broker.bootstrap_servers == "k:9092" and config.storage.root == "memory://x"


def test_variables_are_expanded_in_every_string_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPECSTREAM_T_USER", "alice")
    monkeypatch.setenv("SPECSTREAM_T_BUCKET", "b1")
    config = parse_config(
        with_(
            broker={"client_options": {"sasl.username": "${SPECSTREAM_T_USER}", "client.id": "run-${SPECSTREAM_T_USER}"}},
            storage={"root": "s3://${SPECSTREAM_T_BUCKET}/features", "options": {"key": ["${SPECSTREAM_T_USER}"]}},
        )
    )
    assert config.broker.client_options == {"sasl_plain_username": "alice", "client_id": "run-alice"}
    assert config.storage.root == "s3://b1/features" and config.storage.options == {"key": ["alice"]}


def test_an_unset_variable_names_the_key_and_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPECSTREAM_T_UNSET", raising=False)
    with pytest.raises(ConfigError) as info:
        parse_config(with_(broker={"client_options": {"sasl.password": "${SPECSTREAM_T_UNSET}"}}))
    assert info.value.key == "broker.client_options.sasl.password"
    assert "SPECSTREAM_T_UNSET is not set" in info.value.problem and "export SPECSTREAM_T_UNSET" in info.value.fix


def test_kafka_and_kafka_python_client_option_names_are_both_accepted() -> None:
    dotted = parse_config(with_(broker={"client_options": {
        "security.protocol": "SSL", "ssl.cafile": "/ca.pem", "ssl.certfile": "/c.pem", "ssl.keyfile": "/k.pem",
        "ssl.endpoint.identification.algorithm": "https", "request.timeout.ms": 20000,
    }}))  # fmt: skip
    native = parse_config(with_(broker={"client_options": {"security_protocol": "SSL", "ssl_cafile": "/ca.pem"}}))
    assert dotted.broker.client_options["security_protocol"] == native.broker.client_options["security_protocol"]
    assert dotted.broker.client_options["ssl_check_hostname"] is True
    assert dotted.broker.client_options["request_timeout_ms"] == 20000


def test_linger_is_owned_by_specstream() -> None:
    with pytest.raises(ConfigError, match="exactly-once"):
        parse_config(with_(broker={"client_options": {"linger.ms": 5}}))


def test_the_same_option_twice_is_refused() -> None:
    with pytest.raises(ConfigError, match="a second time"):
        parse_config(with_(broker={"client_options": {"sasl.username": "a", "sasl_plain_username": "b"}}))


def test_fingerprint_ignores_where_and_how_fast_the_run_executes() -> None:
    base = parse_config(BASE)
    elsewhere = parse_config(with_(
        broker={"bootstrap_servers": "b:2", "transaction_timeout_ms": 90000, "session_timeout_ms": 60000},
        storage={"root": "/other", "retention": "delete"},
        target={"device": "cuda:1", "batch_size": 32},
        generate={"workers": 4, "queue_depth": 1, "drain_timeout_s": 5.0},
        train={"device": "cpu", "output_dir": "/elsewhere", "save_interval": 7, "keep_last": 5, "prefetch": 2,
               "idle_timeout_s": 60, "collective_timeout_s": 60, "max_steps": 10, "resume": "never",
               "deterministic": True},
    ))  # fmt: skip
    assert base.fingerprint() == elsewhere.fingerprint()
    assert fingerprint_differences(base.fingerprint_values(), elsewhere.fingerprint_values()) == []


@pytest.mark.parametrize(
    ("section", "values"),
    [
        ("train", {"lr": 0.5}), ("train", {"ttt_steps": 3}), ("train", {"loss_decay": 0.5}),
        ("train", {"world_size": 2}), ("train", {"grad_accum": 2}), ("train", {"seed": 1}),
        ("train", {"bf16": True}), ("train", {"betas": [0.9, 0.99]}), ("train", {"draft_vocab_size": 100}),
        ("data", {"path": "y.jsonl"}), ("data", {"partitions": 8}), ("target", {"aux_layer_ids": [1, 2, 3]}),
        ("storage", {"dtype": "fp8_e4m3"}),
    ],
)  # fmt: skip
def test_fingerprint_covers_what_changes_the_result(section: str, values: dict[str, Any]) -> None:
    base, changed = parse_config(BASE), parse_config(with_(**{section: values}))
    assert base.fingerprint() != changed.fingerprint()
    (key,) = values
    differences = fingerprint_differences(base.fingerprint_values(), changed.fingerprint_values())
    assert len(differences) == 1 and differences[0].startswith(f"{section}.{key}: ")


def test_fingerprint_keys_exist_and_values_are_json() -> None:
    config = parse_config(with_(storage={"dtype": "bf16"}, train={"epochs": 2}, train_groups={"a": {}, "b": {"lr": 1e-3}}))  # keys added later are left out at their default
    values = config.fingerprint_values()
    assert list(values) == [k for k in FINGERPRINT_KEYS if k != "storage.max_bytes"]  # a budget refuses groups
    budget = {"max_bytes": 0, "retention": "delete"}
    assert "storage.max_bytes" in parse_config(with_(storage=budget, train={"save_interval": 5})).fingerprint_values()
    assert values["train.betas"] == [0.9, 0.95]  # a JSON list, as the manifest stores it
