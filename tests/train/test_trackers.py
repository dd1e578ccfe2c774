"""Rank 0's trackers on real training: TensorBoard event files read back with tensorboard's own
reader, a crashed attempt's points purged on resume, wandb refused when missing and isolated when
it fails, and the four-panel curves PNG."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import logging
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipeline.core.errors import ConfigError
from pipeline.train.distributed import DistContext
from pipeline.train.evaluate import Evaluator
from pipeline.train.metrics import read_metrics
from pipeline.train.model import ModelSpec, build_draft
from pipeline.train.plot import curves_figure, plot_curves
from pipeline.train.rng import seed_everything
from pipeline.train.trackers import TENSORBOARD_DIR
from tests.support import event_scalars
from pipeline.train.trainer import Trainer
from tests.train_support import MemorySource, loop_settings, sample_tensors, write_tiny_target, write_vocab

LENGTHS = [10 + (i * 7) % 9 for i in range(15)]  # 7 steps of 2 samples, 1 tail sample
#: SpecForge's names for what every step logs (TTT depth 2).
EXPECTED = {
    "train/loss", "train/lr", "train/grad_norm", "train/samples_per_s", "train/tokens_per_s",
    "train/data_wait_frac", "train/acceptance_length", "train/ploss_0", "train/ploss_1", "train/acc_0",
    "train/acc_1",
}  # fmt: skip


def metric_value(row: dict[str, Any], tag: str) -> float:
    """A metrics (or eval) JSONL row's value for a ``train/...`` (``eval/...``) tag, as TensorBoard
    stores it (float32)."""
    name = tag.partition("/")[2]
    base, _, index = name.rpartition("_")
    value = row[base][int(index)] if index.isdigit() and base in ("ploss", "acc", "acceptance_rate") else row[name]
    return float(np.float32(value))


@pytest.fixture(scope="module")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> ModelSpec:
    d = tmp_path_factory.mktemp("model")
    return ModelSpec(str(write_tiny_target(d / "target")), str(write_vocab(d / "vocab.safetensors")), (0, 1, 2))


def trainer(
    spec: ModelSpec, out: Path, *, fail_at: int | None = None, evaluator: Evaluator | None = None, **overrides: object
) -> Trainer:
    values: dict[str, object] = dict(
        checkpoint_dir=str(out / "checkpoints"), metrics_path=str(out / "metrics.jsonl"), report_to=("tensorboard",)
    )
    config = loop_settings(**{**values, **overrides})
    seed_everything(config.seed, deterministic=True)
    draft, lm_head, _ = build_draft(spec, seed=config.seed, device=torch.device("cpu"))
    return Trainer(
        config, draft=draft, lm_head=lm_head, dist=DistContext(), partitions=[0], num_partitions=1,
        open_source=lambda state: MemorySource("run", LENGTHS, state=state, fail_at=fail_at), evaluator=evaluator,
    )  # fmt: skip


def assert_events_match_metrics(out: Path, steps: list[int]) -> None:
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == steps
    scalars = event_scalars(out / TENSORBOARD_DIR)
    assert EXPECTED <= set(scalars), sorted(set(scalars))
    for tag in sorted(EXPECTED):
        assert [s for s, _ in scalars[tag]] == steps, tag  # one point per optimizer step, none twice
        assert [v for _, v in scalars[tag]] == [metric_value(r, tag) for r in rows], tag


def test_tensorboard_holds_every_steps_scalars_as_the_metrics_file(model_files: ModelSpec, tmp_path: Path) -> None:
    result = trainer(model_files, tmp_path).run()
    assert (result.reason, result.step) == ("end_of_stream", 7)
    assert_events_match_metrics(tmp_path, list(range(1, 8)))


def test_a_resumed_run_continues_its_curves_without_the_crashed_attempts_points(
    model_files: ModelSpec, tmp_path: Path
) -> None:
    with pytest.raises(RuntimeError, match="source failed at 10"):
        trainer(model_files, tmp_path, fail_at=10, save_interval=3, prefetch=1).run()
    crashed = [s for s, _ in event_scalars(tmp_path / TENSORBOARD_DIR)["train/loss"]]
    assert crashed[-1] > 3, f"the crashed attempt logged only {crashed}: nothing after its checkpoint to purge"
    result = trainer(model_files, tmp_path, save_interval=3).run()  # resumes from the step-3 checkpoint
    assert result.step == 7
    assert len(list((tmp_path / TENSORBOARD_DIR).glob("events.out.tfevents.*"))) == 2
    assert_events_match_metrics(tmp_path, list(range(1, 8)))


def test_evaluations_are_logged_as_eval_scalars_at_their_step(model_files: ModelSpec, tmp_path: Path) -> None:
    held_out = [sample_tensors(100 + i, 12) for i in range(3)]
    evaluator = Evaluator(
        lambda: held_out, interval=3, batch_size=2, ttt_steps=2, decay=0.8, max_length=32,
        path=str(tmp_path / "eval.jsonl"),
    )  # fmt: skip
    assert trainer(model_files, tmp_path, evaluator=evaluator).run().step == 7
    rows = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6, 7]  # every 3 steps and at the end
    scalars = event_scalars(tmp_path / TENSORBOARD_DIR)
    assert {"eval/loss", "eval/ploss_1", "eval/acc_0", "eval/acceptance_length"} <= set(scalars)
    for tag in ("eval/loss", "eval/ploss_1", "eval/acc_0", "eval/acceptance_length"):
        assert [s for s, _ in scalars[tag]] == [3, 6, 7], tag
        assert [v for _, v in scalars[tag]] == [metric_value(r, tag) for r in rows], tag


def test_report_to_nothing_writes_no_event_files(model_files: ModelSpec, tmp_path: Path) -> None:
    trainer(model_files, tmp_path, report_to=(), max_steps=2).run()
    assert (tmp_path / "metrics.jsonl").is_file() and not (tmp_path / TENSORBOARD_DIR).exists()


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_wandb_missing_is_a_config_error_at_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        loop_settings(checkpoint_dir=str(tmp_path), report_to=("tensorboard", "wandb"))
    message = str(info.value)
    assert "`train.report_to`" in message and "pip install wandb" in message and "remove wandb" in message
    with pytest.raises(ConfigError, match="unknown tracker 'mlflow'"):
        loop_settings(checkpoint_dir=str(tmp_path), report_to=("mlflow",))


class FakeWandb(types.ModuleType):
    """Stands in for the uninstalled ``wandb`` package: records what the tracker asks of it."""

    def __init__(self, *, fail_log_at: int | None = None) -> None:
        super().__init__("wandb")
        self.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
        self.init_kwargs: dict[str, Any] = {}
        self.logged: list[tuple[int, dict[str, float]]] = []
        self.finished = False
        self.fail_log_at = fail_log_at

    def init(self, **kwargs: Any) -> FakeWandb:
        self.init_kwargs = kwargs
        return self

    def log(self, values: dict[str, float], *, step: int) -> None:
        if step == self.fail_log_at:
            raise OSError("wandb: network is down")
        self.logged.append((step, values))

    def finish(self) -> None:
        self.finished = True


def test_wandb_gets_the_same_scalars_offline(
    model_files: ModelSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_MODE", "offline")
    trainer(model_files, tmp_path, report_to=("wandb",), max_steps=3).run()
    assert fake.init_kwargs["mode"] == "offline" and fake.init_kwargs["dir"] == str(tmp_path)
    assert fake.init_kwargs["group"] == "run" and fake.init_kwargs["config"]["ttt_steps"] == 2
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [s for s, _ in fake.logged] == [1, 2, 3] and fake.finished
    assert [v["train/ploss_1"] for _, v in fake.logged] == [r["ploss"][1] for r in rows]
    assert not (tmp_path / TENSORBOARD_DIR).exists()


def test_a_failing_tracker_is_switched_off_and_the_run_goes_on(
    model_files: ModelSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeWandb(fail_log_at=2)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    with caplog.at_level(logging.WARNING, logger="pipeline.train.trackers"):
        result = trainer(model_files, tmp_path, report_to=("wandb", "tensorboard")).run()
    assert (result.reason, result.step) == ("end_of_stream", 7)
    assert [s for s, _ in fake.logged] == [1] and not fake.finished  # off from its first failure
    assert "tracker wandb failed in log; switched off" in caplog.text
    assert_events_match_metrics(tmp_path, list(range(1, 8)))  # the other tracker kept going


def test_the_curves_have_one_axis_each_for_loss_accuracy_acceptance_and_lr(tmp_path: Path) -> None:
    rows = [
        {"step": s, "loss": 3.0 / s, "ploss": [2.0 / s, 4.0 / s], "acc": [0.1 * s, 0.05 * s],
         "acceptance_length": 1 + 0.1 * s, "lr": 1e-3 * s / 5}
        for s in range(1, 6)
    ]  # fmt: skip
    fig = curves_figure(rows, title="run: draft training")
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["Loss", "Top-1 accuracy per TTT step", "Simulated acceptance length", "Learning rate"]
    loss, acc, tau, lr = fig.axes
    assert [line.get_label() for line in loss.get_lines()] == ["weighted total", "TTT step 0", "TTT step 1"]
    assert [list(line.get_ydata()) for line in acc.get_lines()] == [[r["acc"][i] for r in rows] for i in (0, 1)]
    assert list(tau.get_lines()[0].get_ydata()) == [r["acceptance_length"] for r in rows]
    assert list(lr.get_lines()[0].get_ydata()) == [r["lr"] for r in rows]
    assert fig.get_suptitle() == "run: draft training"
    png = plot_curves(rows, tmp_path / "curves.png")
    assert png is not None and png.read_bytes()[:4] == b"\x89PNG"
    assert plot_curves([], tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()
