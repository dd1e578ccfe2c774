"""Typed messages of the control plane, their strict JSON codec and their JSON Schemas.

Every record on Kafka is one of these messages, encoded as a JSON object that carries
``schema`` (``"specstream.<name>/<major>"``) and ``run_id``. Decoding is strict: an unknown
schema, an unknown major version, a missing field, an unknown field or a wrong type raises
``DecodeError`` with a reason that is fit for the dead-letter queue. Tensors never travel here:
a ``SampleRef`` points at a safetensors file on shared storage (the claim check).

``python -m pipeline.core.messages --write schemas/`` regenerates the committed JSON Schemas.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.core.errors import DecodeError

__all__ = (
    "Message",
    "Prompt",
    "SampleRef",
    "TensorSpec",
    "TargetInfo",
    "EndOfStream",
    "LedgerStep",
    "RankProgress",
    "PartitionOffset",
    "StepMetrics",
    "RunManifest",
    "PartitionClaim",
    "DeadLetter",
    "Heartbeat",
    "MESSAGE_TYPES",
    "encode",
    "decode",
    "json_schemas",
    "write_schemas",
    "prompt_id_for",
    "sample_id_for",
)

# Identifiers end up in topic names and file names: keep them to a portable alphabet.
Identifier = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,199}$")]
NonNegative = Annotated[int, Field(ge=0)]
Positive = Annotated[int, Field(gt=0)]
Checksum = Annotated[str, Field(pattern=r"^crc32c:[0-9a-f]{8}$")]
SettingValue = str | bool | int | float | list[int] | list[float] | None


class _Strict(BaseModel):
    """Frozen, closed, strictly typed; NaN and infinities are not JSON, so they are refused."""

    model_config = ConfigDict(
        frozen=True, extra="forbid", strict=True, populate_by_name=True, allow_inf_nan=False
    )


class Message(_Strict):
    """Base of every record: the schema tag and the run it belongs to."""

    NAME: ClassVar[str] = ""
    VERSION: ClassVar[int] = 1

    run_id: Identifier

    @classmethod
    def schema_tag(cls) -> str:
        return f"specstream.{cls.NAME}/{cls.VERSION}"


class TensorSpec(_Strict):
    """One tensor of a feature file, with safetensors dtype names (``F32``, ``BF16``, ``I64``...)."""

    dtype: Annotated[str, Field(pattern=r"^[A-Z][A-Z0-9_]{0,15}$")]
    shape: list[NonNegative]


class TargetInfo(_Strict):
    """Which target produced the features: a trainer refuses to mix targets."""

    model_id: Annotated[str, Field(min_length=1, max_length=512)]
    revision: Annotated[str, Field(min_length=1, max_length=128)]
    num_layers: Positive
    aux_layer_ids: Annotated[list[NonNegative], Field(min_length=3, max_length=3)]
    hidden_size: Positive
    vocab_size: Positive
    dtype: Annotated[str, Field(min_length=1, max_length=32)]


class Prompt(Message):
    """One tokenized conversation, ready for the target's forward pass."""

    NAME: ClassVar[str] = "prompt"
    schema_: Literal["specstream.prompt/1"] = Field(default="specstream.prompt/1", alias="schema")
    prompt_id: Identifier
    input_ids: Annotated[list[NonNegative], Field(min_length=1)]
    loss_mask: Annotated[list[Annotated[int, Field(ge=0, le=1)]], Field(min_length=1)]
    source: dict[str, str] = Field(default_factory=dict)
    seq: NonNegative | None = None  # position in the source's own output of this partition
    # The training epoch a regenerated prompt is captured for (``storage.max_bytes``: a sample
    # the budget did not keep is captured again for each later epoch); 0: the online pass.
    epoch: NonNegative = 0

    @model_validator(mode="after")
    def _same_length(self) -> Prompt:
        if len(self.input_ids) != len(self.loss_mask):
            raise ValueError(
                f"input_ids has {len(self.input_ids)} tokens but loss_mask has {len(self.loss_mask)}"
            )
        return self


class SampleRef(Message):
    """The claim check: where one sample's hidden states live and how to verify them."""

    NAME: ClassVar[str] = "sample_ref"
    schema_: Literal["specstream.sample_ref/1"] = Field(
        default="specstream.sample_ref/1", alias="schema"
    )
    sample_id: Identifier
    prompt_id: Identifier
    epoch: NonNegative = 0
    producer_id: Identifier
    uri: Annotated[str, Field(min_length=1, max_length=1024)]
    nbytes: Positive
    checksum: Checksum
    num_tokens: Positive
    tensors: dict[Annotated[str, Field(min_length=1, max_length=128)], TensorSpec]
    target: TargetInfo
    created_at: Annotated[float, Field(ge=0)]
    seq: NonNegative | None = None  # position in the generators' own output of this partition


