"""The draft module itself: names SGLang reads, config validation, RoPE variants, RMSNorm."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from pipeline.core.errors import ConfigError
from pipeline.train.draft import DraftConfig, Eagle3Draft, RMSNorm, _inv_freq

SGLANG_NAMES = {
    "fc.weight", "norm.weight", "lm_head.weight", "d2t", "t2d",
    "midlayer.input_layernorm.weight", "midlayer.hidden_norm.weight",
    "midlayer.self_attn.q_proj.weight", "midlayer.self_attn.k_proj.weight",
    "midlayer.self_attn.v_proj.weight", "midlayer.self_attn.o_proj.weight",
    "midlayer.post_attention_layernorm.weight", "midlayer.mlp.gate_proj.weight",
    "midlayer.mlp.up_proj.weight", "midlayer.mlp.down_proj.weight",
}


def test_state_dict_names_are_the_export_names(draft_config: DraftConfig) -> None:
    draft = Eagle3Draft(draft_config)
    assert set(draft.state_dict()) == SGLANG_NAMES | {"embed_tokens.weight"}
    assert draft.midlayer.self_attn.q_proj.weight.shape == (64, 128)  # reads the 2H concat
    assert draft.midlayer.self_attn.k_proj.weight.shape == (32, 128)  # GQA: 2 kv heads
    assert draft.fc.bias is None and draft.lm_head.bias is None
    assert float(draft.fc.weight.detach().std()) == pytest.approx(0.02, rel=0.1)
    assert torch.equal(draft.norm.weight, torch.ones(64))


@pytest.mark.parametrize("ids", [(0, 1), (2, 1, 0), (1, 1, 2), (-1, 0, 1)])
def test_aux_layer_ids_must_be_three_distinct_ascending(draft_config: DraftConfig,
                                                        ids: tuple[int, ...]) -> None:
    with pytest.raises(ConfigError, match="aux_layer_ids"):
        draft_config.with_(aux_layer_ids=ids)


@pytest.mark.parametrize("change", [
    {"hidden_act": "gelu"},
    {"num_key_value_heads": 3},
    {"draft_vocab_size": 1000},
    {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
])
def test_unsupported_shapes_are_refused(draft_config: DraftConfig, change: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        draft_config.with_(**change)


def test_rms_norm_formula() -> None:
    norm = RMSNorm(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, 9.0))
    x = torch.randn(3, 8)
    expected = torch.arange(1.0, 9.0) * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    assert torch.allclose(norm(x), expected, atol=1e-6)


@pytest.mark.parametrize("scaling", [
    {"rope_type": "default"},
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},
])
def test_rope_frequencies_match_transformers(scaling: dict[str, Any]) -> None:
    transformers = pytest.importorskip("transformers")
    rope_utils = pytest.importorskip("transformers.modeling_rope_utils")
    hf_config = transformers.LlamaConfig(
        hidden_size=256, num_attention_heads=2, max_position_embeddings=131072,
        rope_parameters={"rope_theta": 500000.0, **scaling},
    )
    kind = scaling["rope_type"]
    if kind == "default":
        hf_inv = 1.0 / 500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float32) / 128)
    else:
        hf_inv, _ = rope_utils.ROPE_INIT_FUNCTIONS[kind](hf_config, "cpu")
    ours = _inv_freq(DraftConfig(
        hidden_size=256, intermediate_size=8, num_attention_heads=2, num_key_value_heads=2,
        vocab_size=10, draft_vocab_size=5, aux_layer_ids=(0, 1, 2), rope_theta=500000.0,
        rope_scaling=None if kind == "default" else scaling,
    ))
    assert torch.allclose(ours, hf_inv.float(), rtol=1e-6, atol=0)
