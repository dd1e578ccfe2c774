"""``specstream status``, ``audit`` and ``dlq``: read a run from its topics, write nothing."""

from __future__ import annotations

import json
import signal
import sys
import threading
from typing import Annotated, Optional

import typer

from pipeline.app.cli_common import BootstrapOption, GroupOption, OptionalConfig, RunIdOption, load, run_transport
from pipeline.core.errors import OptionError

__all__ = ("status", "audit", "dlq")


def status(
    run_id: RunIdOption = None,
    config: OptionalConfig = None,
    bootstrap: BootstrapOption = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print a machine-readable JSON object.")] = False,
    watch: Annotated[
        bool, typer.Option("--watch", "-w", help="Refresh until Ctrl-C (in place on a terminal).")
    ] = False,
    interval: Annotated[
        float, typer.Option("--interval", min=0.2, help="Seconds between refreshes (--watch).")
    ] = 2.0,
) -> None:
    """The run's state (running, stalled, finished, stopped, failed), each process from its heartbeat,
    per partition produced/dropped/consumed/lag and end of stream, prompts, samples/s, ETA, DLQ."""
    from pipeline.app.status import render_status, run_status  # lazy: start-up, kafka-python

    name, transport = run_transport(run_id, config, bootstrap)

    def show() -> str:
        current = run_status(transport, name)
        return json.dumps(current.to_json(), sort_keys=True) if json_out else render_status(current)

    if not watch:
        typer.echo(show())
        return
    # Ctrl-C sets a flag the loop checks, not a KeyboardInterrupt: raised inside kafka-python's
    # event loop (which catches BaseException) it was swallowed and --watch went on forever.
    stop = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        if sys.stdout.isatty() and not json_out:
            from rich.live import Live  # lazy: start-up, only for --watch on a terminal
            from rich.text import Text  # lazy: start-up, only for --watch on a terminal

            with Live(Text(show()), auto_refresh=False) as live:
                while not stop.wait(interval):
                    live.update(Text(show()), refresh=True)
            return
        while not stop.is_set():  # not a terminal (or --json): one view after another, line-oriented
            typer.echo(show() + ("" if json_out else "\n"), nl=True)
            sys.stdout.flush()
            stop.wait(interval)
    finally:
        signal.signal(signal.SIGINT, previous)


def audit(
    run_id: RunIdOption = None,
    config: OptionalConfig = None,
    bootstrap: BootstrapOption = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the counts as JSON.")] = False,
    group: GroupOption = None,
) -> None:
    """Prove from the topics that nothing was lost or repeated (by one trainer group's ledger with
    --group); exit 1 if something was."""
    from pipeline.app.audit import audit_run, render_audit  # lazy: start-up, kafka-python

    name, transport = run_transport(run_id, config, bootstrap)
    store = None
    if config is not None:
        from pipeline.storage import FeatureStore  # lazy: start-up, fsspec

        cfg = load(config)
        store = FeatureStore(cfg.storage.root, name, storage_options=dict(cfg.storage.options))
    report = audit_run(transport, name, store=store, group=group)
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
