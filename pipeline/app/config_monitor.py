"""The ``monitor`` section of the run config: how a run shows itself to its operator.

Kept apart from :mod:`pipeline.app.config` so the operator's knobs (heartbeats, Prometheus) do
not crowd the sections that change what is trained; nothing here is in the run's fingerprint.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = ("MonitorSection",)


class MonitorSection(BaseModel):
    """Heartbeats (what ``specstream status`` reads) and the Prometheus endpoint."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    heartbeat_interval_s: float | None = Field(
        default=5.0, gt=0, le=300,
        description="every process (source, generators, trainer ranks) publishes its state this often; "
        "`status` calls a process silent for 3 intervals stalled, and a waiting stage logs a line this often; "
        "null: no heartbeats (`status` then cannot tell a stalled run from a finished one)",
    )  # fmt: skip
    metrics_port: int | None = Field(
        default=None, ge=0, le=65535,
        description="serve Prometheus metrics on this port (`/metrics`); 0: any free port (logged); "
        "trainer rank r uses port + local rank; null: off (`--metrics-port` overrides)",
    )  # fmt: skip
