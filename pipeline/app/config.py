"""One YAML file configures a run: ``RunConfig``, the single source of every knob and its default.

The file is validated completely before anything starts: an unknown key, a wrong type or an
impossible combination raises a ``ConfigError`` naming the key and the fix (a misspelt key gets a
"did you mean"). Each stage derives its own settings from it in one function
(``pipeline.app.settings``), and ``specstream config reference`` prints the table of every key
(the README's is generated from it). Reading a file, ``${VAR}`` and the environment overrides are
in :mod:`pipeline.app.config_file`.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.app.config_budget import BUDGET_HELP, check_budget
from pipeline.app.config_deadletters import DeadLetterSection
from pipeline.app.config_groups import GROUPS_HELP, check_train_groups
from pipeline.app.config_monitor import MonitorSection
from pipeline.app.config_topics import TopicsSection

from pipeline.core.errors import ConfigError
from pipeline.core.feature_encoding import FEATURE_DTYPE_HELP, FeatureDtype
from pipeline.core.messages import SettingValue
from pipeline.generate.backpressure import TrainerWindow, Watermarks, check_watermarks
from pipeline.generate.intake import check_batch_share
from pipeline.source.conversations import DEFAULT_MAX_LINE_BYTES
from pipeline.transport.kafka import kafka_client_options
from pipeline.transport.outage import DEFAULT_OUTAGE_BUDGET_S

__all__ = ("RunConfig", "BrokerSection", "StorageSection", "DataSection", "TargetSection", "GenerateSection",
           "TrainSection", "FINGERPRINT_KEYS", "fingerprint_differences")  # fmt: skip

# What changes the trained result. Every stage of a run must agree on these (the run manifest
# stores them); anything else (devices, capture batch size, worker counts, timeouts, paths,
# retention, checkpoint cadence) may differ between nodes and between attempts.
FINGERPRINT_KEYS = (
    "data.path",
    "data.max_length",
    "data.partitions",
    "data.on_malformed",
    "data.limit",
    "target.backend",
    "target.model",
    "target.dtype",
    "target.aux_layer_ids",
    "storage.dtype",
    "storage.max_bytes",
    "train.world_size",
    "train.batch_size",
    "train.grad_accum",
    "train.lr",
    "train.lr_schedule",
    "train.warmup_ratio",
    "train.betas",
    "train.weight_decay",
    "train.grad_clip",
    "train.bf16",
    "train.ttt_steps",
    "train.loss_decay",
    "train.draft_vocab_size",
    "train.max_length",
    "train.seed",
    "train.epochs",
    "train_groups",
)

# Keys fingerprinted after runs existed are left out at their default: older manifests still match.
_ADDED_LATER: dict[str, Any] = {"storage.dtype": "as_captured", "storage.max_bytes": None, "train.epochs": 1,
                                "train_groups": {}}

_DEVICE = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_device(key: str, value: str | None, null_means: str) -> str | None:
    if value is None or _DEVICE.match(value):
        return value
    close = difflib.get_close_matches(value.lower(), ["cpu", "cuda", "mps"], n=1, cutoff=0.5)
    guess = {"gpu": "cuda"}.get(value.lower(), close[0] if close else None)
    hint = f"did you mean `{guess}`? " if guess else ""
    raise ConfigError(key, f"{value!r} is not a device", f"{hint}use cpu, cuda, cuda:N or mps; {null_means}")


class BrokerSection(_Section):
    """Where the broker is and how every Kafka client of the run talks to it."""

    bootstrap_servers: str | None = Field(
        default=None,
        description="`host:port[,host:port]`; null: the local broker (started if needed); "
        "`memory`: in-process, one process, no Kafka",
    )
    client_options: dict[str, Any] = Field(
        default_factory=dict,
        description="options for every Kafka client (SASL, SSL...): Kafka's own names (`security.protocol`, "
        "`sasl.mechanism`, `sasl.username`, `ssl.cafile`...) or kafka-python's; `${VAR}` for secrets",
    )
    transaction_timeout_ms: int = Field(
        default=60_000, ge=1_000, description="how soon the broker aborts a dead producer's open transaction"
    )
    session_timeout_ms: int = Field(
        default=45_000, ge=6_000, description="how soon a dead generator's prompt partitions move to the others"
    )
    outage_budget_s: float = Field(
        default=DEFAULT_OUTAGE_BUDGET_S,
        ge=1,
        description="how long every stage waits out an unreachable broker (retrying with backoff) before it "
        "exits with one error line, and a call that keeps failing while the broker answers others; the same "
        "command then resumes exactly",
    )

    @field_validator("client_options")
    @classmethod
    def _kafka_names(cls, value: dict[str, Any]) -> dict[str, Any]:
        return kafka_client_options(value, key="broker.client_options")


class StorageSection(_Section):
    """Where the feature files live and how long they are kept."""

    root: str = Field(default="./runs", description="feature storage root: a path or any fsspec URL (`s3://`...)")
    options: dict[str, Any] = Field(default_factory=dict, description="fsspec storage options (credentials, endpoint)")
    retention: Literal["delete", "retain"] = Field(
        default="retain",
        description="`retain`: keep features (replay, more epochs); `delete`: delete them once no "
        "retained checkpoint needs them",
    )
    dtype: FeatureDtype = Field(default="as_captured", description=FEATURE_DTYPE_HELP)
    max_bytes: int | None = Field(default=None, ge=0, description=BUDGET_HELP)


class DataSection(_Section):
    """The conversations to train on and how they are cut into prompts."""

    path: str = Field(description="conversations JSONL (ShareGPT or OpenAI messages): a path or fsspec URL")
    max_length: int = Field(default=2048, gt=8, description="tokens per conversation; longer ones are truncated")
    partitions: int = Field(
        default=4, gt=0, description="prompt and sample partitions: a multiple of `train.world_size`"
    )
    on_malformed: Literal["dlq", "fail"] = Field(
        default="dlq", description="a bad line: `dlq` reports it and goes on, `fail` stops the run"
    )
    limit: int | None = Field(default=None, gt=0, description="use only the first N conversations")
    eval_path: str | None = Field(default=None, description="held-out conversations JSONL, captured once, never trained")
    max_line_bytes: int = Field(
        default=DEFAULT_MAX_LINE_BYTES, gt=0,
        description="a longer JSONL line is dead-lettered unread (memory stays bounded by config)",
    )  # fmt: skip


class TargetSection(_Section):
    """The target model whose hidden states are captured, and how."""

    backend: Literal["hf", "sglang", "synthetic"] = Field(
        default="hf", description="`hf` (transformers), `sglang` (GPU, extra), `synthetic` (data plane only)"
    )
    model: str | None = Field(
        default=None, description="local model directory (hf, sglang): nothing is downloaded at run time"
    )
    device: str = Field(default="cpu", description="where the generators run the target: cpu, cuda, cuda:N")
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        default=None, description="capture dtype; null: the model's own"
    )
    aux_layer_ids: list[int] | None = Field(
        default=None, min_length=3, max_length=3, description="three captured layers; null: EAGLE3's [1, N/2-1, N-4]"
    )
    batch_size: int = Field(default=8, gt=0, description="prompts per capture forward (per generator)")

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        return _check_device("target.device", value, "default cpu") or "cpu"

    @model_validator(mode="after")
    def _model_for_real_backends(self) -> TargetSection:
        if self.backend in ("hf", "sglang") and not self.model:
            raise ConfigError(
                "target.model", f"is required for backend {self.backend}", "set it to a local model directory"
            )
        return self


class GenerateSection(_Section):
    """Generator workers and the backpressure that keeps them within the trainer's reach."""

    workers: int = Field(default=1, gt=0, description="generator threads in a single-process run (`run`, `quickstart`)")
    high_watermark: int = Field(
        default=256, gt=0, description="pause generation above this many produced-but-untrained samples"
    )
    low_watermark: int = Field(default=192, ge=0, description="resume generation at or below this many")
    high_watermark_bytes: int | None = Field(default=None, gt=0, description="the same in bytes of features")
    low_watermark_bytes: int | None = Field(default=None, ge=0, description="resume at or below this many bytes")
    queue_depth: int = Field(
        default=2, gt=0, description="captured batches a generator holds ahead of the one it writes and commits"
    )
    drain_timeout_s: float = Field(
        default=30.0, gt=0, description="on stop, how long a generator may finish its queued batches"
    )
    wait_for_source_s: float = Field(
        default=600.0,
        gt=0,
        description="at start, how long a generator waits for the run's topics (the source creates them)",
    )

    @model_validator(mode="after")
    def _ordered(self) -> GenerateSection:
        if self.low_watermark > self.high_watermark:
            raise ConfigError(
                "generate.low_watermark",
                f"{self.low_watermark} exceeds high_watermark {self.high_watermark}",
                "set it below generate.high_watermark",
            )
        return self


