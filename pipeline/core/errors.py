"""Typed errors: every failure a user or an operator can act on has its own class.

Workers catch the data-plane errors (``DecodeError``, ``PayloadError``) per record and route
the record to the dead-letter queue with the reason; everything else stops the process.
"""

from __future__ import annotations

__all__ = (
    "SpecstreamError",
    "ConfigError",
    "OptionError",
    "DecodeError",
    "ConversationError",
    "ForeignRecord",
    "PayloadError",
    "IntegrityError",
    "ConfinementError",
    "BrokerError",
    "StreamError",
    "RunMismatchError",
    "PartitionsClaimedError",
    "CaptureContractError",
    "NonFiniteLossError",
)


class SpecstreamError(Exception):
    """Root of every error this package raises on purpose."""


class ConfigError(SpecstreamError):
    """A setting is missing or wrong; the message names the key and the fix."""

    subject = "config"

    def __init__(self, key: str, problem: str, fix: str = "") -> None:
        self.key = key
        self.problem = problem
        self.fix = fix
        message = f"{self.subject} `{key}`: {problem}"
        if fix:
            message += f" (fix: {fix})"
        super().__init__(message)


class OptionError(ConfigError):
    """A command-line option is wrong (``--out``, ``--checkpoint``...); the message names it and the fix."""

    subject = "option"


class DecodeError(SpecstreamError):
    """A record is not a valid message of a known schema; it goes to the DLQ with this reason."""


class ConversationError(DecodeError):
    """A conversation record that cannot become a prompt.

    ``kind`` classifies the defect (see :class:`MalformedLine`); ``url`` and ``line`` name the
    place when the record came from a file.
    """

    def __init__(self, kind: str, reason: str, *, url: str | None = None, line: int | None = None) -> None:
        self.kind = kind
        self.reason = reason
        self.url = url
        self.line = line
        where = f"{url}:{line}: " if url is not None else ""
        super().__init__(f"{where}{kind}: {reason}")


class ForeignRecord(DecodeError):
    """A record that is not the run's own output (another producer's, or a stray): it goes to
    the DLQ with this reason and never counts against an end-of-stream marker."""


class PayloadError(SpecstreamError):
    """A feature file cannot be trusted for its ref; the ref goes to the DLQ with this reason."""


class IntegrityError(PayloadError):
    """The file is missing, or its size, checksum or header disagrees with its ref."""


class ConfinementError(PayloadError):
    """The ref's uri resolves outside the run's storage root: refused, never opened."""


class BrokerError(SpecstreamError):
    """The Kafka broker cannot be reached, started or installed."""


class StreamError(SpecstreamError):
    """The stream is incomplete or inconsistent (count mismatch, failed end-of-stream)."""


class RunMismatchError(SpecstreamError):
    """A topic, manifest or checkpoint belongs to another run or another configuration."""


class PartitionsClaimedError(SpecstreamError):
    """A fixed-partition generator asked for partitions another live generator holds (or lost
    its own claim to one); the message names the other worker, its partitions and the fix."""


class CaptureContractError(SpecstreamError):
    """A target backend's capture broke the EAGLE3 contract (layer ids, widths, lengths)."""


class NonFiniteLossError(SpecstreamError):
    """The loss became NaN or infinite: the run stops at the last good checkpoint instead of
    training on garbage."""
