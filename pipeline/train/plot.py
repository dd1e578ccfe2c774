"""The end-of-run picture: loss and simulated acceptance length per step, as a PNG.

Headless (matplotlib's Agg backend): it runs on training nodes without a display.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.train.metrics import read_metrics

__all__ = ("plot_curves", "plot_metrics_file")

logger = logging.getLogger(__name__)


def plot_curves(rows: Sequence[dict[str, Any]], path: str | Path, *, title: str = "") -> Path | None:
    """Two panels: weighted TTT loss (and ploss_0), simulated acceptance length. None if no rows."""
    if not rows:
        logger.info("no training steps: no curves to plot")
        return None
    import matplotlib  # lazy: matplotlib is optional; its backend must be chosen before pyplot

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt  # lazy: matplotlib is optional; after the backend is chosen

    steps = [r["step"] for r in rows]
    fig, (ax_loss, ax_tau) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    ax_loss.plot(steps, [r["loss"] for r in rows], label="weighted loss")
    ax_loss.plot(steps, [r["ploss"][0] for r in rows], label="ploss[0]", alpha=0.7)
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_tau.plot(steps, [r["acceptance_length"] for r in rows], color="tab:green", label="simulated")
    ax_tau.plot(steps, [r["acc"][0] for r in rows], color="tab:orange", alpha=0.7, label="acc[0]")
    ax_tau.set_xlabel("optimizer step")
    ax_tau.set_ylabel("acceptance length / accuracy")
    ax_tau.legend()
    ax_tau.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_metrics_file(metrics_path: str | Path, png_path: str | Path, *, title: str = "") -> Path | None:
    """Plot a run's metrics JSONL (a resumed run's superseded rows dropped) as a PNG."""
    return plot_curves(read_metrics(metrics_path), png_path, title=title)
