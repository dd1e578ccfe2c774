"""The start banner rank 0 prints before the first step, as the HF Trainer's "Running training".

It says what is about to happen in one block a person can check at a glance: the run, the target
and draft shapes, how much data, how it is split, how many steps, where it resumes and the storage
root; the projected peak feature storage follows it as its own line (an estimate that says what it
assumes). Built from plain values (the app layer gathers them), so it is the
same text for ``specstream train`` and the single-process run, and testable without a run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ("BannerFacts", "banner_text")


@dataclass(frozen=True, kw_only=True)
class BannerFacts:
    """What the banner shows; None where the value is not known yet (printed as "unknown")."""

    run_id: str
    target: str  # the target model's path or name
    target_hidden: int | None
    target_layers: int | None
    target_vocab: int | None
    aux_layer_ids: Sequence[int] | None
    draft_hidden: int | None
    draft_vocab: int
    ttt_steps: int
    conversations: int | None  # the conversations the source read (its limit when it has one)
    prompts: int | None  # prompts the source published (None: the source has not finished)
    partitions: int
    world_size: int
    per_rank_batch: int  # batch_size x grad_accum
    total_steps: int | None  # None: to the end of the stream
    steps_from: str  # where total_steps comes from: "max_steps", "one pass over the prompts", ...
    resume: str | None  # "checkpoint step 10 (offsets p0:12 p1:9)"; None: a fresh start
    storage_root: str


def banner_text(facts: BannerFacts) -> str:
    """The banner, one fact per line, framed like the HF Trainer's."""

    def known(value: object) -> str:
        return "unknown" if value is None else str(value)

    aux = ", ".join(map(str, facts.aux_layer_ids)) if facts.aux_layer_ids else "default"
    steps = (
        f"{facts.total_steps} ({facts.steps_from})" if facts.total_steps is not None else "to end of stream"
    )
    rows = [
        ("Run", facts.run_id),
        ("Target", (f"{facts.target}: hidden {known(facts.target_hidden)}, {known(facts.target_layers)} layers, "
                    f"vocab {known(facts.target_vocab)}, aux layers [{aux}]")),
        ("Draft", (f"hidden {known(facts.draft_hidden)}, vocab {known(facts.target_vocab)} -> draft vocab "
                   f"{facts.draft_vocab}, TTT depth {facts.ttt_steps}")),
        ("Conversations", known(facts.conversations)),
        ("Prompts", known(facts.prompts) if facts.prompts is not None else "unknown (the source has not finished)"),
        ("Partitions", str(facts.partitions)),
        ("World size", str(facts.world_size)),
        ("Batch per rank", f"{facts.per_rank_batch} samples per optimizer step"),
        ("Global batch", f"{facts.per_rank_batch * facts.world_size} samples per optimizer step"),
        ("Total optimizer steps", steps),
        ("Resume", facts.resume or "none (a fresh start)"),
        ("Storage root", facts.storage_root),
    ]  # fmt: skip
    width = max(len(name) for name, _ in rows)
    lines = ["***** Running training *****", *(f"  {name:<{width}} = {value}" for name, value in rows)]
    return "\n".join(lines)
