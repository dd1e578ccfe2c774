"""``specstream quickstart``: the whole online job on a fresh machine, end to end, on CPU.

Builds the tiny trained Llama target and its tokenizer locally (no hub), writes synthetic chat
data, writes a config file you can re-run with ``specstream run --config``, and runs source,
generator and EAGLE3 trainer interleaved on the local broker (started if needed).
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import yaml

from pipeline.app.config import RunConfig
from pipeline.app.config_file import parse_config

__all__ = ("quickstart_config",)


def quickstart_config(
    workdir: Path, *, conversations: int = 192, bootstrap: str | None = None, max_steps: int | None = None
) -> RunConfig:
    """Prepare the target and data under ``workdir``; return the run's config (also saved as YAML)."""
    # lazy: start-up (the devkit loads transformers and tokenizers only when a quickstart is prepared)
    from pipeline.devkit.chats import markov_conversations, write_jsonl  # lazy: start-up
    from pipeline.devkit.target import TINY_AUX_LAYER_IDS, build_tiny_target  # lazy: start-up

    workdir = workdir.resolve()
    target = build_tiny_target()
    data = workdir / "data" / "conversations.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(markov_conversations(conversations, seed=0), str(data))
    raw: dict[str, Any] = {
        "run_id": f"quickstart-{uuid.uuid4().hex[:8]}",
        "broker": {"bootstrap_servers": bootstrap},
        "storage": {"root": str(workdir / "features"), "retention": "retain"},
        "data": {"path": str(data), "max_length": 256, "partitions": 4},
        "target": {
            "backend": "hf",
            "model": str(target),
            "device": "cpu",
            "dtype": "float32",
            "aux_layer_ids": list(TINY_AUX_LAYER_IDS),
            "batch_size": 8,
        },
        "generate": {"workers": 1, "high_watermark": 64, "low_watermark": 32},
        "train": {
            "batch_size": 4,
            "lr": 3e-3,
            "warmup_ratio": 0.05,
            "ttt_steps": 3,
            "draft_vocab_size": 128,
            "save_interval": 10,
            "max_steps": max_steps,
            "output_dir": str(workdir / "out"),
            "seed": 0,
        },
    }
    config = parse_config(raw, source="quickstart")
    (workdir / "config.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    return config

