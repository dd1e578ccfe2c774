"""Gather the start banner's facts from the run's config, its target, checkpoints and source.

:func:`start_banner` is called on rank 0 of ``specstream train`` and by the single-process run,
after the schedule is decided and before the first step; the text comes from
:mod:`pipeline.train.banner`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.app.config import RunConfig
from pipeline.app.outputs import resume_checkpoint
from pipeline.core.progress import read_source_counters
from pipeline.core.topics import RunTopics, Transport
from pipeline.train.banner import BannerFacts, banner_text

__all__ = ("start_banner", "source_prompts", "resume_point", "trainer_banner")


def _target_shape(model: str) -> dict[str, Any]:
    """hidden size, layers and vocab from the target's ``config.json`` (empty when there is none)."""
    path = Path(model) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {**raw.get("text_config", {}), **raw}


def resume_point(cfg: RunConfig) -> str | None:
    """"checkpoint step N (offsets p0:12, p1:9)" of the checkpoint a resume would take; None: a fresh start."""
    chosen = resume_checkpoint(cfg)
    if chosen is None:
        return None
    manager, info = chosen
    positions: dict[str, int] = {}
    for rank in manager.read_meta(info).get("ranks", []):
        positions.update(rank.get("stream", {}).get("positions", {}))
    offsets = ", ".join(f"p{p}:{o}" for p, o in sorted(positions.items(), key=lambda kv: int(kv[0])))
    return f"checkpoint step {info.step}" + (" (end of stream)" if info.end else "") + (f" (offsets {offsets})" if offsets else "")


def source_prompts(transport: Transport, cfg: RunConfig) -> int | None:
    """The prompts the source published, once it has closed every partition (else None)."""
    counters = read_source_counters(transport, RunTopics(cfg.run_id), cfg.data.partitions)
    if not counters or not all(c.ended for c in counters.values()):
        return None
    return sum(c.prompts for c in counters.values())


def start_banner(
    cfg: RunConfig,
    *,
    schedule_steps: int | None,
    prompts: int | None,
    conversations: int | None,
) -> str:
    """The banner text for this run (see :mod:`pipeline.train.banner`)."""
    shape = _target_shape(str(cfg.target.model))
    t = cfg.train
    if t.max_steps:
        total, steps_from = t.max_steps, "max_steps"
    elif schedule_steps:
        passes = "one pass" if t.epochs == 1 else f"{t.epochs} epochs"
        total, steps_from = schedule_steps, f"the cosine schedule: {passes} over the prompts"
    else:
        total, steps_from = None, ""
    return banner_text(
        BannerFacts(
            run_id=cfg.run_id,
            target=str(cfg.target.model),
            target_hidden=shape.get("hidden_size"),
            target_layers=shape.get("num_hidden_layers"),
            target_vocab=shape.get("vocab_size"),
            aux_layer_ids=cfg.target.aux_layer_ids,
            draft_hidden=shape.get("hidden_size"),  # the EAGLE3 draft works at the target's width
            draft_vocab=t.draft_vocab_size,
            ttt_steps=t.ttt_steps,
            conversations=cfg.data.limit if cfg.data.limit is not None else conversations,
            prompts=prompts,
            partitions=cfg.data.partitions,
            world_size=t.world_size,
            per_rank_batch=t.batch_size * t.grad_accum,
            total_steps=total,
            steps_from=steps_from,
            resume=resume_point(cfg),
            storage_root=cfg.storage.root,
        )
    )


def trainer_banner(
    cfg: RunConfig, transport: Transport, *, schedule_steps: int | None, projected_storage: Callable[[float], str]
) -> str:
    """``specstream train``'s banner on rank 0, then the storage projection. The trainer does not
    know the prompts' mean length, so the projection takes every sample at ``data.max_length``
    tokens: an upper bound, and it says so."""
    banner = start_banner(cfg, schedule_steps=schedule_steps, prompts=source_prompts(transport, cfg), conversations=None)
    storage = projected_storage(float(cfg.data.max_length))
    return f"{banner}\n{storage} (an upper bound: every sample taken at data.max_length = {cfg.data.max_length} tokens)"
