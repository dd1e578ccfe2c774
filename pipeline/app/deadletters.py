"""``specstream dlq``: a run's dead letters, readable: where each came from, why, and how many per cause.

Read from the run's DLQ topic alone (bounded, ``read_to_end``); nothing is written. The stage
of a letter follows from what it was read from: the source dead-letters input lines
(``source:<file>``), the generators prompts (``<run>.prompts``), the trainer sample refs
(``<run>.samples``).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pipeline.core.deadletter import stage_of
from pipeline.core.errors import DecodeError, StreamError
from pipeline.core.messages import DeadLetter, decode
from pipeline.core.topics import RunTopics, Transport, read_to_end

__all__ = (
    "STAGES",
    "Letter",
    "ReasonCount",
    "stage_of",
    "normalise_reason",
    "read_dead_letters",
    "count_by_reason",
    "select",
    "render_dead_letters",
    "dead_letters_json",
)

STAGES = ("source", "generate", "train")
_EXCERPT = 80
# Record-specific parts of a reason: quoted values, paths, hex ids and checksums, numbers.
_QUOTED = re.compile(r"(?<!\w)'[^']*'|\"[^\"]*\"")
_PATH = re.compile(r"(?:[\w.-]*/)+[\w.-]+")
_HEXISH = re.compile(r"\b(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])[0-9a-f]{8,}\b", re.IGNORECASE)
# A number on its own, not part of a name ("UTF-8", "crc32c", "sha256" keep theirs).
_NUMBER = re.compile(r"(?<![\w-])-?\d+(?:\.\d+)?(?:e[+-]?\d+)?", re.IGNORECASE)


def normalise_reason(reason: str) -> str:
    """A reason without what is specific to one record, so that letters of one cause group.

    The rule: quoted values become ``'…'``, paths ``<path>``, hex ids and checksums ``<id>``, and
    every number on its own ``N`` (not one inside a name: ``UTF-8`` stays); then runs of spaces collapse. "line 7: not JSON" and "line 12: not
    JSON" are one cause; "token id 900 is outside the vocabulary of 512" stays apart from a
    missing file.
    """
    text = _QUOTED.sub("'…'", reason.splitlines()[0] if reason else "")
    text = _PATH.sub("<path>", text)
    text = _HEXISH.sub("<id>", text)
    text = _NUMBER.sub("N", text)
    return " ".join(text.split())


@dataclass(frozen=True)
class Letter:
    """One dead letter as the operator reads it (the DLQ record's own offset kept for ``--json``)."""

    dlq_offset: int
    stage: str
    source_topic: str
    partition: int
    offset: int
    error: str
    reason: str
    excerpt: str
    payload_truncated: bool
    sample_id: str | None
    created_at: float

    @classmethod
    def of(cls, dlq_offset: int, letter: DeadLetter) -> Letter:
        return cls(
            dlq_offset, stage_of(letter.source_topic), letter.source_topic, letter.partition, letter.offset,
            letter.error, letter.reason, _one_line(letter.payload, _EXCERPT), letter.payload_truncated, letter.sample_id, letter.created_at,
        )  # fmt: skip


@dataclass(frozen=True)
class ReasonCount:
    """How many letters share one cause: stage, error type and normalised reason."""

    stage: str
    error: str
    reason: str
    count: int
    example: str  # one full reason of the group, as written


def read_dead_letters(transport: Transport, run_id: str, timeout_s: float = 60.0) -> list[Letter]:
    """The run's dead letters in DLQ order, each once: a trainer that resumes re-reads and
    re-letters a record (same source topic, partition and offset), which is one letter, not two.
    Records that are no dead letter of this run (another producer's) are skipped; a run without
    a DLQ topic on this broker is a ``StreamError`` (a wrong run id or broker, not a clean run)."""
    topic = RunTopics(run_id).dlq
    with transport.admin() as admin:
        if admin.partition_count(topic) is None:
            raise StreamError(f"run {run_id} has no topics on this broker (no {topic}): check the run id and the broker")
    seen: set[tuple[str, int, int]] = set()
    out: list[Letter] = []
    for record in read_to_end(transport, topic, [0], timeout_s=timeout_s):
        try:
            letter = decode(record.value or b"")
        except DecodeError:
            continue
        if not isinstance(letter, DeadLetter) or letter.run_id != run_id:
            continue
        where = (letter.source_topic, letter.partition, letter.offset)
        if where not in seen:
            seen.add(where)
            out.append(Letter.of(record.offset, letter))
    return out


def count_by_reason(letters: Iterable[Letter]) -> list[ReasonCount]:
    """Letters grouped by stage, error type and normalised reason (see ``normalise_reason``),
    the largest group first."""
    counts: Counter[tuple[str, str, str]] = Counter()
    examples: dict[tuple[str, str, str], str] = {}
    for letter in letters:
        key = (letter.stage, letter.error, normalise_reason(letter.reason))
        counts[key] += 1
        examples.setdefault(key, letter.reason)
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return [ReasonCount(stage, error, reason, n, examples[(stage, error, reason)]) for (stage, error, reason), n in ranked]


def select(letters: Iterable[Letter], *, stage: str | None = None, reason: str | None = None) -> list[Letter]:
    """The letters of one stage and/or whose error type or reason holds ``reason`` (any case)."""
    needle = (reason or "").lower()
    return [
        letter
        for letter in letters
        if (stage is None or letter.stage == stage)
        and (not needle or needle in letter.reason.lower() or needle in letter.error.lower())
    ]


def dead_letters_json(letters: list[Letter], limit: int | None = None) -> dict[str, Any]:
    """``{"count", "by_reason", "letters"}``: counts over every letter, the listing capped at ``limit``."""
    shown = letters if limit is None else letters[:limit]
    return {
        "count": len(letters),
        "by_reason": [vars(group) for group in count_by_reason(letters)],
        "letters": [vars(letter) for letter in shown],
    }


def render_dead_letters(run_id: str, letters: list[Letter], limit: int | None = None) -> str:
    """A plain-text listing: one line per letter (capped at ``limit``), then the counts by reason."""
    if not letters:
        return f"run {run_id}: no dead letters"
    shown = letters if limit is None else letters[:limit]
    lines = [f"run {run_id}: {len(letters)} dead letters" + (f" (first {len(shown)} listed)" if len(shown) < len(letters) else "")]
    lines.append(f"{'stage':<9} {'partition':>9} {'offset':>8}  {'error':<28} reason | payload")
    for letter in shown:
        lines.append(
            f"{letter.stage:<9} {letter.partition:>9} {letter.offset:>8}  {letter.error:<28} "
            f"{_one_line(letter.reason, 100)} | {letter.excerpt}"
        )
    lines.append("by reason:")
    for group in count_by_reason(letters):
        lines.append(f"{group.count:>6}  [{group.stage}] {group.error}: {_one_line(group.reason, 120)}")
    return "\n".join(lines)


def _one_line(text: str, width: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"
