"""The end-of-run picture: loss, accuracy, acceptance length and learning rate per step, as a PNG.

Headless (matplotlib's Agg backend): it runs on training nodes without a display.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.train.metrics import read_metrics

__all__ = ("plot_curves", "curves_figure", "plot_metrics_file")

logger = logging.getLogger(__name__)


def plot_curves(rows: Sequence[dict[str, Any]], path: str | Path, *, title: str = "") -> Path | None:
    """Four panels (see :func:`curves_figure`) as a PNG at ``path``. None if no rows."""
    if not rows:
        logger.info("no training steps: no curves to plot")
        return None
    fig = curves_figure(rows, title=title)
    import matplotlib.pyplot as plt  # lazy: matplotlib is optional; curves_figure chose the backend

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(out, dpi=110)
    finally:
        plt.close(fig)
    return out


def curves_figure(rows: Sequence[dict[str, Any]], *, title: str = "") -> Any:
    """A matplotlib figure, one axis each: loss (weighted and per TTT step), accuracy per TTT
    step, simulated acceptance length and learning rate, all against the optimizer step."""
    import matplotlib  # lazy: matplotlib is optional; its backend must be chosen before pyplot

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt  # lazy: matplotlib is optional; after the backend is chosen

    steps = [r["step"] for r in rows]
    depth = max((len(r["ploss"]) for r in rows), default=0)
    fig, axes = plt.subplots(2, 2, figsize=(12, 7.5), sharex=True, constrained_layout=True)
    ax_loss, ax_acc, ax_tau, ax_lr = axes.flat
    ax_loss.plot(steps, [r["loss"] for r in rows], color="black", linewidth=1.8, label="weighted total")
    for i in range(depth):
        ax_loss.plot(steps, [_at(r["ploss"], i) for r in rows], alpha=0.75, linewidth=1, label=f"TTT step {i}")
        ax_acc.plot(steps, [_at(r["acc"], i) for r in rows], alpha=0.85, linewidth=1, label=f"TTT step {i}")
    ax_tau.plot(steps, [r["acceptance_length"] for r in rows], color="tab:green")
    ax_lr.plot(steps, [r.get("lr", float("nan")) for r in rows], color="tab:purple")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    panels = (
        (ax_loss, "Loss", "cross-entropy"),
        (ax_acc, "Top-1 accuracy per TTT step", "accuracy"),
        (ax_tau, "Simulated acceptance length", "tokens per target step"),
        (ax_lr, "Learning rate", "lr"),
    )
    for ax, name, unit in panels:
        ax.set_title(name)
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
    for ax in (ax_tau, ax_lr):
        ax.set_xlabel("optimizer step")
    if depth:
        ax_loss.legend(fontsize="small", ncol=2)
        ax_acc.legend(fontsize="small", ncol=2)
    ax_acc.set_ylim(-0.02, 1.02)
    if title:
        fig.suptitle(title)
    return fig


def _at(values: Sequence[float], i: int) -> float:
    """A TTT step's value, NaN (a gap in the line) where a row has fewer steps."""
    return values[i] if i < len(values) else float("nan")


def plot_metrics_file(metrics_path: str | Path, png_path: str | Path, *, title: str = "") -> Path | None:
    """Plot a run's metrics JSONL (a resumed run's superseded rows dropped) as a PNG."""
    return plot_curves(read_metrics(metrics_path), png_path, title=title)