class TrainSection(_Section):
    """The draft trainer: batch shape, optimizer, schedule, checkpoints and timeouts."""

    world_size: int = Field(
        default=1, gt=0, description="trainer ranks: must equal torchrun's ranks (`--nproc-per-node` x nodes)"
    )
    device: str | None = Field(default=None, description="cpu, cuda; null: cuda when available")
    batch_size: int = Field(default=1, gt=0, description="samples per micro-batch per rank")
    grad_accum: int = Field(
        default=1, gt=0, description="micro-batches per optimizer step: global batch = world_size x batch_size x this"
    )
    lr: float = Field(default=1e-4, gt=0, description="AdamW peak learning rate")
    lr_schedule: Literal["cosine", "constant"] = Field(
        default="cosine",
        description="after the warmup; cosine needs a length: `max_steps`, or `epochs` passes once the source has finished",
    )
    warmup_ratio: float = Field(default=0.015, ge=0, lt=1, description="linear warmup, as a share of the schedule")
    betas: tuple[float, float] = Field(default=(0.9, 0.95), description="AdamW betas")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay")
    grad_clip: float = Field(default=0.5, gt=0, description="clip the gradient norm to this")
    bf16: bool = Field(default=False, description="bf16 autocast for the draft on CUDA (mixed precision)")
    max_steps: int | None = Field(default=None, gt=0, description="stop after this many steps; null: the end of the stream")
    epochs: int = Field(
        default=1, gt=0,
        description="passes over the data: the online pass, then epochs - 1 more over the retained features "
        "(no target forward), each in a fresh order seeded by (seed, epoch); features are deleted (retention: "
        "delete) only after the last",
    )  # fmt: skip
    ttt_steps: int = Field(default=7, gt=0, description="training-time-test depth (draft steps unrolled)")
    loss_decay: float = Field(default=0.8, gt=0, le=1, description="weight of TTT step k is loss_decay^k")
    draft_vocab_size: int = Field(default=32000, gt=0, description="the draft's vocabulary (most frequent tokens)")
    max_length: int | None = Field(default=None, gt=0, description="sequence cap in training; null: `data.max_length`")
    save_interval: int = Field(default=100, ge=0, description="checkpoint every N steps (0: only at the end and on stop)")
    keep_last: int = Field(default=2, gt=0, description="checkpoints kept (older ones are deleted)")
    resume: str = Field(
        default="auto",
        description="`auto` (newest checkpoint if any), `never`, `required`, or one checkpoint's directory",
    )
    prefetch: int = Field(default=4, gt=0, description="micro-batches read and collated ahead, per rank")
    idle_timeout_s: float = Field(
        default=600.0, gt=0, description="a partition silent this long (no sample, no end of stream) is an error"
    )
    collective_timeout_s: float = Field(
        default=600.0, gt=0, description="how long a collective waits for the slowest rank before failing"
    )
    drain_timeout_s: float | None = Field(
        default=None, gt=0, description="bound on reading the stream's tail after the last step; null: none"
    )
    wait_for_source_s: float = Field(
        default=3600.0,
        gt=0,
        description="at start, how long a trainer waits for the run's topics and vocabulary mapping (the source "
        "stores it once it has read every conversation)",
    )
    output_dir: str = Field(
        default="./runs/out",
        description="checkpoints, metrics.jsonl, curves.png, export/: a path every rank shares, or an fsspec URL "
        "(`s3://`...; reached with `storage.options` when it has storage.root's protocol): checkpoints are then "
        "published by a manifest written last, and rank 0 copies its metrics there at each checkpoint",
    )
    seed: int = Field(default=0, description="seeds the draft's initialisation and every RNG")
    report_to: list[Literal["tensorboard", "wandb"]] = Field(
        default=["tensorboard"], description="scalar trackers on rank 0 (under output_dir); `wandb` when installed"
    )
    eval_interval: int = Field(default=50, gt=0, description="evaluate on `data.eval_path` every N steps (rank 0)")
    deterministic: bool = Field(
        default=False, description="deterministic kernels: bit-identical resume and replay (slower on GPU)"
    )
    min_trained_fraction: float = Field(
        default=0.99, ge=0, le=1,
        description="a run that reached the end of its stream and trained (tail included) a smaller share of its "
        "prompts (the rest dead-lettered) fails and exports nothing; runs stopped early are not judged",
    )  # fmt: skip

    @field_validator("device")
    @classmethod
    def _device(cls, value: str | None) -> str | None:
        return _check_device("train.device", value, "null: cuda when available")

    @field_validator("resume")
    @classmethod
    def _resume(cls, value: str) -> str:
        if not value.strip():
            raise ConfigError("train.resume", "is empty", "use auto, never, required or a checkpoint directory")
        return value


