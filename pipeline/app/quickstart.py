"""``specstream quickstart``: the whole online job on a fresh machine, end to end, on CPU.

Builds the tiny trained Llama target and its tokenizer locally (no hub), writes synthetic chat
data, writes a config file you can re-run with ``specstream run --config``, and runs source,
generator and EAGLE3 trainer interleaved on the local broker (started if needed).

A workdir holds one run. Running the same quickstart there again continues that run (it resumes
from its newest checkpoint, or finds it complete); one with other settings (another
``--conversations`` or ``--max-steps``), or a workdir whose ``config.yaml`` is another run's, is
refused before anything is written.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import yaml

from pipeline.app.config import RunConfig, fingerprint_differences
from pipeline.app.config_file import load_config, parse_config
from pipeline.core.errors import ConfigError, OptionError
from pipeline.core.feedback import OpenProgress

__all__ = ("continued_run_id", "quickstart_config")

CONFIG_NAME = "config.yaml"


def continued_run_id(workdir: Path, conversations: int, max_steps: int | None) -> str | None:
    """The run id of the quickstart already in ``workdir`` when it has these settings (to continue
    it); None when the workdir holds no run. Another run there is an ``OptionError``.

    The settings compared are the run's fingerprint and ``train.max_steps`` (the learning-rate
    schedule's length, which a checkpoint must be resumed with).
    """
    workdir = workdir.resolve()
    saved = workdir / CONFIG_NAME
    if not saved.exists():
        return None
    elsewhere = f"continue it with `specstream run --config {saved}`, or pass --workdir <a new directory>"
    try:
        existing = load_config(saved)
    except ConfigError as exc:
        raise OptionError("--workdir", f"{workdir} holds a {CONFIG_NAME} that is not this quickstart's ({exc})",
                          "pass --workdir <a new directory>") from None  # fmt: skip
    from pipeline.devkit.target import tiny_target_dir  # lazy: start-up, the devkit loads transformers

    wanted = parse_config(_raw(workdir, conversations, tiny_target_dir(), existing.run_id, max_steps), source="quickstart")
    differences = fingerprint_differences(_compared(existing), _compared(wanted))
    if differences:
        listed = "; ".join(differences)
        raise OptionError("--workdir", f"{workdir} holds run {existing.run_id}, started with other settings ({listed})", elsewhere)
    return existing.run_id


def quickstart_config(
    workdir: Path,
    *,
    conversations: int = 192,
    bootstrap: str | None = None,
    max_steps: int | None = None,
    run_id: str | None = None,
    progress: OpenProgress | None = None,
) -> RunConfig:
    """Prepare the target and data under ``workdir``; return the run's config (also saved as YAML).

    ``run_id``: the run to continue (see :func:`continued_run_id`); default a new one.
    ``progress``: opens the bar over the tiny target's training steps (when it is built).
    """
    from pipeline.devkit.chats import markov_conversations, write_jsonl  # lazy: start-up
    from pipeline.devkit.target import build_tiny_target  # lazy: start-up

    workdir = workdir.resolve()
    target = build_tiny_target(progress=progress)
    raw = _raw(workdir, conversations, target, run_id or f"quickstart-{uuid.uuid4().hex[:8]}", max_steps)
    raw["broker"] = {"bootstrap_servers": bootstrap}
    config = parse_config(raw, source="quickstart")
    data = Path(config.data.path)
    data.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(markov_conversations(conversations, seed=0), str(data))
    (workdir / CONFIG_NAME).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    return config


def _compared(config: RunConfig) -> dict[str, Any]:
    return {**config.fingerprint_values(), "train.max_steps": config.train.max_steps}


def _raw(workdir: Path, conversations: int, target: Path, run_id: str, max_steps: int | None) -> dict[str, Any]:
    """The quickstart's settings for a workdir (``data.limit`` records how many conversations)."""
    from pipeline.devkit.target import TINY_AUX_LAYER_IDS  # lazy: start-up, the devkit loads transformers

    return {
        "run_id": run_id,
        "storage": {"root": str(workdir / "features"), "retention": "retain"},
        "data": {"path": str(workdir / "data" / "conversations.jsonl"), "max_length": 256, "partitions": 4,
                 "limit": conversations},
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
    }  # fmt: skip
