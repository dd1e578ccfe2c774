"""The HF backend captures exactly what a reference ``output_hidden_states=True`` forward computes.

CPU, fp32, seeded, on the tiny trained target. Aux layer i is ``hidden_states[i + 1]`` (pre-norm
residual stream), the final hidden state is ``hidden_states[-1]`` (after the final norm).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.core.errors import CaptureContractError, ConfigError
from pipeline.core.features import AUX_HIDDEN, FEATURE_NAMES, FINAL_HIDDEN, INPUT_IDS, LOSS_MASK
from pipeline.generate.backend import TargetBackend, assemble_features, weights_fingerprint
from pipeline.generate.hf import HFTarget, padded_width, plan_batches

pytestmark = pytest.mark.usefixtures("one_thread")

AUX = [0, 1, 2]
LENGTHS = (37, 64, 5, 120, 1, 17)


def _prompts(lengths: Sequence[int], seed: int = 0) -> list[tuple[list[int], list[int]]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for length in lengths:
        ids = torch.randint(0, 512, (length,), generator=g).tolist()
        mask = torch.randint(0, 2, (length,), generator=g).tolist()
        out.append((ids, mask))
    return out


@pytest.fixture(scope="module")
def target(tiny_target_dir: Path):
    with HFTarget(tiny_target_dir, aux_layer_ids=AUX) as t:
        yield t


@pytest.fixture(scope="module")
def reference(tiny_target_dir: Path):
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    model = AutoModelForCausalLM.from_pretrained(tiny_target_dir, dtype=torch.float32)
    return model.eval()


def _reference(model, sequences: Sequence[Sequence[int]], *, pad_id: int, padded: bool):
    """Per sequence: (aux (L, 3H), final (L, H)) from one forward with output_hidden_states."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    with torch.no_grad():
        out = model(
            input_ids=ids,
            attention_mask=mask if padded else None,
            output_hidden_states=True,
            use_cache=False,
        )
    result = []
    for row, seq in enumerate(sequences):
        n = len(seq)
        aux = torch.cat([out.hidden_states[i + 1][row, :n] for i in AUX], dim=-1)
        result.append((aux, out.hidden_states[-1][row, :n]))
    return result


def test_hf_target_is_a_target_backend(target: HFTarget) -> None:
    assert isinstance(target, TargetBackend)
    info = target.info
    assert (info.num_layers, info.hidden_size, info.vocab_size) == (4, 64, 512)
    assert info.aux_layer_ids == AUX and info.dtype == "float32"
    assert info.revision.startswith("sha256:") and len(info.revision) == 7 + 32


def test_padded_batch_capture_equals_reference_forward_exactly(target: HFTarget, reference) -> None:
    prompts = _prompts(LENGTHS)
    captured = target.capture(prompts)
    expected = _reference(reference, [p[0] for p in prompts], pad_id=target.pad_token_id, padded=True)
    assert len(captured) == len(prompts)
    for (ids, mask), got, (aux, final) in zip(prompts, captured, expected, strict=True):
        assert set(got) == set(FEATURE_NAMES)
        assert got[INPUT_IDS].dtype == torch.int64 and got[INPUT_IDS].tolist() == ids
        assert got[LOSS_MASK].dtype == torch.uint8 and got[LOSS_MASK].tolist() == mask
        assert got[AUX_HIDDEN].shape == (len(ids), 192) and got[AUX_HIDDEN].dtype == torch.float32
        assert got[FINAL_HIDDEN].shape == (len(ids), 64)
        assert torch.equal(got[AUX_HIDDEN], aux)
        assert torch.equal(got[FINAL_HIDDEN], final)
        assert got[AUX_HIDDEN].is_contiguous() and got[FINAL_HIDDEN].is_contiguous()


def test_single_sample_capture_equals_reference_forward_exactly(target: HFTarget, reference) -> None:
    for ids, mask in _prompts(LENGTHS, seed=1):
        (got,) = target.capture([(ids, mask)])
        ((aux, final),) = _reference(reference, [ids], pad_id=target.pad_token_id, padded=False)
        assert torch.equal(got[AUX_HIDDEN], aux), len(ids)
        assert torch.equal(got[FINAL_HIDDEN], final), len(ids)


