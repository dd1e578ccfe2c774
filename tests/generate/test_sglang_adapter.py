"""The SGLang adapter without SGLang: stub responses and a stand-in engine backed by the HF backend.

What this proves: the response -> feature conversion (row layout, prompt rows vs decode rows,
dtype, every refusal), batching and ordering, and the import guard. What it cannot prove: that a
real ``sglang.Engine`` answers in this shape (see the module docstring of pipeline.generate.sglang).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.core.errors import CaptureContractError, ConfigError
from pipeline.core.features import AUX_HIDDEN, FEATURE_NAMES, FINAL_HIDDEN, INPUT_IDS, LOSS_MASK
from pipeline.generate import sglang as sgl_backend
from pipeline.generate.backend import TargetBackend
from pipeline.generate.hf import HFTarget
from pipeline.generate.sglang import SGLangTarget, features_from_sglang_output, prompt_hidden_rows

pytestmark = pytest.mark.usefixtures("one_thread")

H = 4
AUX = [0, 1, 2]


def _rows(length: int, width: int, dtype=torch.bfloat16) -> torch.Tensor:
    return torch.randn(length, width, generator=torch.Generator().manual_seed(length)).to(dtype)


def _response(chunks) -> dict:
    return {"text": "", "output_ids": [7], "meta_info": {"hidden_states": chunks, "prompt_tokens": 3}}


def test_rows_are_split_into_aux_and_final_and_decode_rows_ignored() -> None:
    rows = _rows(3, 4 * H)
    decode_row = [[9.0] * (4 * H)]
    out = features_from_sglang_output(
        _response([rows.float().tolist(), decode_row]), [5, 6, 7], [0, 1, 1], hidden_size=H
    )
    assert set(out) == set(FEATURE_NAMES)
    assert out[INPUT_IDS].tolist() == [5, 6, 7] and out[LOSS_MASK].tolist() == [0, 1, 1]
    assert out[AUX_HIDDEN].dtype == torch.bfloat16
    assert torch.equal(out[AUX_HIDDEN], rows[:, : 3 * H])  # bf16 -> float list -> bf16 is exact
    assert torch.equal(out[FINAL_HIDDEN], rows[:, 3 * H :])


@pytest.mark.parametrize(
    "chunks",
    [
        lambda rows: [rows.unsqueeze(0)],  # a (1, L, D) tensor, as older releases returned
        lambda rows: [rows],  # an (L, D) tensor
        lambda rows: [r.tolist() for r in rows] + [[0.0] * (4 * H)],  # one row per entry, then decode
    ],
)
def test_other_row_containers_are_accepted(chunks) -> None:
    rows = _rows(3, 4 * H, torch.float32)
    out = features_from_sglang_output(
        _response(chunks(rows)), [1, 2, 3], [1, 1, 1], hidden_size=H, dtype=torch.float32
    )
    assert torch.equal(out[AUX_HIDDEN], rows[:, : 3 * H]) and torch.equal(out[FINAL_HIDDEN], rows[:, 3 * H :])


@pytest.mark.parametrize(
    ("response", "message"),
    [
        (_response([_rows(3, H).float().tolist()]), "final hidden states only"),
        (_response([_rows(3, 3 * H).float().tolist()]), "aux layers only"),
        (_response([_rows(3, 5 * H).float().tolist()]), r"width 20, expected 16"),
        (
            _response([_rows(2, 4 * H).float().tolist()]),
            "2 prefill rows for a 3-token prompt.*disable_radix_cache",
        ),
        (_response([]), "enable_return_hidden_states=True"),
        ({"meta_info": {}}, "enable_return_hidden_states=True"),
        ({"text": "x"}, "no meta_info"),
        (_response([[["a"] * 16] * 3]), "not numeric"),
    ],
)
def test_unusable_responses_are_refused(response: dict, message: str) -> None:
    with pytest.raises(CaptureContractError, match=message):
        features_from_sglang_output(response, [1, 2, 3], [0, 1, 1], hidden_size=H)


def test_prompt_rows_are_float32_on_cpu() -> None:
    rows = prompt_hidden_rows(_response([_rows(3, 4 * H).float().tolist()]), 3)
    assert rows.dtype == torch.float32 and rows.device.type == "cpu" and rows.shape == (3, 16)


class _HFBackedEngine:
    """Answers like an SGLang engine whose capture rows are [aux | final], computed by HF."""

    def __init__(self, hf: HFTarget) -> None:
        self.hf = hf
        self.calls: list[dict] = []
        self.shut_down = False

    def generate(self, *, input_ids, sampling_params, return_hidden_states):
        self.calls.append(
            {"n": len(input_ids), "sampling_params": sampling_params, "hs": return_hidden_states}
        )
        captures = self.hf.capture([(ids, [0] * len(ids)) for ids in input_ids])
        return [
            {
                "output_ids": [0],
                "meta_info": {
                    "prompt_tokens": len(ids),
                    "hidden_states": [torch.cat([c[AUX_HIDDEN], c[FINAL_HIDDEN]], -1).tolist()],
                },
            }
            for ids, c in zip(input_ids, captures, strict=True)
        ]

    def shutdown(self) -> None:
        self.shut_down = True


def _prompts() -> list[tuple[list[int], list[int]]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(0, 512, (n,), generator=g).tolist(), [n % 2] * n) for n in (11, 30, 2)]


def test_sglang_target_over_a_stand_in_engine_matches_the_hf_backend(tiny_target_dir: Path) -> None:
    with HFTarget(tiny_target_dir, aux_layer_ids=AUX) as hf:
        engine = _HFBackedEngine(hf)
        with SGLangTarget(tiny_target_dir, aux_layer_ids=AUX, dtype="float32", engine=engine) as target:
            assert isinstance(target, TargetBackend)
            assert target.info.model_copy(update={"model_id": "x"}) == hf.info.model_copy(
                update={"model_id": "x"}
            )
            got = target.capture(_prompts())
            assert target.capture([]) == []
        expected = hf.capture(_prompts())
    assert engine.calls == [
        {"n": 3, "sampling_params": {"max_new_tokens": 1, "temperature": 0.0}, "hs": True}
    ]
    assert not engine.shut_down  # a caller's engine is the caller's to stop
    for g, e in zip(got, expected, strict=True):
        for name in FEATURE_NAMES:
            assert torch.equal(g[name], e[name]), name


def test_engine_answering_the_wrong_number_of_results_is_refused(tiny_target_dir: Path) -> None:
    class Short:
        def generate(self, **kwargs):
            return []

    target = SGLangTarget(tiny_target_dir, aux_layer_ids=AUX, engine=Short())
    with pytest.raises(CaptureContractError, match="0 results for 3 prompts"):
        target.capture(_prompts())


def test_last_layer_is_refused_as_an_aux_layer(tiny_target_dir: Path) -> None:
    with pytest.raises(CaptureContractError, match=r"last layer \(3\) cannot be an aux layer"):
        SGLangTarget(tiny_target_dir, aux_layer_ids=[1, 2, 3], engine=object())


def test_default_dtype_is_bfloat16_and_an_owned_engine_is_shut_down(
    tiny_target_dir: Path, monkeypatch
) -> None:
    started: list[tuple] = []
    engine = _HFBackedEngine(None)  # type: ignore[arg-type]

    def fake_start(path, dtype, kwargs):
        started.append((path, dtype, kwargs))
        return engine

    monkeypatch.setattr(sgl_backend, "_start_engine", fake_start)
    target = SGLangTarget(tiny_target_dir, aux_layer_ids=AUX, mem_fraction_static=0.5)
    assert target.info.dtype == "bfloat16"  # the tiny checkpoint says float32: not a serving dtype
    assert started == [(tiny_target_dir, "bfloat16", {"mem_fraction_static": 0.5})]
    target.close()
    target.close()
    assert engine.shut_down


@pytest.mark.skipif(sgl_backend.sglang_available(), reason="sglang is installed here")
def test_missing_sglang_names_the_extra(tiny_target_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"pip install 'specstream\[sglang\]'"):
        SGLangTarget(tiny_target_dir, aux_layer_ids=AUX)
