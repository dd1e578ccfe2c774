"""Dead letters: a record that cannot be used, kept with the reason, never silently dropped."""

from __future__ import annotations

from pipeline.core.messages import DeadLetter, now
from pipeline.core.topics import Record

__all__ = ("PAYLOAD_LIMIT", "dead_letter")

#: How much of a bad record's payload a dead letter keeps (the rest is marked truncated).
PAYLOAD_LIMIT = 64 * 1024


def dead_letter(run_id: str, record: Record, error: Exception, sample_id: str | None = None) -> DeadLetter:
    """A bad record as a dead letter: where it was, why it failed, and its (capped) payload."""
    payload = record.value or b""
    text = payload[:PAYLOAD_LIMIT].decode("utf-8", errors="replace")
    return DeadLetter(
        run_id=run_id,
        source_topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        error=type(error).__name__,
        reason=str(error) or type(error).__name__,
        payload=text,
        payload_truncated=len(payload) > PAYLOAD_LIMIT,
        sample_id=sample_id,
        created_at=now(),
    )
