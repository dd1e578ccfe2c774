"""The ``dead_letters`` section of the run config: when bad input stops a stage.

Kept apart from :mod:`pipeline.app.config` (at its size cap): every stage's dead-letter policy
(:class:`pipeline.core.deadletter.DeadLetterPolicy`) reads these limits, nothing else does.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from pipeline.core.deadletter import DeadLetterLimits

__all__ = ("DeadLetterSection",)


class DeadLetterSection(BaseModel):
    """How much bad input a stage tolerates before it stops (Arroyo's DLQ limit)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_invalid_ratio: float = Field(
        default=DeadLetterLimits.max_invalid_ratio, gt=0, le=1,
        description="stop a stage when more than this share of its records is dead-lettered",
    )  # fmt: skip
    max_consecutive: int = Field(
        default=DeadLetterLimits.max_consecutive, gt=0, description="stop a stage after this many bad records in a row"
    )
    min_records: int = Field(
        default=DeadLetterLimits.min_records, gt=0, description="records a stage takes before the ratio applies"
    )

    def limits(self) -> DeadLetterLimits:
        """The stages' own form of these settings."""
        return DeadLetterLimits(self.max_invalid_ratio, self.max_consecutive, self.min_records)
