"""Evaluation on the held-out set: the training loss and metrics, without gradients, on rank 0.

The eval set is the run's eval sub-run (``data.eval_path``, captured once by the generators).
:class:`Evaluator` loads it once (a bounded wait through ``load``, which the runner wires to the
eval samples topic; None: not there in time, evaluation is skipped with a warning, training goes
on): ahead of need on a thread from the start of training (``load_ahead``, so the first
evaluation does not stall every rank while it reads the set), else at its first evaluation.
It collates the set once on the CPU, and every
``eval_interval`` steps and at the end runs the draft in eval mode under ``torch.no_grad`` over
it with the training's own TTT loss (:func:`evaluate`): weighted loss, ``ploss_k``, ``acc_k``,
acceptance rate and simulated acceptance length. Each evaluation is one row of ``eval.jsonl``
(beside ``metrics.jsonl``, so its step dedup is untouched) and one call of ``on_eval(step,
figures)`` (trackers: TensorBoard, W&B...).

Only rank 0 evaluates, between two steps: the other ranks wait at the next step's vote, so an
evaluation (and the first one's wait for the eval set) must stay well inside
``train.collective_timeout_s``; the runner caps the wait at half of it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch

from pipeline.core.background import in_background
from pipeline.train.collate import Batch, collate
from pipeline.train.draft import Eagle3Draft
from pipeline.train.ttt import TTTStats, compute_teacher, ttt_loss

__all__ = ("EvalFigures", "OnEval", "Evaluator", "evaluate", "figures", "eval_line")

logger = logging.getLogger(__name__)

#: Flat eval scalars: ``loss``, ``ploss_k``, ``acc_k``, ``acceptance_rate_k``, ``acceptance_length``.
EvalFigures = dict[str, float]
#: Receives every evaluation: ``(step, figures)``.
OnEval = Callable[[int, EvalFigures], None]
#: Loads the eval set's samples (tensor dicts, CPU), waiting bounded; None: not available.
LoadEvalSet = Callable[[], Sequence[Mapping[str, torch.Tensor]] | None]


def evaluate(
    draft: Eagle3Draft,
    lm_head: torch.Tensor,
    batches: Iterable[Batch],
    *,
    ttt_steps: int,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
) -> TTTStats | None:
    """The TTT statistics of ``draft`` over ``batches`` (summed), in eval mode, without gradients;
    None for no batches. The draft goes back to the mode it was in."""
    was_training = draft.training
    draft.eval()
    total: TTTStats | None = None
    try:
        with torch.no_grad():
            for cpu_batch in batches:
                batch = cpu_batch.to(device)
                teacher = compute_teacher(batch.final_hidden_states, lm_head, draft.t2d, num_steps=ttt_steps)
                with autocast():
                    stats = ttt_loss(draft, batch, teacher, num_steps=ttt_steps).stats
                total = stats if total is None else total + stats
    finally:
        draft.train(was_training)
    return total


def figures(stats: TTTStats, decay: float) -> EvalFigures:
    """Flat scalars of one evaluation (the names trackers log under an ``eval/`` prefix)."""
    out: EvalFigures = {"loss": stats.weighted_loss(decay), "acceptance_length": stats.acceptance_length()}
    columns = {"ploss": stats.ploss(), "acc": stats.acc(), "acceptance_rate": stats.acceptance_rate()}
    for name, values in columns.items():
        out.update({f"{name}_{k}": float(v) for k, v in enumerate(values)})
    return out


def eval_line(step: int, values: EvalFigures) -> str:
    """The summary's eval line: ``eval (step N): loss 2.31, acc0 0.41, accept length 1.80``."""
    return (
        f"eval (step {step}): loss {values['loss']:.4f}, acc0 {values.get('acc_0', 0.0):.3f}, "
        f"accept length {values['acceptance_length']:.2f}"
    )


