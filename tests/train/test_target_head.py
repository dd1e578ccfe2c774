"""Loading only the target's embedding and lm_head, and deriving the draft config from it."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from pipeline.core.errors import CaptureContractError, ConfigError, RunMismatchError
from pipeline.train.draft import DraftConfig, Eagle3Draft
from pipeline.train.target_head import TargetArchitecture, load_target_head, read_target_config
from pipeline.vocab import VocabMapping

MakeTarget = Callable[..., tuple[Path, torch.Tensor, torch.Tensor]]


@pytest.mark.parametrize("sharded", [False, True])
def test_loads_embedding_and_lm_head(make_target_dir: MakeTarget, sharded: bool) -> None:
    directory, embed, head = make_target_dir(sharded=sharded)
    loaded = load_target_head(directory)
    assert torch.equal(loaded.embed_tokens, embed) and torch.equal(loaded.lm_head, head)
    assert not torch.equal(loaded.lm_head, loaded.embed_tokens)
    hidden = torch.randn(2, 3, 64)
    assert torch.allclose(loaded.logits(hidden), hidden @ head.T, atol=1e-5)


@pytest.mark.parametrize("tie_flag", [True, None])
def test_tied_embeddings_without_lm_head(make_target_dir: MakeTarget, tie_flag: bool | None) -> None:
    directory, embed, _ = make_target_dir(tied=tie_flag)
    loaded = load_target_head(directory)
    assert torch.equal(loaded.lm_head, embed)


def test_missing_lm_head_of_untied_target_is_an_error(make_target_dir: MakeTarget) -> None:
    directory, _, _ = make_target_dir(tied=True)
    config = json.loads((directory / "config.json").read_text())
    config["tie_word_embeddings"] = False
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="lm_head"):
        load_target_head(directory)


def test_pickle_only_checkpoint_is_refused(tmp_path: Path, make_target_dir: MakeTarget) -> None:
    directory, _, _ = make_target_dir()
    (directory / "model.safetensors").unlink()
    (directory / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ConfigError, match="safetensors"):
        load_target_head(directory)


@pytest.mark.parametrize("transformers5", [True, False])
def test_reads_config_in_both_transformers_layouts(
    make_target_dir: MakeTarget, transformers5: bool
) -> None:
    directory, _, _ = make_target_dir(transformers5=transformers5)
    config = read_target_config(directory)
    assert (config.hidden_size, config.vocab_size, config.num_hidden_layers) == (64, 512, 4)
    assert config.rope_theta == 10000.0 and config.rope_scaling is None
    assert config.head_dim == 16


def test_rope_scaling_is_normalised() -> None:
    base = {"hidden_size": 64, "num_attention_heads": 4, "vocab_size": 10, "num_hidden_layers": 2,
            "intermediate_size": 8}
    v4 = TargetArchitecture.from_dict({**base, "rope_theta": 5e5, "rope_scaling": {
        "type": "linear", "factor": 2.0}})
    v5 = TargetArchitecture.from_dict({**base, "rope_parameters": {
        "rope_theta": 5e5, "rope_type": "linear", "factor": 2.0}})
    assert v4.rope_scaling == v5.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert v4.rope_theta == v5.rope_theta == 5e5


def test_real_transformers_checkpoint(tmp_path: Path) -> None:
    """The loader reads what transformers' save_pretrained writes (tied and untied)."""
    transformers = pytest.importorskip("transformers")
    for tied in (False, True):
        config = transformers.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=100, tie_word_embeddings=tied,
        )
        model = transformers.LlamaForCausalLM(config)
        model.save_pretrained(tmp_path / str(tied))
        loaded = load_target_head(tmp_path / str(tied))
        assert torch.equal(loaded.embed_tokens, model.model.embed_tokens.weight.detach())
        assert torch.equal(loaded.lm_head, model.lm_head.weight.detach())
        assert loaded.config.num_key_value_heads == 2


def test_draft_config_from_target(target_dir: tuple[Path, torch.Tensor, torch.Tensor]) -> None:
    directory, embed, _ = target_dir
    target = read_target_config(directory)
    with pytest.raises(CaptureContractError):  # [1, 1, 0] for N=4: the default collapses
        DraftConfig.from_target_config(target, draft_vocab_size=128)
    config = DraftConfig.from_target_config(target, draft_vocab_size=128, aux_layer_ids=[0, 1, 2])
    assert (config.hidden_size, config.num_attention_heads, config.resolved_head_dim) == (64, 4, 16)
    assert (config.vocab_size, config.draft_vocab_size, config.target_hidden_size) == (512, 128, None)
    with pytest.raises(ConfigError):
        DraftConfig.from_target_config(target, aux_layer_ids=[0, 1, 4])
    config.check_target(aux_layer_ids=[0, 1, 2], hidden_size=64, vocab_size=512)
    with pytest.raises(RunMismatchError, match="aux layers"):
        config.check_target(aux_layer_ids=[1, 2, 3], hidden_size=64, vocab_size=512)

    vocab = VocabMapping(d2t=torch.zeros(128, dtype=torch.long),
                         t2d=torch.arange(512) < 128)
    draft = Eagle3Draft.from_target(directory, vocab, aux_layer_ids=[0, 1, 2])
    assert torch.equal(draft.embed_tokens.weight, embed)
    assert not draft.embed_tokens.weight.requires_grad
    trainable = sum(p.numel() for p in draft.trainable_parameters())
    assert trainable == 98_560  # spec section 6: about 98.6K trainable parameters
    assert torch.equal(draft.t2d, vocab.t2d)
