"""``specstream status`` and ``specstream audit``: read a run from its topics, write nothing."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from pipeline.app.cli_common import BootstrapOption, OptionalConfig, RunIdOption, load, run_transport

__all__ = ("status", "audit")


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