def test_final_hidden_is_post_norm_and_aux_is_pre_norm(tiny_target_dir: Path) -> None:
    """With the last layer as an aux layer (hooks), norm(aux of layer N-1) is the final state."""
    with HFTarget(tiny_target_dir, aux_layer_ids=[1, 2, 3]) as t:
        (got,) = t.capture(_prompts([23]))
        last_layer = got[AUX_HIDDEN][:, 128:]
        with torch.no_grad():
            normed = t.decoder.norm(last_layer)
    assert torch.equal(normed, got[FINAL_HIDDEN])
    assert not torch.allclose(last_layer, got[FINAL_HIDDEN])


def test_fixed_width_makes_captures_independent_of_the_batch(tiny_target_dir: Path) -> None:
    """CPU kernels differ in the last bit between padded widths; one fixed width removes that."""
    prompts = _prompts(LENGTHS, seed=2)
    with HFTarget(tiny_target_dir, aux_layer_ids=AUX, pad_to_multiple_of=128) as t:
        together = t.capture(prompts)
        assert all(padded_width(len(p[0]), 128) == 128 for p in prompts)
        for prompt, batched in zip(prompts, together, strict=True):
            (alone,) = t.capture([prompt])
            for name in FEATURE_NAMES:
                assert torch.equal(batched[name], alone[name]), (len(prompt[0]), name)
        reordered = t.capture(list(reversed(prompts[:3])))
        for a, b in zip(reversed(reordered), together[:3], strict=True):
            assert torch.equal(a[AUX_HIDDEN], b[AUX_HIDDEN])


def test_variable_width_differs_at_most_in_the_last_bits(target: HFTarget) -> None:
    prompts = _prompts(LENGTHS, seed=3)
    together = target.capture(prompts)
    for prompt, batched in zip(prompts, together, strict=True):
        (alone,) = target.capture([prompt])
        torch.testing.assert_close(batched[AUX_HIDDEN], alone[AUX_HIDDEN], rtol=0, atol=1e-5)
        torch.testing.assert_close(batched[FINAL_HIDDEN], alone[FINAL_HIDDEN], rtol=0, atol=1e-5)


def test_hidden_states_fallback_equals_hooks(tiny_target_dir: Path, target: HFTarget) -> None:
    prompts = _prompts(LENGTHS, seed=4)
    with HFTarget(tiny_target_dir, aux_layer_ids=AUX, capture_mode="hidden_states") as fallback:
        assert fallback.capture_mode == "hidden_states" and target.capture_mode == "hooks"
        for a, b in zip(fallback.capture(prompts), target.capture(prompts), strict=True):
            for name in FEATURE_NAMES:
                assert torch.equal(a[name], b[name])


def test_many_batches_keep_the_callers_order(tiny_target_dir: Path) -> None:
    prompts = _prompts([9, 40, 3, 40, 25, 1, 33], seed=5)
    lengths = [len(p[0]) for p in prompts]
    assert len(plan_batches(lengths, 64)) > 3
    assert sorted(i for b in plan_batches(lengths, 64) for i in b) == list(range(len(prompts)))
    with HFTarget(tiny_target_dir, aux_layer_ids=AUX, batch_tokens=64) as t:
        captured = t.capture(prompts)
    assert [c[INPUT_IDS].tolist() for c in captured] == [p[0] for p in prompts]
    assert [c[LOSS_MASK].tolist() for c in captured] == [p[1] for p in prompts]
    with pytest.raises(RuntimeError, match="closed"):
        t.capture(prompts)


# -- the contract ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        ([0, 1, 4], r"\[4\] do not exist: the target has 4 decoder layers, valid ids are 0..3"),
        ([-1, 0, 1], r"\[-1\] do not exist"),
        ([0, 1, 1], r"not distinct"),
        ([2, 0, 1], r"not ascending.*pass \[0, 1, 2\]"),
        ([0, 1], r"exactly three"),
        (None, r"default aux layers \[1, 1, 0\].*explicitly"),
    ],
)
def test_bad_aux_layer_ids_are_refused(tiny_target_dir: Path, ids, message: str) -> None:
    with pytest.raises(CaptureContractError, match=message):
        HFTarget(tiny_target_dir, aux_layer_ids=ids)


