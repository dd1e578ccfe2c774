"""The ``topics`` section of the run config: how the run's topics are replicated and retained.

Kept apart from :mod:`pipeline.app.config` because it is the platform's concern, not the
training's: nothing here is in the run's fingerprint. The defaults are what a run on one broker
needs (replicas and ``min.insync.replicas`` as the broker's defaults, every topic kept); a
production cluster sets ``replication_factor: 3`` and ``min_insync_replicas: 2`` so one broker
may fail without losing an acknowledged record. ``claim_run`` creates missing topics this way and
``specstream topics apply --config FILE`` also brings existing topics' configs to it.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.core.errors import ConfigError
from pipeline.core.topic_plan import TopicPolicy
from pipeline.core.topics import MAX_RECORD_BYTES

__all__ = ("TopicsSection",)

_RETENTION = "Kafka's `retention.{unit}` ({what}): -1 keeps everything (replay, more epochs and `audit` read it back)"


class TopicsSection(BaseModel):
    """Replicas, durability, retention and record size of the run's topics."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    replication_factor: int | None = Field(
        default=None, gt=0,
        description="replicas of every run topic (production: 3); null: the broker's `default.replication.factor`",
    )  # fmt: skip
    min_insync_replicas: int | None = Field(
        default=None, gt=0,
        description="replicas that must have a record before it is acknowledged (production: 2, with 3 replicas); "
        "null: the broker's default",
    )  # fmt: skip
    max_message_bytes: int = Field(
        default=MAX_RECORD_BYTES, ge=1024 * 1024, le=MAX_RECORD_BYTES,
        description="largest record a run topic takes (`max.message.bytes`); refs are ~1 KB, long prompts more",
    )  # fmt: skip
    samples_retention_ms: int = Field(
        default=-1, ge=-1, description=_RETENTION.format(unit="ms", what="sample refs, per topic")
    )
    samples_retention_bytes: int = Field(
        default=-1, ge=-1, description=_RETENTION.format(unit="bytes", what="sample refs, per partition")
    )
    prompts_retention_ms: int = Field(
        default=-1, ge=-1, description=_RETENTION.format(unit="ms", what="prompts; keep longer than generation lags")
    )
    prompts_retention_bytes: int = Field(
        default=-1, ge=-1, description=_RETENTION.format(unit="bytes", what="prompts, per partition")
    )

    @model_validator(mode="after")
    def _durable(self) -> TopicsSection:
        rf, isr = self.replication_factor, self.min_insync_replicas
        if rf is not None and isr is not None and isr > rf:
            raise ConfigError(
                "topics.min_insync_replicas",
                f"{isr} exceeds replication_factor {rf}: every acknowledged write would fail",
                f"set it to at most {rf} (production: replication_factor 3, min_insync_replicas 2)",
            )
        for kind in ("samples", "prompts"):
            for unit in ("ms", "bytes"):
                if getattr(self, f"{kind}_retention_{unit}") == 0:
                    raise ConfigError(f"topics.{kind}_retention_{unit}", "is 0: Kafka would delete records at once",
                                      "use -1 (keep) or a positive value")  # fmt: skip
        return self

    def policy(self) -> TopicPolicy:
        """The Kafka-agnostic form the admin clients take."""
        return TopicPolicy(**self.model_dump())