class Evaluator:
    """Rank 0's periodic evaluation on the held-out set (see the module docstring)."""

    def __init__(
        self,
        load: LoadEvalSet,
        *,
        interval: int,
        batch_size: int,
        ttt_steps: int,
        decay: float,
        max_length: int | None = None,
        path: str | None = None,
        on_eval: OnEval | None = None,
        load_ahead: LoadEvalSet | None = None,
        ahead_wait_s: float = 0.0,
    ) -> None:
        if interval < 1:
            raise ValueError(f"eval interval must be at least 1, got {interval}")
        self._load = load
        self.interval = interval
        self.batch_size = batch_size
        self.ttt_steps = ttt_steps
        self.decay = decay
        self.max_length = max_length
        self.path = path
        self.on_eval = on_eval
        self._batches: list[Batch] | None = None
        self._unavailable = False
        self._load_ahead, self._ahead_wait_s = load_ahead, ahead_wait_s
        self._ahead: Future[Sequence[Mapping[str, torch.Tensor]] | None] | None = None
        self.samples = 0
        self.last: tuple[int, EvalFigures] | None = None  # the latest evaluation: (step, figures)

    def due(self, step: int) -> bool:
        return step % self.interval == 0

    def start(self) -> None:
        """Start loading the eval set ahead of its first use, on a thread (with ``load_ahead``)."""
        if self._load_ahead is not None and self._ahead is None:
            self._ahead = in_background("eval-set-ahead", self._load_ahead)

    def _samples(self) -> Sequence[Mapping[str, torch.Tensor]] | None:
        """What the load ahead found (waiting for it at most ``ahead_wait_s``: as long as a load
        here would); loaded now when it found nothing (the generators may have started later)."""
        if self._ahead is None:
            return self._load()
        try:
            found = self._ahead.result(timeout=self._ahead_wait_s)
        except Exception:  # noqa: BLE001 - loaded again below, which says why if it fails again
            if not self._ahead.done():  # still inside its bounded wait: as long as a load here would be
                logger.warning("eval set: not loaded after %.0f s", self._ahead_wait_s)
                return None
            logger.debug("loading the eval set ahead failed", exc_info=True)
            found = None
        return found or self._load()

    def _ready(self) -> list[Batch] | None:
        """The eval batches (collated once, CPU), loaded on first use; None: no eval set."""
        if self._batches is None and not self._unavailable:
            samples = self._samples()
            self._ahead = None  # collated below: one copy kept
            if not samples:
                self._unavailable = True
                logger.warning("no eval set to evaluate on: evaluation is skipped for this run")
                return None
            self.samples = len(samples)
            self._batches = [
                collate(samples[i : i + self.batch_size], max_length=self.max_length)
                for i in range(0, len(samples), self.batch_size)
            ]
            logger.info("eval set: %d samples in %d batches", self.samples, len(self._batches))
        return self._batches

    def run(
        self,
        step: int,
        draft: Eagle3Draft,
        lm_head: torch.Tensor,
        *,
        device: torch.device,
        autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
    ) -> EvalFigures | None:
        """Evaluate at ``step`` (once per step: a second call returns the first's figures)."""
        if self.last is not None and self.last[0] == step:
            return self.last[1]
        batches = self._ready()
        if batches is None:
            return None
        started = time.perf_counter()
        stats = evaluate(draft, lm_head, batches, ttt_steps=self.ttt_steps, device=device, autocast=autocast)
        assert stats is not None
        values = figures(stats, self.decay)
        self.last = (step, values)
        self._write(step, stats, values, time.perf_counter() - started)
        if self.on_eval is not None:
            try:
                self.on_eval(step, values)
            except Exception:  # a tracker must never stop training
                logger.warning("the eval callback failed at step %d", step, exc_info=True)
        return values

    def _write(self, step: int, stats: TTTStats, values: EvalFigures, took_s: float) -> None:
        logger.info("%s in %.2f s", eval_line(step, values), took_s)
        if self.path is None:
            return
        row = {
            "step": step, "split": "eval", "samples": self.samples, "loss": values["loss"],
            "ploss": stats.ploss(), "acc": stats.acc(), "acceptance_rate": stats.acceptance_rate(),
            "acceptance_length": values["acceptance_length"], "eval_s": took_s, "time": time.time(),
        }  # fmt: skip
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:  # appending: a resumed run continues the file
            f.write(json.dumps(row) + "\n")
