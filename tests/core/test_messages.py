"""Messages: strict codec, typed errors for anything malformed, schemas in sync with the code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.core.errors import DecodeError
from pipeline.core.messages import (
    MESSAGE_TYPES,
    DeadLetter,
    EndOfStream,
    Heartbeat,
    LedgerStep,
    PartitionClaim,
    PartitionOffset,
    Prompt,
    RankProgress,
    RunManifest,
    SampleRef,
    StepMetrics,
    TargetInfo,
    TensorSpec,
    decode,
    encode,
    json_schemas,
    prompt_id_for,
    render_schema,
    sample_id_for,
)

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"
TARGET = TargetInfo(
    model_id="tiny", revision="abc", num_layers=4, aux_layer_ids=[0, 1, 2], hidden_size=64, vocab_size=512, dtype="float32"
)


def examples() -> list:
    return [
        Prompt(run_id="r1", prompt_id="p000000001-aa", input_ids=[1, 2, 3], loss_mask=[0, 1, 1], source={"line": "3"}),
        SampleRef(
            run_id="r1", sample_id="r1.e000.p1", prompt_id="p1", producer_id="gen-0",
            uri="features/0/r1.e000.p1.safetensors", nbytes=1234, checksum="crc32c:0badf00d", num_tokens=3,
            tensors={"input_ids": TensorSpec(dtype="I64", shape=[3])}, target=TARGET, created_at=1.5,
        ),
        EndOfStream(run_id="r1", stage="generate", partition=2, count=10, dropped=1),
        EndOfStream(run_id="r1", stage="source", partition=0, count=3, status="failed", reason="tokenizer crashed"),
        LedgerStep(
            run_id="r1", step=1, epoch=0,
            ranks=[RankProgress(rank=0, sample_ids=["a", "b"], next_offsets=[PartitionOffset(partition=0, offset=5, records=2)])],
            metrics=StepMetrics(loss=1.25, ploss=[1.0, 0.3], acc=[0.5, 0.25]), lr=1e-4, created_at=2.0,
        ),
        RunManifest(run_id="r1", config_hash="h", partitions=4, world_size=2, storage_root="/x", target=TARGET, created_at=0.0),
        PartitionClaim(
            run_id="r1", worker_id="gen-p0-1", instance_id="i1", partitions=[0, 1], host="h", pid=7,
            claimed_at=1.0, claimed_offset=3, heartbeat_at=2.5, lease_s=18.0, state="released",
        ),
        DeadLetter(
            run_id="r1", source_topic="r1.samples", partition=0, offset=7, error="IntegrityError",
            reason="checksum", payload="{}", created_at=3.0,
        ),
        Heartbeat(
            run_id="r1", role="generator", id="gen-0", host="h", pid=7, state="paused",
            reason="backpressure: backlog 256 >= cap 256", counters={"refs": 12, "paused_s": 3.5},
            interval_s=5.0, started_at=1.0, created_at=4.0,
        ),
    ]


@pytest.mark.parametrize("message", examples(), ids=lambda m: type(m).__name__)
def test_round_trip_is_exact(message) -> None:
    data = encode(message)
    assert json.loads(data)["schema"] == type(message).schema_tag()
    assert decode(data) == message


def test_every_message_type_has_an_example() -> None:
    assert {type(m) for m in examples()} == set(MESSAGE_TYPES)


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda d: d.pop("sample_id"), "sample_id"),
        (lambda d: d.update(nbytes="12"), "nbytes"),
        (lambda d: d.update(extra=1), "extra"),
        (lambda d: d.update(schema="specstream.sample_ref/2"), "major version"),
        (lambda d: d.update(schema="specstream.nope/1"), "unknown schema"),
        (lambda d: d.update(checksum="md5:00"), "checksum"),
        (lambda d: d.update(run_id="../etc"), "run_id"),
        (lambda d: d["target"].update(aux_layer_ids=[1, 2]), "aux_layer_ids"),
    ],
)
def test_strict_decoding_names_the_problem(mutate, reason: str) -> None:
    ref = json.loads(encode(examples()[1]))
    mutate(ref)
    with pytest.raises(DecodeError, match=reason):
        decode(json.dumps(ref).encode())


def test_prompt_lengths_must_agree() -> None:
    bad = {"schema": "specstream.prompt/1", "run_id": "r", "prompt_id": "p", "input_ids": [1, 2], "loss_mask": [1]}
    with pytest.raises(DecodeError, match="loss_mask"):
        decode(json.dumps(bad))


def test_nan_is_not_json() -> None:
    step = json.loads(encode(examples()[4]))
    text = json.dumps(step).replace('"loss": 1.25', '"loss": NaN')
    with pytest.raises(DecodeError, match="finite"):
        decode(text)


def test_ids_are_deterministic() -> None:
    assert prompt_id_for(3, [1, 2]) == prompt_id_for(3, [1, 2])
    assert prompt_id_for(3, [1, 2]) != prompt_id_for(3, [2, 1])
    assert sample_id_for("run", 1, "p7") == "run.e001.p7"


def test_committed_schemas_match_the_code() -> None:
    generated = json_schemas()
    committed = {p.name: p.read_text() for p in SCHEMAS.glob("*.json")}
    assert sorted(committed) == sorted(generated), "run: python -m pipeline.core.messages --write schemas/"
    for name, schema in generated.items():
        assert committed[name] == render_schema(schema), f"{name} is stale: python -m pipeline.core.messages --write schemas/"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_arbitrary_bytes_only_raise_decode_error(data: bytes) -> None:
    try:
        decode(data)
    except DecodeError:
        pass


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_values)
def test_arbitrary_json_only_raises_decode_error(value) -> None:
    try:
        decode(json.dumps(value).encode())
    except DecodeError:
        pass


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from([m.schema_tag() for m in MESSAGE_TYPES] + ["specstream.prompt/9", "x"]),
    st.dictionaries(st.sampled_from(["run_id", "prompt_id", "input_ids", "loss_mask", "sample_id", "count",
                                     "partition", "stage", "tensors", "target", "step", "ranks"]), json_values, max_size=8),
)
def test_near_miss_messages_only_raise_decode_error(tag: str, fields: dict) -> None:
    """Right schema tag, arbitrary field values: the interesting part of the input space."""
    try:
        decode(json.dumps({"schema": tag, **fields}).encode())
    except DecodeError:
        pass