class EndOfStream(Message):
    """Closes one partition of one stage; ``count`` is the records of that partition before it."""

    NAME: ClassVar[str] = "end_of_stream"
    schema_: Literal["specstream.end_of_stream/1"] = Field(
        default="specstream.end_of_stream/1", alias="schema"
    )
    stage: Literal["source", "generate"]
    partition: NonNegative
    count: NonNegative
    dropped: NonNegative = 0  # upstream records of this partition sent to the DLQ instead
    status: Literal["complete", "failed"] = "complete"
    reason: str = ""
    producer_id: Identifier = "stage"
    seq: NonNegative | None = None  # == count: the marker closes the stage's own sequence

    @model_validator(mode="after")
    def _failed_has_reason(self) -> EndOfStream:
        if self.status == "failed" and not self.reason:
            raise ValueError("a failed end_of_stream must say why (reason)")
        return self


class PartitionOffset(_Strict):
    """Where a reader stands in one partition: next offset, and records consumed before it."""

    partition: NonNegative
    offset: NonNegative
    records: NonNegative = 0


class RankProgress(_Strict):
    """What one trainer rank folded into an optimizer step, and where it reads next."""

    rank: NonNegative
    sample_ids: list[Identifier]
    next_offsets: list[PartitionOffset]
    # The training epoch of each sample id, for runs of more than one epoch (a step may span
    # an epoch boundary); None: every sample is of the step's ``epoch``.
    epochs: list[NonNegative] | None = None

    @model_validator(mode="after")
    def _one_epoch_per_sample(self) -> RankProgress:
        if self.epochs is not None and len(self.epochs) != len(self.sample_ids):
            raise ValueError(f"{len(self.epochs)} epochs for {len(self.sample_ids)} sample ids")
        return self

    def sample_epochs(self, default: int) -> list[int]:
        """The epoch of each of ``sample_ids``."""
        return list(self.epochs) if self.epochs is not None else [default] * len(self.sample_ids)


class StepMetrics(_Strict):
    """Loss and accuracy per training-time-test step (index k = draft step k)."""

    loss: float
    ploss: list[float]
    acc: list[float]


class LedgerStep(Message):
    """One record per optimizer step: the audit trail that replay rebuilds batches from."""

    NAME: ClassVar[str] = "ledger_step"
    schema_: Literal["specstream.ledger_step/1"] = Field(
        default="specstream.ledger_step/1", alias="schema"
    )
    step: Positive
    epoch: NonNegative
    ranks: Annotated[list[RankProgress], Field(min_length=1)]
    metrics: StepMetrics
    lr: Annotated[float, Field(ge=0)]
    created_at: Annotated[float, Field(ge=0)]


class RunManifest(Message):
    """What a run is: fresh runs refuse another run's topics; resumes refuse a changed run."""

    NAME: ClassVar[str] = "run_manifest"
    schema_: Literal["specstream.run_manifest/1"] = Field(
        default="specstream.run_manifest/1", alias="schema"
    )
    config_hash: Annotated[str, Field(min_length=1, max_length=128)]
    # The settings the hash covers, by dotted key, so that a mismatch can name what differs.
    config: Annotated[dict[str, SettingValue], Field(max_length=256)] | None = None
    partitions: Positive
    world_size: Positive
    storage_root: Annotated[str, Field(min_length=1, max_length=1024)]
    target: TargetInfo | None = None
    vocab_mapping_uri: str | None = None
    created_at: Annotated[float, Field(ge=0)]


class PartitionClaim(Message):
    """A fixed-partition generator's claim on its prompt partitions, in the run's manifest topic.

    One key per instance (``claim/<instance_id>``): compaction keeps each instance's newest record,
    which carries everything the claim rules need (``pipeline.generate.claims``): where and when
    the claim was first made, the newest heartbeat, and whether it ended.
    """

    NAME: ClassVar[str] = "partition_claim"
    schema_: Literal["specstream.partition_claim/1"] = Field(
        default="specstream.partition_claim/1", alias="schema"
    )
    worker_id: Identifier
    instance_id: Identifier
    partitions: Annotated[list[NonNegative], Field(min_length=1)]
    host: Annotated[str, Field(max_length=255)]
    pid: NonNegative
    claimed_at: Annotated[float, Field(ge=0)]
    claimed_offset: NonNegative | None = None  # the offset of the first record; None in that record
    heartbeat_at: Annotated[float, Field(ge=0)]
    lease_s: Annotated[float, Field(gt=0)]
    state: Literal["held", "released", "refused"] = "held"


class DeadLetter(Message):
    """A record that could not be used, with the reason; the stream goes on without it."""

    NAME: ClassVar[str] = "dead_letter"
    schema_: Literal["specstream.dead_letter/1"] = Field(
        default="specstream.dead_letter/1", alias="schema"
    )
    source_topic: Annotated[str, Field(min_length=1, max_length=255)]
    partition: NonNegative
    offset: NonNegative
    error: Annotated[str, Field(min_length=1, max_length=128)]
    reason: Annotated[str, Field(min_length=1)]
    payload: str
    payload_truncated: bool = False
    sample_id: str | None = None
    created_at: Annotated[float, Field(ge=0)]


