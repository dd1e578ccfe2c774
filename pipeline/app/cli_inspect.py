"""``specstream status``, ``audit`` and ``dlq``: read a run from its topics, write nothing."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from pipeline.app.cli_common import BootstrapOption, OptionalConfig, RunIdOption, load, run_transport
from pipeline.core.errors import OptionError

__all__ = ("status", "audit", "dlq")


def status(run_id: RunIdOption = None, config: OptionalConfig = None, bootstrap: BootstrapOption = None) -> None:
    """Per partition: produced, dropped, consumed, lag and end-of-stream state; DLQ; samples/s."""
    from pipeline.app.status import render_status, run_status  # lazy: start-up, kafka-python

    typer.echo(render_status(run_status(*run_transport(run_id, config, bootstrap)[::-1])))


def audit(
    run_id: RunIdOption = None,
    config: OptionalConfig = None,
    bootstrap: BootstrapOption = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the counts as JSON.")] = False,
) -> None:
    """Prove from the topics that nothing was lost or repeated; exit 1 if something was."""
    from pipeline.app.audit import audit_run, render_audit  # lazy: start-up, kafka-python

    name, transport = run_transport(run_id, config, bootstrap)
    store = None
    if config is not None:
        from pipeline.storage import FeatureStore  # lazy: start-up, fsspec

        cfg = load(config)
        store = FeatureStore(cfg.storage.root, name, storage_options=dict(cfg.storage.options))
    report = audit_run(transport, name, store=store)
    typer.echo(json.dumps(report.to_json(), indent=2) if json_out else render_audit(report))
    if not report.ok:
        raise typer.Exit(1)


def dlq(
    run_id: RunIdOption = None,
    config: OptionalConfig = None,
    bootstrap: BootstrapOption = None,
    stage: Annotated[
        Optional[str], typer.Option(help="Only this stage's letters: source, generate or train.")
    ] = None,
    reason: Annotated[
        Optional[str], typer.Option(help="Only letters whose reason or error type holds this (any case).")
    ] = None,
    limit: Annotated[Optional[int], typer.Option(min=0, help="List at most this many (the counts cover all).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print count, by_reason and letters as JSON.")] = False,
) -> None:
    """The run's dead letters: stage, partition, offset, error, reason, payload excerpt; counts by reason."""
    from pipeline.app.deadletters import (  # lazy: start-up, kafka-python
        STAGES,
        dead_letters_json,
        read_dead_letters,
        render_dead_letters,
        select,
    )

    if stage is not None and stage not in STAGES:
        raise OptionError("--stage", f"is {stage!r}", f"use one of {', '.join(STAGES)}")
    name, transport = run_transport(run_id, config, bootstrap)
    letters = select(read_dead_letters(transport, name), stage=stage, reason=reason)
    typer.echo(json.dumps(dead_letters_json(letters, limit), indent=2) if json_out else render_dead_letters(name, letters, limit))
