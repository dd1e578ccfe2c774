"""Every stage's settings come from the one RunConfig, and every default a run uses is RunConfig's.

Each table maps a stage dataclass field to the config key it is derived from. From a minimal
config, the derived value must be the key's RunConfig default; a stage dataclass that keeps a
default of its own for such a field (for code that builds it directly: tests, benchmarks) must
keep the same value, and the trainer's settings keep none at all.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from pydantic import BaseModel

from pipeline.app.config import RunConfig
from pipeline.app.config_file import parse_config
from pipeline.app.settings import (
    generator_settings,
    kafka_settings,
    model_spec,
    source_settings,
    trainer_settings,
)
from pipeline.train.config import TrainerSettings

MINIMAL: dict[str, Any] = {"run_id": "r", "data": {"path": "d.jsonl"}, "target": {"backend": "synthetic"}}

SOURCE = {
    "partitions": "data.partitions",
    "storage_root": "storage.root",
    "max_length": "data.max_length",
    "on_malformed": "data.on_malformed",
    "draft_vocab_size": "train.draft_vocab_size",
    "limit": "data.limit",
    "transaction_timeout_ms": "broker.transaction_timeout_ms",
    "storage_options": "storage.options",
}
GENERATOR = {
    "batch_size": "target.batch_size",
    "transaction_timeout_ms": "broker.transaction_timeout_ms",
    "session_timeout_ms": "broker.session_timeout_ms",
    "queue_depth": "generate.queue_depth",
    "drain_timeout_s": "generate.drain_timeout_s",
}
WATERMARKS = {
    "high": "generate.high_watermark",
    "low": "generate.low_watermark",
    "high_bytes": "generate.high_watermark_bytes",
    "low_bytes": "generate.low_watermark_bytes",
}
TRAINER = {
    "batch_size": "train.batch_size",
    "grad_accum": "train.grad_accum",
    "lr": "train.lr",
    "betas": "train.betas",
    "weight_decay": "train.weight_decay",
    "warmup_ratio": "train.warmup_ratio",
    "schedule": "train.lr_schedule",
    "max_steps": "train.max_steps",
    "grad_clip": "train.grad_clip",
    "ttt_steps": "train.ttt_steps",
    "loss_decay": "train.loss_decay",
    "max_length": "data.max_length",  # train.max_length is null by default: the data's cap
    "seed": "train.seed",
    "bf16": "train.bf16",
    "deterministic": "train.deterministic",
    "save_interval": "train.save_interval",
    "keep_last": "train.keep_last",
    "retention": "storage.retention",
    "resume": "train.resume",
    "prefetch": "train.prefetch",
    "idle_timeout_s": "train.idle_timeout_s",
    "drain_timeout_s": "train.drain_timeout_s",
    "collective_timeout_s": "train.collective_timeout_s",
    "min_trained_fraction": "train.min_trained_fraction",
}


def default(key: str) -> Any:
    """RunConfig's declared default for a dotted key."""
    model: type[BaseModel] = RunConfig
    *sections, name = key.split(".")
    for section in sections:
        model = model.model_fields[section].annotation  # type: ignore[assignment]
    return model.model_fields[name].get_default(call_default_factory=True)


def dataclass_defaults(cls: type) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


@pytest.fixture
def minimal(monkeypatch: pytest.MonkeyPatch) -> RunConfig:
    for name in ("KAFKA_BOOTSTRAP_SERVERS", "SPECSTREAM_STORAGE"):
        monkeypatch.delenv(name, raising=False)
    return parse_config(MINIMAL)


def check(settings: object, table: dict[str, str], *, derived: tuple[str, ...] = ()) -> None:
    """``derived``: fields whose own default is None, meaning "computed from another field"."""
    own = {k: v for k, v in dataclass_defaults(type(settings)).items() if not (k in derived and v is None)}
    for field, key in table.items():
        assert getattr(settings, field) == default(key), f"{type(settings).__name__}.{field} is not {key}'s default"
        if field in own:
            assert own[field] == default(key), f"{type(settings).__name__}.{field} has its own default"


def test_source_settings_are_the_config_defaults(minimal: RunConfig) -> None:
    check(source_settings(minimal), SOURCE)


def test_generator_settings_are_the_config_defaults(minimal: RunConfig) -> None:
    settings = generator_settings(minimal, "gen-0", None)
    check(settings, GENERATOR)
    marks = settings.backpressure
    check(marks, WATERMARKS, derived=("low", "low_bytes"))
    assert marks is not None and (marks.high * 3) // 4 == default("generate.low_watermark")  # Watermarks' rule
    window = settings.trainer
    assert window is not None and (window.world_size, window.batch_size, window.grad_accum) == (
        default("train.world_size"),
        default("train.batch_size"),
        default("train.grad_accum"),
    )
    assert window.prefetch == default("train.prefetch") * default("train.batch_size")


def test_trainer_settings_are_the_config_defaults_and_carry_none_of_their_own(minimal: RunConfig) -> None:
    settings = trainer_settings(minimal, schedule_steps=100)
    check(settings, TRAINER)
    assert not set(TRAINER) & set(dataclass_defaults(TrainerSettings)), "defaults live in RunConfig only"
    assert settings.checkpoint_dir.endswith("out/checkpoints") and settings.schedule_steps == 100
    assert settings.progress is True  # rank 0 reports progress: a bar on a terminal, plain lines in a log


def test_a_cosine_schedule_without_a_length_is_constant(minimal: RunConfig) -> None:
    assert trainer_settings(minimal, schedule_steps=None).schedule == "constant"


def test_model_and_kafka_settings(minimal: RunConfig) -> None:
    spec = model_spec(minimal, "file:///features")
    assert spec.vocab_mapping == "file:///features/r/vocab_mapping.safetensors" and spec.aux_layer_ids is None
    assert kafka_settings(minimal, "h:1").client_options == default("broker.client_options")