class Heartbeat(Message):
    """One process's liveness and counters, every ``monitor.heartbeat_interval_s``, keyed by
    ``<role>/<id>`` in the run's compacted heartbeats topic (``pipeline.core.heartbeat``)."""

    NAME: ClassVar[str] = "heartbeat"
    schema_: Literal["specstream.heartbeat/1"] = Field(default="specstream.heartbeat/1", alias="schema")
    role: Literal["source", "generator", "trainer"]
    id: Identifier
    host: Annotated[str, Field(max_length=255)]
    pid: NonNegative
    state: Literal["starting", "running", "paused", "waiting", "finished", "stopped", "failed"]
    reason: Annotated[str, Field(max_length=1000)] = ""  # why failed, paused, waiting or stopped
    counters: Annotated[dict[Annotated[str, Field(max_length=64)], int | float], Field(max_length=32)] = Field(
        default_factory=dict
    )
    interval_s: Annotated[float, Field(gt=0)]
    started_at: Annotated[float, Field(ge=0)]
    created_at: Annotated[float, Field(ge=0)]


MESSAGE_TYPES: tuple[type[Message], ...] = (
    Prompt,
    SampleRef,
    EndOfStream,
    LedgerStep,
    RunManifest,
    PartitionClaim,
    DeadLetter,
    Heartbeat,
)
_BY_NAME: dict[str, type[Message]] = {cls.NAME: cls for cls in MESSAGE_TYPES}
AnyMessage = Union[Prompt, SampleRef, EndOfStream, LedgerStep, RunManifest, PartitionClaim, DeadLetter, Heartbeat]


def encode(message: Message) -> bytes:
    """Compact JSON with the ``schema`` tag; the inverse of :func:`decode`."""
    return message.model_dump_json(by_alias=True).encode()


def decode(data: bytes | bytearray | memoryview | str) -> AnyMessage:
    """Decode one record strictly; any defect raises ``DecodeError`` and nothing else."""
    try:
        if isinstance(data, (bytes, bytearray, memoryview)):
            data = bytes(data).decode("utf-8")
        obj = json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise DecodeError(f"not a UTF-8 JSON document: {exc}") from None
    if not isinstance(obj, dict):
        raise DecodeError(f"expected a JSON object, got {type(obj).__name__}")
    tag = obj.get("schema")
    if not isinstance(tag, str):
        raise DecodeError("missing or non-string field `schema`")
    name, sep, major = tag.partition("/")
    if not name.startswith("specstream.") or not sep:
        raise DecodeError(f"unknown schema {tag[:100]!r}")
    cls = _BY_NAME.get(name.removeprefix("specstream."))
    if cls is None:
        raise DecodeError(f"unknown schema {tag[:100]!r}")
    if major.split(".", 1)[0] != str(cls.VERSION):
        raise DecodeError(
            f"unsupported major version {major[:20]!r} of {name} (this build reads {cls.VERSION})"
        )
    try:
        return cls.model_validate(obj)  # type: ignore[return-value]
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}"
            for err in exc.errors(include_url=False)[:5]
        )
        raise DecodeError(f"invalid {cls.NAME}: {problems}") from None
    except (RecursionError, OverflowError) as exc:  # pathological nesting or numbers
        raise DecodeError(f"invalid {cls.NAME}: {exc}") from None


def prompt_id_for(index: int, input_ids: list[int]) -> str:
    """Stable id: the position in the source plus a short hash of the tokens."""
    digest = hashlib.blake2b(json.dumps(input_ids).encode(), digest_size=6).hexdigest()
    return f"p{index:09d}-{digest}"


def sample_id_for(run_id: str, epoch: int, prompt_id: str) -> str:
    """Deterministic from run, epoch and prompt: the dedup key everywhere and the file name."""
    return f"{run_id}.e{epoch:03d}.{prompt_id}"


def now() -> float:
    """The wall-clock time messages carry as ``created_at`` (one place to stub in tests)."""
    return time.time()


def json_schemas() -> dict[str, dict[str, Any]]:
    """File name -> JSON Schema, generated from the message classes."""
    out: dict[str, dict[str, Any]] = {}
    for cls in MESSAGE_TYPES:
        schema = cls.model_json_schema(by_alias=True, mode="serialization")
        schema["$id"] = f"https://specstream.dev/schemas/{cls.NAME}.v{cls.VERSION}.json"
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        out[f"{cls.NAME}.v{cls.VERSION}.json"] = schema
    return out


def render_schema(schema: dict[str, Any]) -> str:
    """A schema as stable JSON text, so the committed files only change when a message does."""
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def write_schemas(directory: Path) -> list[Path]:
    """Write every message's JSON Schema under ``directory`` (the committed ``schemas/``)."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, schema in json_schemas().items():
        path = directory / name
        path.write_text(render_schema(schema))
        written.append(path)
    return written


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.core.messages", description=__doc__)
    parser.add_argument("--write", type=Path, metavar="DIR", help="write the JSON Schemas to DIR")
    args = parser.parse_args(argv)
    if args.write is None:
        print(json.dumps(sorted(json_schemas())))
        return 0
    for path in write_schemas(args.write):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