def test_last_layer_cannot_be_captured_through_output_hidden_states(tiny_target_dir: Path) -> None:
    with pytest.raises(CaptureContractError, match="post-norm"):
        HFTarget(tiny_target_dir, aux_layer_ids=[1, 2, 3], capture_mode="hidden_states")


def test_wrong_layer_width_is_refused(tiny_target_dir: Path, monkeypatch) -> None:
    with HFTarget(tiny_target_dir, aux_layer_ids=AUX) as t:
        monkeypatch.setattr(t, "hidden_size", 32)  # the model says 32, its layers produce 64
        with pytest.raises(
            CaptureContractError, match=r"decoder layer 0 produced shape \(1, 7, 64\), expected \(1, 7, 32\)"
        ):
            t.capture(_prompts([7]))


def test_assemble_features_checks_widths_and_lengths() -> None:
    ids, mask = [1, 2, 3], [0, 1, 1]
    ok_aux, ok_final = torch.zeros(3, 12), torch.zeros(3, 4)
    assert assemble_features(ids, mask, ok_aux, ok_final, hidden_size=4)[AUX_HIDDEN].shape == (3, 12)
    layers = [torch.full((3, 4), float(i)) for i in range(3)]
    cat = assemble_features(ids, mask, layers, ok_final, hidden_size=4)[AUX_HIDDEN]
    assert cat[:, ::4].tolist() == [[0.0, 1.0, 2.0]] * 3  # ascending layers, concatenated
    with pytest.raises(
        CaptureContractError, match=r"aux hidden states have shape \(3, 11\), expected \(3, 12\)"
    ):
        assemble_features(ids, mask, torch.zeros(3, 11), ok_final, hidden_size=4)
    with pytest.raises(CaptureContractError, match="aux hidden state 1 has shape"):
        assemble_features(ids, mask, [layers[0], torch.zeros(3, 5), layers[2]], ok_final, hidden_size=4)
    with pytest.raises(CaptureContractError, match=r"final hidden states have shape \(3, 5\)"):
        assemble_features(ids, mask, ok_aux, torch.zeros(3, 5), hidden_size=4)
    with pytest.raises(CaptureContractError, match="covers 2 positions but the prompt has 3"):
        assemble_features(ids, mask, ok_aux[:2], ok_final, hidden_size=4)


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        (([], []), "prompt 0 is empty"),
        (([1, 2, 3], [1, 1]), "3 tokens but a loss mask of 2"),
        (([1, 512], [0, 1]), r"token id 512 outside the target vocabulary \[0, 512\)"),
        (([1, 2], [0, 2]), "loss mask value"),
    ],
)
def test_bad_prompts_are_refused(target: HFTarget, prompt, message: str) -> None:
    with pytest.raises(CaptureContractError, match=message):
        target.capture([prompt])


def test_missing_model_directory_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a local Hugging Face model directory"):
        HFTarget(tmp_path / "nowhere", aux_layer_ids=AUX)


def test_revision_is_stable_and_tracks_the_weights(tiny_target_dir: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(tiny_target_dir, tmp_path / "copy"))
    assert weights_fingerprint(copy) == weights_fingerprint(tiny_target_dir)
    weights = load_file(copy / "model.safetensors")
    save_file(
        {k: v * 1.01 for k, v in weights.items()}, copy / "model.safetensors", metadata={"format": "pt"}
    )
    assert weights_fingerprint(copy) != weights_fingerprint(tiny_target_dir)
    (copy / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="safetensors"):
        weights_fingerprint(copy)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_bf16_capture_is_close_to_cpu_fp32(tiny_target_dir: Path, target: HFTarget) -> None:
    prompts = _prompts(LENGTHS, seed=6)
    with HFTarget(tiny_target_dir, aux_layer_ids=AUX, device="cuda", dtype="bfloat16") as gpu:
        assert gpu.info.dtype == "bfloat16"
        got = gpu.capture(prompts)
    for g, c in zip(got, target.capture(prompts), strict=True):
        assert g[AUX_HIDDEN].device.type == "cpu" and g[AUX_HIDDEN].dtype == torch.bfloat16
        torch.testing.assert_close(g[AUX_HIDDEN].float(), c[AUX_HIDDEN], rtol=0.05, atol=0.05)
        torch.testing.assert_close(g[FINAL_HIDDEN].float(), c[FINAL_HIDDEN], rtol=0.05, atol=0.1)
