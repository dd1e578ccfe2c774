"""Why a ``read_committed`` reader gets nothing from a partition, asked of the broker.

A reader that waits cannot tell by itself whether nothing was written, whether records sit in
a transaction still open (read_committed readers stop at the last stable offset), or whether
its client holds back records the broker has committed. The broker's two ends of the partition
tell them apart, so a stall names its cause, and the one a new client cures can be cured.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from pipeline.core.errors import SpecstreamError
from pipeline.core.topics import Admin

__all__ = ("Wait", "PartitionWait", "ask_broker", "end_hanging")

logger = logging.getLogger(__name__)


class Wait(enum.Enum):
    """The three causes a reader cannot tell apart by itself."""

    NOTHING_WRITTEN = "nothing written"
    OPEN_TRANSACTION = "records held back by a transaction still open"
    UNDELIVERED = "committed records the client has not delivered"


@dataclass(frozen=True)
class PartitionWait:
    """A reader's position against the partition's last stable offset and log end."""

    at: int
    stable_end: int
    end: int

    @property
    def cause(self) -> Wait:
        if self.stable_end > self.at:
            return Wait.UNDELIVERED
        return Wait.OPEN_TRANSACTION if self.end > self.at else Wait.NOTHING_WRITTEN

    @property
    def reason(self) -> str:
        """The cause, said so that an operator can act on it."""
        if self.cause is Wait.UNDELIVERED:
            return f"the broker holds committed records up to {self.stable_end - 1}; the reader is at {self.at}"
        if self.cause is Wait.OPEN_TRANSACTION:
            return (f"records {self.at}..{self.end - 1} are in a transaction still open (a generator mid-batch, "
                    "or one that died: the broker aborts it after broker.transaction_timeout_ms)")  # fmt: skip
        return f"nothing written after offset {self.at}; is a generator running?"


def ask_broker(admin: Admin, topic: str, partition: int, at: int) -> PartitionWait:
    """The partition's two ends now, against a reader at ``at`` (its client's own position)."""
    stable = admin.end_offsets(topic, [partition])[partition]
    end = admin.end_offsets(topic, [partition], committed_only=False)[partition]
    return PartitionWait(at, stable, end)


def end_hanging(admin: Admin, topics: Iterable[str], idle_s: float) -> None:
    """End, as its coordinator ended it, what a coordinator left open on ``topics`` and on the
    group offsets: a reader, or a stable offsets fetch, that waits on an open transaction may wait
    on one that nobody will ever end."""
    topics = list(topics)
    try:
        ended = admin.end_hanging_transactions(topics, idle_s)
    except SpecstreamError as exc:  # e.g. no right to describe transactions or to write their markers
        where = ", ".join([*topics, "the group offsets"])
        logger.warning("open transactions on %s not checked for one its coordinator ended: %s (an administrator "
                       "lists those with `kafka-transactions find-hanging` and ends them with its `abort`)", where, exc)
        return
    for line in ended:
        logger.warning("%s", line)
