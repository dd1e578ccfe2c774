"""Spec check 10: the SGLang EAGLE3 export and its round trip."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from pipeline.train.draft import DraftConfig, Eagle3Draft
from pipeline.train.export import export_draft, load_exported
from pipeline.train.target_head import load_target_head
from pipeline.train.ttt import ttt_forward
from pipeline.vocab import VocabMapping

MIDLAYER = {
    "midlayer.input_layernorm.weight": (64,),
    "midlayer.hidden_norm.weight": (64,),
    "midlayer.self_attn.q_proj.weight": (64, 128),
    "midlayer.self_attn.k_proj.weight": (64, 128),
    "midlayer.self_attn.v_proj.weight": (64, 128),
    "midlayer.self_attn.o_proj.weight": (64, 64),
    "midlayer.post_attention_layernorm.weight": (64,),
    "midlayer.mlp.gate_proj.weight": (256, 64),
    "midlayer.mlp.up_proj.weight": (256, 64),
    "midlayer.mlp.down_proj.weight": (64, 256),
}
EXPECTED = {
    "fc.weight": (64, 192), "norm.weight": (64,), "lm_head.weight": (128, 64), "d2t": (128,),
    "t2d": (512,), **MIDLAYER,
}


def _trained_like_draft(target: Path, vocab: VocabMapping) -> Eagle3Draft:
    draft = Eagle3Draft.from_target(target, vocab, aux_layer_ids=[0, 1, 2])
    with torch.no_grad():  # move every norm off 1.0 so a lost tensor would show
        for name, param in draft.named_parameters():
            if param.requires_grad:
                param.add_(0.01 * torch.randn_like(param))
    return draft


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}


def test_export_layout_and_exact_round_trip(
    tmp_path: Path, target_dir: tuple[Path, torch.Tensor, torch.Tensor], vocab: VocabMapping
) -> None:
    directory, embed, _ = target_dir
    draft = _trained_like_draft(directory, vocab)
    out = tmp_path / "export"
    export_draft(draft, out)
    tensors = _tensors(out / "model.safetensors")
    assert {name: tuple(t.shape) for name, t in tensors.items()} == EXPECTED
    assert "embed_tokens.weight" not in tensors  # SGLang substitutes the target's embedding
    assert tensors["d2t"].dtype == torch.int64 and tensors["t2d"].dtype == torch.bool
    assert all(t.dtype == torch.float32 for n, t in tensors.items() if n not in ("d2t", "t2d"))
    assert torch.equal(tensors["d2t"], vocab.d2t) and torch.equal(tensors["t2d"], vocab.t2d)

    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"]
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 1
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [0, 1, 2]
    assert (config["vocab_size"], config["draft_vocab_size"]) == (512, 128)
    assert (config["hidden_size"], config["intermediate_size"]) == (64, 256)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (
        4, 4, 16)
    assert config["tie_word_embeddings"] is False and config["hidden_act"] == "silu"
    assert config["rope_theta"] == 10000.0 and config["torch_dtype"] == "float32"
    assert "target_hidden_size" not in config

    loaded = load_exported(out, directory)
    assert torch.equal(loaded.embed_tokens.weight, embed)
    assert loaded.config == draft.config
    assert torch.equal(loaded.d2t, draft.d2t) and torch.equal(loaded.t2d, draft.t2d)
    ids, aux = torch.randint(0, 512, (2, 12)), torch.randn(2, 12, 192)
    with torch.no_grad():
        before = ttt_forward(draft, ids, aux, num_steps=3)
        after = ttt_forward(loaded, ids, aux, num_steps=3)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    # a loaded TargetHead works as well as a directory
    again = load_exported(out, load_target_head(directory))
    assert torch.equal(again.embed_tokens.weight, embed)


def test_bf16_export_keeps_the_vocab_map_exact(
    tmp_path: Path, target_dir: tuple[Path, torch.Tensor, torch.Tensor], vocab: VocabMapping
) -> None:
    directory, _, _ = target_dir
    draft = _trained_like_draft(directory, vocab)
    export_draft(draft, tmp_path / "bf16", dtype=torch.bfloat16)
    tensors = _tensors(tmp_path / "bf16" / "model.safetensors")
    assert tensors["fc.weight"].dtype == torch.bfloat16
    assert tensors["d2t"].dtype == torch.int64 and tensors["t2d"].dtype == torch.bool
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded = load_exported(tmp_path / "bf16", directory)
    assert loaded.fc.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.fc.weight, draft.fc.weight.bfloat16())
    assert torch.equal(loaded.d2t, draft.d2t)


def test_width_changing_draft_ships_its_embedding(
    tmp_path: Path, vocab: VocabMapping, make_draft: Callable[..., Eagle3Draft],
    draft_config: DraftConfig,
) -> None:
    narrow = draft_config.with_(hidden_size=32, intermediate_size=64, target_hidden_size=64)
    draft = make_draft(config=narrow)
    assert draft.owns_embedding and draft.embed_tokens.weight.requires_grad
    export_draft(draft, tmp_path / "narrow")
    config = json.loads((tmp_path / "narrow" / "config.json").read_text())
    assert config["target_hidden_size"] == 64
    tensors = _tensors(tmp_path / "narrow" / "model.safetensors")
    assert tuple(tensors["embed_tokens.weight"].shape) == (512, 32)
    assert tuple(tensors["fc.weight"].shape) == (32, 192)
    loaded = load_exported(tmp_path / "narrow")  # no target needed
    assert torch.equal(loaded.embed_tokens.weight, draft.embed_tokens.weight)


def test_transformers_reads_the_exported_config(
    tmp_path: Path, target_dir: tuple[Path, torch.Tensor, torch.Tensor], vocab: VocabMapping
) -> None:
    transformers = pytest.importorskip("transformers")
    directory, _, _ = target_dir
    export_draft(_trained_like_draft(directory, vocab), tmp_path / "hf")
    config = transformers.LlamaConfig.from_pretrained(tmp_path / "hf")
    assert config.num_hidden_layers == 1 and config.draft_vocab_size == 128
    assert config.eagle_config["eagle_aux_hidden_state_layer_ids"] == [0, 1, 2]
    assert config.head_dim == 16 and config.num_key_value_heads == 4


def test_export_to_fsspec_url(
    target_dir: tuple[Path, torch.Tensor, torch.Tensor], vocab: VocabMapping
) -> None:
    directory, _, _ = target_dir
    draft = _trained_like_draft(directory, vocab)
    url = "memory://specstream-export-test/draft"
    export_draft(draft, url)
    loaded = load_exported(url, directory)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(),
                                                  draft.state_dict().values()))
