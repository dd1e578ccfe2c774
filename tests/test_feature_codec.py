"""Compact feature storage (``storage.dtype``): round trips with stated error bounds, and refs of
every dtype verified as strictly as captured ones (the checksum covers the fp8 scales).

Error bounds, relative per row (``||x - decode(encode(x))|| / ||x||`` for each token of each
hidden tensor): bf16 keeps 8 significant bits, so at most 2^-8 (0.39 %); fp8 e4m3 keeps 4, so at
most 2^-4 (6.25 %) with a per-row scale (every row's largest value maps to 448 and the row stays
in fp8's normal range; the values the scale pushes into subnormals are below 1/28672 of the row's
largest and add far less than the bound).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import safetensors.torch
import torch

from pipeline.core.errors import CaptureContractError, IntegrityError
from pipeline.core.feature_encoding import scale_name
from pipeline.core.features import AUX_HIDDEN, FINAL_HIDDEN, check_ref
from pipeline.core.messages import SampleRef, TargetInfo, TensorSpec
from pipeline.feature_codec import check_scales, decode_features, encode_features
from pipeline.storage import FeatureStore

HIDDEN = 64
BOUNDS = {"bf16": 2.0**-8, "fp8_e4m3": 2.0**-4}
STORED = {"as_captured": "F32", "bf16": "BF16", "fp8_e4m3": "F8_E4M3"}
TARGET = TargetInfo(model_id="tiny", revision="r", num_layers=4, aux_layer_ids=[0, 1, 2], hidden_size=HIDDEN,
                    vocab_size=512, dtype="float32")  # fmt: skip


def hidden_like_an_llm(length: int = 48, seed: int = 0) -> dict[str, torch.Tensor]:
    """Heavy-tailed hidden states with the two features real targets have: a few outlier channels,
    and a first token whose activations are ~1000x the others' (the attention sink)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, width in ((AUX_HIDDEN, 3 * HIDDEN), (FINAL_HIDDEN, HIDDEN)):
        x = torch.distributions.StudentT(3.0).sample((length, width)) * 0.5
        x[:, 7] *= 40.0
        x[0] *= 1000.0
        out[name] = x.float()
    ids = torch.randint(0, 512, (length,), generator=g)
    return {"input_ids": ids, "loss_mask": torch.ones(length, dtype=torch.uint8), **out}


def row_errors(original: torch.Tensor, decoded: torch.Tensor) -> torch.Tensor:
    return (original - decoded).norm(dim=1) / original.norm(dim=1)


def stored_ref(
    store: FeatureStore, tensors: dict[str, torch.Tensor], dtype: str, sample_id: str = "s1"
) -> SampleRef:
    stored = store.put(0, sample_id, encode_features(tensors, dtype))  # type: ignore[arg-type]
    return SampleRef(run_id=store.run_id, sample_id=sample_id, prompt_id="p", producer_id="g", uri=stored.uri,
                     nbytes=stored.nbytes, checksum=stored.checksum, num_tokens=len(tensors["input_ids"]),
                     tensors=stored.tensors, target=TARGET, created_at=0.0, seq=0)  # fmt: skip


@pytest.fixture
def store(tmp_path: Path) -> FeatureStore:
    return FeatureStore(str(tmp_path), "run1")


@pytest.mark.parametrize("dtype", ["bf16", "fp8_e4m3"])
def test_round_trip_stays_within_the_stated_bound_per_row(store: FeatureStore, dtype: str) -> None:
    tensors = hidden_like_an_llm()
    ref = stored_ref(store, tensors, dtype)
    check_ref(ref)
    assert ref.tensors[AUX_HIDDEN].dtype == ref.tensors[FINAL_HIDDEN].dtype == STORED[dtype]
    got = decode_features(ref, store.get(ref))
    assert sorted(got) == sorted(tensors), "the scales are dropped: the trainer sees the captured tensors"
    for name in (AUX_HIDDEN, FINAL_HIDDEN):
        assert got[name].dtype == torch.float32, "decoded back to the capture's dtype"
        errors = row_errors(tensors[name], got[name])
        assert float(errors.max()) <= BOUNDS[dtype], f"{name}: worst row {float(errors.max()):.4f}"
        assert float(errors[1:].max()) <= BOUNDS[dtype], (
            "quiet rows keep the bound next to the loud first token"
        )
    assert torch.equal(got["input_ids"], tensors["input_ids"]) and torch.equal(
        got["loss_mask"], tensors["loss_mask"]
    )


