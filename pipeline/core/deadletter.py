"""Dead letters: a record that cannot be used, kept with the reason, never silently dropped; and
the policy that stops a stage whose input is systematically wrong."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.core.errors import StreamError
from pipeline.core.messages import DeadLetter, encode, now
from pipeline.core.topics import Producer, Record, RunTopics

__all__ = ("PAYLOAD_LIMIT", "dead_letter", "send_dead_letter", "stage_of", "DeadLetterLimits", "DeadLetterPolicy", "DeadLetterLimitExceeded")

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


def send_dead_letter(
    producer: Producer, run_id: str, record: Record, error: Exception, sample_id: str | None = None
) -> None:
    """Send a trainer-side dead letter to the run's DLQ, keyed by the record's place: a resume (or a
    later epoch) that letters the same record again writes the same key, and ``audit`` counts it once."""
    key = f"{record.topic}:{record.partition}:{record.offset}".encode()
    letter = dead_letter(run_id, record, error, sample_id)
    producer.send(RunTopics(run_id).dlq, encode(letter), partition=0, key=key)


def stage_of(source_topic: str) -> str:
    """The stage that dead-lettered a record, from where the record was read."""
    if source_topic.startswith("source:"):
        return "source"
    if source_topic.endswith(".prompts"):
        return "generate"
    if source_topic.endswith(".samples"):
        return "train"
    return source_topic


class DeadLetterLimitExceeded(StreamError):
    """The input is systematically wrong: a stage stops instead of dead-lettering everything."""


@dataclass(frozen=True)
class DeadLetterLimits:
    """How much bad input a stage tolerates (the defaults of the run config's ``dead_letters``)."""

    max_invalid_ratio: float = 0.5
    max_consecutive: int = 100
    min_records: int = 20


@dataclass
class DeadLetterPolicy:
    """Arroyo's ``DlqLimit``: how much bad input a stage tolerates before it stops.

    A stage reports every record it takes as valid or invalid. It stops with
    ``DeadLetterLimitExceeded`` when ``max_consecutive`` invalid records arrive in a row, or when
    the invalid share exceeds ``max_invalid_ratio`` once at least ``min_records`` were seen: a
    run whose input is wrong fails loudly instead of "succeeding" on nothing.
    """

    stage: str
    limits: DeadLetterLimits = DeadLetterLimits()
    valid: int = 0
    invalid: int = 0
    consecutive: int = 0

    def record(self, *, valid: bool, reason: str = "") -> None:
        """Count one record; raise when the limits are crossed (naming the last reason)."""
        if valid:
            self.valid += 1
            self.consecutive = 0
            return
        self.invalid += 1
        self.consecutive += 1
        seen = self.valid + self.invalid
        limits = self.limits
        if self.consecutive >= limits.max_consecutive:
            raise DeadLetterLimitExceeded(
                f"{self.stage}: {self.consecutive} invalid records in a row (last: {reason}); the input "
                "is systematically wrong. See the dead letters (`specstream dlq`), fix the input or the "
                "setting, or raise dead_letters.max_consecutive"
            )
        if seen >= limits.min_records and self.invalid / seen > limits.max_invalid_ratio:
            raise DeadLetterLimitExceeded(
                f"{self.stage}: {self.invalid} of {seen} records invalid (last: {reason}), above "
                f"dead_letters.max_invalid_ratio {limits.max_invalid_ratio}. See the DLQ, fix the input, "
                "or raise the ratio"
            )
