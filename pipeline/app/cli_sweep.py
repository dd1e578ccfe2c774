"""``specstream sweep``: remove the feature files of aborted attempts (see :mod:`pipeline.app.sweep`)."""

from __future__ import annotations

from typing import Annotated

import typer

from pipeline.app.cli_common import BootstrapOption, ConfigOption, load, run_transport

__all__ = ("sweep",)

# Far above a transaction's life (broker.transaction_timeout_ms, a ridden-out broker outage): a
# file this old whose ref is not committed belongs to an attempt that can no longer commit.
_GRACE_S = 3600.0


def sweep(
    config: ConfigOption,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Count what would be removed; remove nothing.")
    ] = False,
    grace_s: Annotated[
        float,
        typer.Option(
            "--grace-s", min=0, help="Leave files younger than this (an open transaction may own them)."
        ),
    ] = _GRACE_S,
    bootstrap: BootstrapOption = None,
) -> None:
    """Delete the run's feature files that no committed ref names (orphans of aborted attempts).

    Reads the samples topic read_committed; a file younger than --grace-s is left alone, so a
    generator's attempt still in flight never loses its file. Safe while the run goes on.
    """
    from pipeline.app.sweep import sweep_run  # lazy: start-up, kafka-python and fsspec
    from pipeline.storage import FeatureStore  # lazy: start-up, fsspec

    cfg = load(config)
    run_id, transport = run_transport(None, config, bootstrap)
    store = FeatureStore(cfg.storage.root, run_id, storage_options=dict(cfg.storage.options))
    typer.echo(sweep_run(transport, store, grace_s=grace_s, dry_run=dry_run).line())