def test_the_bytes_per_sample_shrink_as_stated(store: FeatureStore) -> None:
    tensors = hidden_like_an_llm(length=100)
    sizes = {dtype: stored_ref(store, tensors, dtype, f"s-{dtype}").nbytes for dtype in STORED}
    hidden_bytes = 100 * 4 * HIDDEN * 4  # float32
    scales = 2 * 100 * 4
    # the headers differ by a few dozen bytes (dtype names, the scale entries, the sample id)
    assert abs((sizes["as_captured"] - sizes["bf16"]) - hidden_bytes // 2) < 64
    assert abs((sizes["as_captured"] - sizes["fp8_e4m3"]) - (hidden_bytes * 3 // 4 - scales)) < 256


def test_a_capture_stored_as_captured_decodes_without_a_copy(store: FeatureStore) -> None:
    tensors = hidden_like_an_llm()
    ref = stored_ref(store, tensors, "as_captured")
    check_ref(ref)
    read = store.get(ref)
    got = decode_features(ref, read)
    assert got[AUX_HIDDEN].data_ptr() == read[AUX_HIDDEN].data_ptr()
    assert torch.equal(got[AUX_HIDDEN], tensors[AUX_HIDDEN])


def test_a_bf16_capture_stored_as_fp8_decodes_to_bf16(store: FeatureStore) -> None:
    tensors = {k: (v.bfloat16() if v.is_floating_point() else v) for k, v in hidden_like_an_llm().items()}
    stored = store.put(0, "s1", encode_features(tensors, "fp8_e4m3"))
    ref = SampleRef(run_id="run1", sample_id="s1", prompt_id="p", producer_id="g", uri=stored.uri,
                    nbytes=stored.nbytes, checksum=stored.checksum, num_tokens=48, tensors=stored.tensors,
                    target=TARGET.model_copy(update={"dtype": "bfloat16"}), created_at=0.0)  # fmt: skip
    check_ref(ref)
    got = decode_features(ref, store.get(ref))
    assert got[FINAL_HIDDEN].dtype == torch.bfloat16
    assert (
        float(row_errors(tensors[FINAL_HIDDEN].float(), got[FINAL_HIDDEN].float()).max()) <= 2.0**-4 + 2.0**-8
    )


def test_an_fp8_file_is_a_plain_safetensors_file(store: FeatureStore) -> None:
    ref = stored_ref(store, hidden_like_an_llm(), "fp8_e4m3")
    loaded = safetensors.torch.load(Path(store.resolve(ref.uri)).read_bytes())
    assert loaded[AUX_HIDDEN].dtype == torch.float8_e4m3fn and loaded[scale_name(AUX_HIDDEN)].shape == (48,)


def test_a_corrupted_scale_fails_verification(store: FeatureStore) -> None:
    tensors = hidden_like_an_llm()
    ref = stored_ref(store, tensors, "fp8_e4m3")
    path = Path(store.resolve(ref.uri))
    data = bytearray(path.read_bytes())
    header_len = struct.unpack("<Q", data[:8])[0]
    start, _ = json.loads(data[8 : 8 + header_len])[scale_name(FINAL_HIDDEN)]["data_offsets"]
    data[8 + header_len + start + 3] ^= 0x40  # flips the exponent of the first scale: 2x or 0.5x off
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="checksum"):
        store.get(ref)


def test_a_scale_no_writer_stores_is_refused_even_with_a_matching_checksum(store: FeatureStore) -> None:
    tensors = encode_features(hidden_like_an_llm(), "fp8_e4m3")
    tensors[scale_name(AUX_HIDDEN)][5] = float("nan")
    stored = store.put(0, "s1", tensors)  # a writer bug: the checksum is the file's own
    ref = SampleRef(run_id="run1", sample_id="s1", prompt_id="p", producer_id="g", uri=stored.uri,
                    nbytes=stored.nbytes, checksum=stored.checksum, num_tokens=48, tensors=stored.tensors,
                    target=TARGET, created_at=0.0)  # fmt: skip
    check_ref(ref)
    read = store.get(ref)
    with pytest.raises(IntegrityError, match="aux_hidden_states.scale holds a non-finite"):
        check_scales(ref, read)
    with pytest.raises(IntegrityError):
        decode_features(ref, read)


def test_a_ref_that_misdeclares_its_encoding_is_refused_before_any_read(store: FeatureStore) -> None:
    ref = stored_ref(store, hidden_like_an_llm(), "fp8_e4m3")
    no_scale = {k: v for k, v in ref.tensors.items() if k != scale_name(FINAL_HIDDEN)}
    with pytest.raises(
        CaptureContractError, match="needs final_hidden_states.scale F32\\[48\\], the ref has none"
    ):
        check_ref(ref.model_copy(update={"tensors": no_scale}))
    short = {**ref.tensors, scale_name(FINAL_HIDDEN): TensorSpec(dtype="F32", shape=[47])}
    with pytest.raises(CaptureContractError, match="the ref has F32\\[47\\]"):
        check_ref(ref.model_copy(update={"tensors": short}))
    bf16 = stored_ref(store, hidden_like_an_llm(), "bf16", "s2")
    stray = {**bf16.tensors, scale_name(AUX_HIDDEN): TensorSpec(dtype="F32", shape=[48])}
    with pytest.raises(CaptureContractError, match="is declared, but aux_hidden_states is stored as BF16"):
        check_ref(bf16.model_copy(update={"tensors": stray}))
    f16 = {**bf16.tensors, AUX_HIDDEN: TensorSpec(dtype="F16", shape=[48, 3 * HIDDEN])}
    with pytest.raises(CaptureContractError, match="a capture in float32 is stored as F32, BF16 or F8_E4M3"):
        check_ref(bf16.model_copy(update={"tensors": f16}))


def test_non_finite_hidden_states_cannot_be_stored_as_fp8() -> None:
    tensors = hidden_like_an_llm()
    tensors[FINAL_HIDDEN][3, 2] = float("inf")
    with pytest.raises(CaptureContractError, match="final_hidden_states holds non-finite values"):
        encode_features(tensors, "fp8_e4m3")
