"""``specstream topics apply``: create or update a run's topics from its config (platform teams)."""

from __future__ import annotations

import typer

from pipeline.app.cli_common import BootstrapOption, ConfigOption, broker_address, load
from pipeline.core.errors import OptionError

__all__ = ("topics_app",)

topics_app = typer.Typer(help="A run's Kafka topics: replicas, retention, compaction.", no_args_is_help=True)


@topics_app.command("apply")
def topics_apply(config: ConfigOption, bootstrap: BootstrapOption = None) -> None:
    """Create the run's missing topics and set the configs of existing ones to the config's
    `topics` section (idempotent); print one line per change."""
    from pipeline.app.settings import kafka_settings  # lazy: start-up, torch, through the stage dataclasses
    from pipeline.app.topics_apply import apply_run_topics  # lazy: start-up, kafka-python
    from pipeline.transport.kafka import KafkaAdmin  # lazy: start-up, kafka-python

    cfg = load(config)
    address, origin = broker_address(bootstrap, cfg.broker.bootstrap_servers)
    if address == "memory":
        raise OptionError("broker.bootstrap_servers", "is `memory`: it has no topics to apply", "point it at Kafka")
    with KafkaAdmin(kafka_settings(cfg, address, origin=origin)) as admin:
        lines = apply_run_topics(admin, cfg)
    for line in lines:
        typer.echo(line)
    typer.echo(f"run {cfg.run_id}: {len(lines)} change(s)" if lines else f"run {cfg.run_id}: topics already as configured")
