"""``specstream topics apply`` and ``delete``: a run's topics from its config, created, updated or removed."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from pipeline.app.cli_common import BootstrapOption, ConfigOption, broker_address, load
from pipeline.core.errors import OptionError

if TYPE_CHECKING:
    from pipeline.app.config import RunConfig
    from pipeline.transport.kafka import KafkaSettings

__all__ = ("topics_app",)

topics_app = typer.Typer(help="A run's Kafka topics: replicas, retention, compaction.", no_args_is_help=True)


@topics_app.command("apply")
def topics_apply(config: ConfigOption, bootstrap: BootstrapOption = None) -> None:
    """Create the run's missing topics and set the configs of existing ones to the config's
    `topics` section (idempotent); print one line per change."""
    from pipeline.app.topics_apply import apply_run_topics  # lazy: start-up, kafka-python
    from pipeline.transport.kafka import KafkaAdmin  # lazy: start-up, kafka-python

    cfg, settings = _on_kafka(config, bootstrap)
    with KafkaAdmin(settings) as admin:
        lines = apply_run_topics(admin, cfg)
    for line in lines:
        typer.echo(line)
    typer.echo(f"run {cfg.run_id}: {len(lines)} change(s)" if lines else f"run {cfg.run_id}: topics already as configured")


@topics_app.command("delete")
def topics_delete(
    config: ConfigOption,
    bootstrap: BootstrapOption = None,
    yes: bool = typer.Option(False, "--yes", help="Delete; without it, only list what would go."),
    force: bool = typer.Option(False, "--force", help="Delete even while processes of the run are alive."),
) -> None:
    """Delete the run's topics and consumer groups (its sub-runs' too); features on storage stay.

    Without `--yes` it lists them and deletes nothing. Refused while a process of the run is alive.
    Afterwards the run can no longer be replayed, audited or trained for more epochs."""
    from pipeline.app.topics_delete import delete_run_kafka_state, run_kafka_state  # lazy: start-up, kafka
    from pipeline.transport.kafka import KafkaAdmin  # lazy: start-up, kafka-python

    cfg, settings = _on_kafka(config, bootstrap)
    if yes:
        state = delete_run_kafka_state(settings, cfg, force=force)
    else:
        with KafkaAdmin(settings) as admin:
            state = run_kafka_state(admin, cfg)
    verb = "deleted" if yes else "would delete"
    for topic in state.topics:
        typer.echo(f"{verb} topic {topic}")
    for group in state.groups:
        typer.echo(f"{verb} group {group}")
    if not state.topics and not state.groups:
        typer.echo(f"run {cfg.run_id}: nothing on the broker")
    elif not yes:
        typer.echo(f"run {cfg.run_id}: nothing deleted (add --yes)")
    else:  # the checkpoints name the deleted topics' ids: a run resuming from them is refused
        typer.echo(f"run {cfg.run_id}: deleted; its features ({cfg.storage.root}) and checkpoints "
                   f"({cfg.train.output_dir}) stay: move or remove them before a new run under this id")  # fmt: skip


def _on_kafka(config: Path, bootstrap: str | None) -> tuple[RunConfig, KafkaSettings]:
    """The run's config and its Kafka broker (the in-process one has no topics to manage)."""
    from pipeline.app.settings import kafka_settings  # lazy: start-up, torch, through the stage dataclasses

    cfg = load(config)
    address, origin = broker_address(bootstrap, cfg.broker.bootstrap_servers)
    if address == "memory":
        raise OptionError("broker.bootstrap_servers", "is `memory`: it has no topics", "point it at Kafka")
    return cfg, kafka_settings(cfg, address, origin=origin)