class RunConfig(_Section):
    """One run's whole configuration: every stage derives its settings from it."""

    run_id: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,100}$",
        description="names the run's topics, consumer groups and storage prefix",
    )
    broker: BrokerSection = Field(default_factory=BrokerSection, description="the Kafka cluster")
    storage: StorageSection = Field(default_factory=StorageSection, description="where the features go")
    data: DataSection = Field(description="the conversations")
    target: TargetSection = Field(description="the target model whose hidden states are captured")
    generate: GenerateSection = Field(default_factory=GenerateSection, description="generators and backpressure")
    train: TrainSection = Field(default_factory=TrainSection, description="the draft's training")
    train_groups: dict[str, dict[str, Any]] = Field(default_factory=dict, description=GROUPS_HELP)
    dead_letters: DeadLetterSection = Field(
        default_factory=DeadLetterSection, description="when bad input stops a stage instead of being dead-lettered"
    )
    monitor: MonitorSection = Field(default_factory=MonitorSection, description="heartbeats and Prometheus metrics")
    topics: TopicsSection = Field(default_factory=TopicsSection, description="replicas and retention of the run's topics")

    @model_validator(mode="after")
    def _window_fits(self) -> RunConfig:
        window = self.global_batch
        needed = window + self.train.world_size * self.train.prefetch * self.train.batch_size
        if self.generate.high_watermark < needed:
            raise ConfigError(
                "generate.high_watermark",
                f"{self.generate.high_watermark} is below what the trainer must hold before it reports "
                f"progress ({window} samples per global step + {needed - window} prefetched = {needed}), "
                "so generation and training would wait on each other forever",
                f"raise it to at least {needed}, or shrink train.batch_size / grad_accum / prefetch",
            )
        return self

    @model_validator(mode="after")
    def _backpressure_cannot_deadlock(self) -> RunConfig:
        """The generators' own watermark checks, at start, under this file's key names."""
        t, g = self.train, self.generate
        if self.data.partitions % t.world_size:
            raise ConfigError(
                "data.partitions",
                f"{self.data.partitions} partitions do not divide over train.world_size {t.world_size} ranks: "
                "a rank with more partitions would still be draining them after the others end, while "
                "backpressure waits for training progress",
                f"use a multiple of {t.world_size} partitions",
            )
        try:
            marks = Watermarks(high=g.high_watermark, low=g.low_watermark, high_bytes=g.high_watermark_bytes,
                               low_bytes=g.low_watermark_bytes)  # fmt: skip
            window = TrainerWindow(world_size=t.world_size, batch_size=t.batch_size, grad_accum=t.grad_accum,
                                   prefetch=t.prefetch * t.batch_size)  # fmt: skip
            check_watermarks(marks, window, self.data.partitions)
            check_batch_share(marks, window, self.data.partitions, self.target.batch_size,
                              self.data.partitions // g.workers, batch_key="target.batch_size")  # fmt: skip
        except ConfigError as exc:
            key = {"partitions": "data.partitions"}.get(exc.key, exc.key.replace("backpressure.", "generate."))
            fix = exc.fix.replace("backpressure.", "generate.") or "see examples/tiny-cpu.yaml"
            raise ConfigError(key, exc.problem.replace("backpressure.", "generate."), fix) from None
        return self

    @model_validator(mode="after")
    def _groups_and_budget(self) -> RunConfig:
        return check_budget(check_train_groups(self))

    @property
    def global_batch(self) -> int:
        return self.train.world_size * self.train.batch_size * self.train.grad_accum

    def value(self, key: str) -> Any:
        """The value at a dotted key (``train.lr``)."""
        node: Any = self
        for part in key.split("."):
            node = getattr(node, part)
        return node

    def fingerprint_values(self) -> dict[str, SettingValue]:
        """The settings that change the trained result, by dotted key (JSON values)."""
        values = {key: json.loads(json.dumps(self.value(key))) for key in FINGERPRINT_KEYS}
        values = {k: v for k, v in values.items() if k not in _ADDED_LATER or v != _ADDED_LATER[k]}
        return {k: json.dumps(v, sort_keys=True) if isinstance(v, dict) else v for k, v in values.items()}  # a mapping: one string

    def fingerprint(self) -> str:
        """A short hash of :meth:`fingerprint_values`: what a run's stages must agree on."""
        canonical = json.dumps(self.fingerprint_values(), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def fingerprint_differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: <recorded> in the run, <current> here`` for every fingerprinted key that differs."""
    keys = sorted(set(recorded) | set(current))
    return [
        f"{key}: {json.dumps(was)} in the run, {json.dumps(now)} here"
        for key in keys
        if (was := recorded.get(key, _ADDED_LATER.get(key))) != (now := current.get(key, _ADDED_LATER.get(key)))
    ]

