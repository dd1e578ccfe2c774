"""``specstream generate``: one generator worker, from the run config or from a few flags."""

from __future__ import annotations

import logging
import threading
from dataclasses import replace
from typing import Any

from pipeline.app.config import RunConfig
from pipeline.app.config_file import parse_config
from pipeline.app.manifest import await_run
from pipeline.app.preflight import check_broker, check_local
from pipeline.app.runtime import build_online_run, target_backend
from pipeline.app.settings import generator_settings, kafka_settings
from pipeline.generate.worker import GeneratorWorker
from pipeline.storage import FeatureStore

__all__ = ("configured_generator", "ad_hoc_generator")

logger = logging.getLogger(__name__)


def configured_generator(
    cfg: RunConfig, worker_id: str, partitions: list[int] | None, stop: threading.Event | None = None
) -> GeneratorWorker:
    """A worker of a claimed run: checked, and refused when the run has another configuration.
    Started before the source, it waits (``generate.wait_for_source_s``) for the run's claim."""
    check_local(cfg, ("generate",))
    online = build_online_run(cfg)
    check_broker(online.transport)
    key = "generate.wait_for_source_s"
    await_run(online.transport, cfg, timeout_s=cfg.generate.wait_for_source_s, key=key, stop=stop, say=logger.warning)
    return online.generator(worker_id, partitions)  # stopped while waiting: its run() ends at once


def ad_hoc_generator(
    run_id: str,
    storage: str,
    bootstrap: str,
    worker_id: str,
    partitions: list[int] | None,
    overrides: dict[str, dict[str, Any]],
    *,
    hidden_size: int,
    origin: str,
) -> GeneratorWorker:
    """A bare worker without backpressure (the data plane alone: tests, benchmarks).

    ``overrides`` are config sections; None values take the ``RunConfig`` defaults; ``origin``
    says where ``bootstrap`` came from.
    """
    raw: dict[str, Any] = {
        "run_id": run_id,
        "storage": {"root": storage},
        "data": {"path": "-"},  # the prompts are already on the topic: a generator reads no data file
        **{section: {k: v for k, v in values.items() if v is not None} for section, values in overrides.items()},
    }
    raw["broker"] = {**raw.get("broker", {}), "bootstrap_servers": bootstrap}
    cfg = parse_config(raw, source="generate flags")
    settings = replace(generator_settings(cfg, worker_id, partitions), backpressure=None, trainer=None)
    return GeneratorWorker(
        kafka_settings(cfg, bootstrap, origin=origin),
        FeatureStore(storage, run_id),
        target_backend(cfg, synthetic_hidden_size=hidden_size),
        settings,
    )
