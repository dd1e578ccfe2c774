"""One YAML file configures a run; it is validated completely before anything starts.

Unknown keys, wrong types and impossible combinations stop the run at start with a
``ConfigError`` that names the key and the fix (a misspelt key gets a "did you mean"). The broker
and storage locations can be overridden from the environment (``KAFKA_BOOTSTRAP_SERVERS``,
``SPECSTREAM_STORAGE``), and Kafka client settings (SASL/SSL) pass through ``broker.client_options``.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.core.errors import ConfigError

__all__ = (
    "RunConfig",
    "BrokerConfig",
    "StorageConfig",
    "DataConfig",
    "TargetConfig",
    "GenerateConfig",
    "TrainConfig",
    "load_config",
    "parse_config",
)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BrokerConfig(_Section):
    bootstrap_servers: str | None = Field(
        default=None, description="host:port[,host:port]; null starts the local broker (single-process runs)"
    )
    client_options: dict[str, Any] = Field(
        default_factory=dict, description="passed to every Kafka client: security_protocol, sasl_*, ssl_*"
    )
    transaction_timeout_ms: int = Field(default=60_000, ge=1_000)
    session_timeout_ms: int = Field(default=45_000, ge=6_000)


class StorageConfig(_Section):
    root: str = Field(default="./runs", description="feature storage root: a path or any fsspec URL")
    options: dict[str, Any] = Field(default_factory=dict, description="fsspec storage options")
    retention: Literal["delete", "retain"] = Field(
        default="retain", description="delete: consume-once; retain: keep features for replay and more epochs"
    )


class DataConfig(_Section):
    path: str = Field(description="conversations JSONL (ShareGPT or OpenAI messages), path or fsspec URL")
    max_length: int = Field(default=2048, gt=8)
    partitions: int = Field(default=4, gt=0, description="a multiple of train.world_size keeps ranks balanced")
    on_malformed: Literal["dlq", "fail"] = "dlq"
    limit: int | None = Field(default=None, gt=0, description="use only the first N conversations")


class TargetConfig(_Section):
    backend: Literal["hf", "sglang", "synthetic"] = "hf"
    model: str | None = Field(default=None, description="local model directory (hf, sglang)")
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    aux_layer_ids: list[int] | None = Field(default=None, min_length=3, max_length=3)
    batch_size: int = Field(default=8, gt=0)

    @model_validator(mode="after")
    def _model_for_real_backends(self) -> TargetConfig:
        if self.backend in ("hf", "sglang") and not self.model:
            raise ValueError(
                f"target.model|is required for backend {self.backend}|set it to a local model directory"
            )
        return self


class GenerateConfig(_Section):
    workers: int = Field(default=1, gt=0, description="generator workers in a single-process run")
    high_watermark: int = Field(default=256, gt=0, description="pause generation above this many untrained samples")
    low_watermark: int = Field(default=192, ge=0, description="resume below this many")
    high_watermark_bytes: int | None = Field(default=None, gt=0)
    low_watermark_bytes: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> GenerateConfig:
        if self.low_watermark > self.high_watermark:
            raise ValueError(
                f"generate.low_watermark|{self.low_watermark} exceeds high_watermark {self.high_watermark}|"
                "set it below generate.high_watermark"
            )
        return self


class TrainConfig(_Section):
    world_size: int = Field(default=1, gt=0)
    batch_size: int = Field(default=1, gt=0)
    grad_accum: int = Field(default=1, gt=0)
    lr: float = Field(default=1e-4, gt=0)
    warmup_ratio: float = Field(default=0.015, ge=0, lt=1)
    max_steps: int | None = Field(default=None, gt=0)
    ttt_steps: int = Field(default=7, gt=0)
    draft_vocab_size: int = Field(default=32000, gt=0)
    max_length: int | None = Field(default=None, gt=0)
    save_interval: int = Field(default=100, gt=0)
    keep_checkpoints: int = Field(default=2, gt=0)
    prefetch: int = Field(default=4, gt=0)
    output_dir: str = "./runs/out"
    seed: int = 0
    deterministic: bool = False


class RunConfig(_Section):
    run_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,100}$")
    broker: BrokerConfig = Field(default_factory=BrokerConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    data: DataConfig
    target: TargetConfig
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="after")
    def _window_fits(self) -> RunConfig:
        window = self.train.world_size * self.train.batch_size * self.train.grad_accum
        needed = window + self.train.world_size * self.train.prefetch * self.train.batch_size
        if self.generate.high_watermark < needed:
            raise ValueError(
                f"generate.high_watermark|{self.generate.high_watermark} is below what the trainer must hold "
                f"before it reports progress ({window} samples per global step + {needed - window} "
                f"prefetched = {needed}), so generation and training would wait on each other forever|"
                f"raise it to at least {needed}, or shrink train.batch_size / grad_accum / prefetch"
            )
        return self

    @model_validator(mode="after")
    def _backpressure_cannot_deadlock(self) -> RunConfig:
        """The generators' own watermark checks, at start, under this file's key names."""
        from pipeline.generate.backpressure import (  # noqa: PLC0415
            TrainerWindow,
            Watermarks,
            check_watermarks,
        )

        t, g = self.train, self.generate
        if self.data.partitions % t.world_size:
            raise ValueError(
                f"data.partitions|{self.data.partitions} partitions do not divide over train.world_size "
                f"{t.world_size} ranks: a rank with more partitions would still be draining them after "
                "the others end, while backpressure waits for training progress|"
                f"use a multiple of {t.world_size} partitions"
            )
        try:
            check_watermarks(
                Watermarks(high=g.high_watermark, low=g.low_watermark, high_bytes=g.high_watermark_bytes,
                           low_bytes=g.low_watermark_bytes),
                TrainerWindow(world_size=t.world_size, batch_size=t.batch_size, grad_accum=t.grad_accum,
                              prefetch=t.prefetch * t.batch_size),
                self.data.partitions,
            )  # fmt: skip
        except ConfigError as exc:
            key = {"partitions": "data.partitions"}.get(exc.key, exc.key.replace("backpressure.", "generate."))
            problem = exc.problem.replace("backpressure.", "generate.")
            fix = exc.fix.replace("backpressure.", "generate.") or "see examples/tiny-cpu.yaml"
            raise ValueError(f"{key}|{problem}|{fix}") from None
        if "://" in t.output_dir:
            raise ValueError(
                f"train.output_dir|{t.output_dir} is a URL, but checkpoints are written with POSIX "
                "renames and fsyncs|use a local or shared filesystem path (NFS, Lustre, a mounted bucket)"
            )
        return self

    @property
    def global_batch(self) -> int:
        return self.train.world_size * self.train.batch_size * self.train.grad_accum

    def fingerprint(self) -> str:
        """Hash of what determines the run's data and model (not where it runs)."""
        relevant = self.model_dump(exclude={"broker": True, "storage": {"options"}, "train": {"output_dir"}})
        return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _known_keys(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


def _suggest(loc: tuple[Any, ...]) -> str:
    """For an unknown key, the closest known key of its section."""
    model: type[BaseModel] = RunConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return ""
        model = annotation
    close = difflib.get_close_matches(str(loc[-1]), _known_keys(model), n=1, cutoff=0.5)
    return f"did you mean `{'.'.join(map(str, loc[:-1] + (close[0],)))}`?" if close else (
        f"known keys: {', '.join(_known_keys(model))}"
    )


def parse_config(data: Any, *, source: str = "config") -> RunConfig:
    """Validate a mapping; raises ``ConfigError`` naming the first bad key and the fix."""
    if not isinstance(data, dict):
        raise ConfigError(source, "the file must hold a mapping of settings", "see examples/tiny-cpu.yaml")
    data = _apply_environment(dict(data))
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        loc = tuple(err["loc"])
        key = ".".join(str(p) for p in loc) or source
        if err["type"] == "extra_forbidden":
            raise ConfigError(key, "unknown key", _suggest(loc)) from None
        if err["type"] == "missing":
            raise ConfigError(key, "is required", "add it to the config file") from None
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "value_error" and message.count("|") == 2:
            own_key, problem, fix = message.split("|")
            raise ConfigError(own_key, problem, fix) from None
        raise ConfigError(key, message, "see examples/tiny-cpu.yaml for a valid file") from None


def _apply_environment(data: dict[str, Any]) -> dict[str, Any]:
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        broker = dict(data.get("broker") or {})
        broker["bootstrap_servers"] = os.environ["KAFKA_BOOTSTRAP_SERVERS"]
        data["broker"] = broker
    if os.environ.get("SPECSTREAM_STORAGE"):
        storage = dict(data.get("storage") or {})
        storage["root"] = os.environ["SPECSTREAM_STORAGE"]
        data["storage"] = storage
    return data


def load_config(path: str | Path) -> RunConfig:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read the config file ({exc.strerror})", "check the path") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), f"is not valid YAML: {exc}", "fix the syntax at the line shown") from None
    return parse_config(data, source=str(path))
