"""Fixtures for the trainer-core tests: tiny configs, random samples, fake target directories.

Everything is CPU, fp32 and seeded. The "fake target" here is only a directory in the Hugging Face
layout (config.json + safetensors with an embedding and an lm_head) for the loaders; the trained
tiny target of the learning test comes from ``pipeline.devkit.target``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pipeline.train.draft import DraftConfig, Eagle3Draft
from pipeline.vocab import VocabMapping, build_vocab_mapping

V, HT, VD = 512, 64, 128


@pytest.fixture(autouse=True)
def _seed_and_one_thread() -> Iterator[None]:
    """Seeded, and one intra-op thread: on a shared 2-core box two threads run ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def draft_config() -> DraftConfig:
    """Spec section 6 draft, with GQA (2 kv heads) so the head grouping is exercised."""
    return DraftConfig(
        hidden_size=HT, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=V, draft_vocab_size=VD, aux_layer_ids=(0, 1, 2),
    )


@pytest.fixture
def vocab() -> VocabMapping:
    counts = torch.zeros(V, dtype=torch.long)
    counts[torch.randperm(V, generator=torch.Generator().manual_seed(1))[:200]] = torch.arange(
        200, 0, -1
    )
    return build_vocab_mapping(counts, V, VD)


@pytest.fixture
def make_draft(draft_config: DraftConfig, vocab: VocabMapping) -> Callable[..., Eagle3Draft]:
    def make(seed: int = 0, config: DraftConfig | None = None) -> Eagle3Draft:
        torch.manual_seed(seed)
        return Eagle3Draft(config or draft_config, vocab=vocab)

    return make


@pytest.fixture
def make_sample() -> Callable[..., dict[str, torch.Tensor]]:
    """One unshifted sample in the feature-payload layout of pipeline/features.py."""

    def make(length: int, *, hidden: int = HT, vocab_size: int = V, seed: int = 0,
             supervised_from: int = 0) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        mask = torch.zeros(length, dtype=torch.uint8)
        mask[supervised_from:] = 1
        return {
            "input_ids": torch.randint(0, vocab_size, (length,), generator=g),
            "loss_mask": mask,
            "aux_hidden_states": torch.randn(length, 3 * hidden, generator=g),
            "final_hidden_states": torch.randn(length, hidden, generator=g),
        }

    return make


def write_target_dir(
    directory: Path,
    *,
    vocab_size: int = V,
    hidden: int = HT,
    layers: int = 4,
    tied: bool | None = False,
    sharded: bool = False,
    seed: int = 0,
    transformers5: bool = True,
) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """A HF-layout target directory; returns (dir, embedding, lm_head)."""
    g = torch.Generator().manual_seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    embed = torch.randn(vocab_size, hidden, generator=g)
    shares = tied is not False  # tied=None: no flag in config.json and no lm_head tensor
    head = embed if shares else torch.randn(vocab_size, hidden, generator=g)
    config: dict[str, object] = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": 4 * hidden, "num_attention_heads": 4, "num_key_value_heads": 4,
        "num_hidden_layers": layers, "vocab_size": vocab_size, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 2048, "hidden_act": "silu", "bos_token_id": 1,
        "eos_token_id": 2,
    }
    if tied is not None:
        config["tie_word_embeddings"] = tied
    if transformers5:
        config["rope_parameters"] = {"rope_theta": 10000.0, "rope_type": "default"}
    else:
        config["rope_theta"] = 10000.0
    (directory / "config.json").write_text(json.dumps(config))
    tensors = {
        "model.embed_tokens.weight": embed,
        "model.norm.weight": torch.ones(hidden),
        "model.layers.0.input_layernorm.weight": torch.ones(hidden),
    }
    if not shares:
        tensors["lm_head.weight"] = head
    if sharded:
        names = sorted(tensors)
        shards = {n: f"model-0000{i % 2 + 1}-of-00002.safetensors" for i, n in enumerate(names)}
        for file in set(shards.values()):
            save_file({n: tensors[n].contiguous() for n in names if shards[n] == file},
                      str(directory / file), metadata={"format": "pt"})
        (directory / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": shards})
        )
    else:
        save_file({n: t.contiguous() for n, t in tensors.items()},
                  str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory, embed, head


@pytest.fixture
def target_dir(tmp_path: Path) -> tuple[Path, torch.Tensor, torch.Tensor]:
    return write_target_dir(tmp_path / "target")


@pytest.fixture
def make_target_dir(tmp_path: Path) -> Callable[..., tuple[Path, torch.Tensor, torch.Tensor]]:
    def make(name: str = "target", **kwargs: object) -> tuple[Path, torch.Tensor, torch.Tensor]:
        return write_target_dir(tmp_path / name, **kwargs)  # type: ignore[arg-type]

    return make
