"""The trainer loop without a broker: exact resume, stop, ledger records, the summary, refusals."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from pipeline.core.errors import RunMismatchError
from pipeline.core.messages import LedgerStep
from pipeline.train.distributed import DistContext
from pipeline.train.metrics import read_metrics
from pipeline.train.model import ModelSpec, build_draft
from pipeline.train.result import TrainResult
from pipeline.train.resume import trainable_state
from pipeline.train.rng import seed_everything
from pipeline.train.trainer import OpenSource, Trainer
from tests.train_support import MemorySource, loop_settings, write_tiny_target, write_vocab

LENGTHS = [10 + (i * 7) % 9 for i in range(15)]  # 7 steps of 2 samples, 1 tail sample


class Ledger:
    def __init__(self) -> None:
        self.records: list[LedgerStep] = []

    def write(self, record: LedgerStep) -> None:
        self.records.append(record)

    def flush(self, timeout_s: float = 30.0) -> None:
        pass


@pytest.fixture(scope="module")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> ModelSpec:
    d = tmp_path_factory.mktemp("model")
    return ModelSpec(
        str(write_tiny_target(d / "target")), str(write_vocab(d / "vocab.safetensors")), (0, 1, 2)
    )


def make_trainer(
    spec: ModelSpec,
    ckpt: Path,
    *,
    ledger: Ledger | None = None,
    deleted: list[str] | None = None,
    open_source: OpenSource | None = None,
    **overrides: object,
) -> Trainer:
    values: dict[str, object] = dict(
        run_id="run",
        checkpoint_dir=str(ckpt),
        batch_size=2,
        grad_accum=1,
        lr=3e-3,
        schedule="constant",
        warmup_ratio=0.0,
        ttt_steps=2,
        max_length=32,
        save_interval=3,
        keep_last=1,
        deterministic=True,
        metrics_path=str(ckpt / "metrics.jsonl"),
        progress=False,
    )
    values.update(overrides)
    config = loop_settings(**values)
    seed_everything(config.seed, deterministic=True)
    draft, lm_head, _ = build_draft(spec, seed=config.seed, device=torch.device("cpu"))
    return Trainer(
        config,
        draft=draft,
        lm_head=lm_head,
        dist=DistContext(),
        open_source=open_source or (lambda state: MemorySource("run", LENGTHS, state=state)),
        partitions=[0],
        num_partitions=1,
        ledger=ledger,
        delete_feature=deleted.append if deleted is not None else None,
    )


def losses(result: TrainResult) -> list[float]:
    return [r.loss for r in result.metrics]


def test_stopping_and_resuming_is_bit_identical_to_a_straight_run(
    model_files: ModelSpec, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    straight_trainer = make_trainer(model_files, tmp_path / "a")
    straight = straight_trainer.run()
    assert (straight.reason, straight.step, straight.samples_trained) == ("end_of_stream", 7, 14)
    assert (
        "14 of 15 prompts trained, 0 missing, 0 duplicates dropped, 1 tail samples not stepped"
        in capsys.readouterr().out
    )

    ledger, deleted = Ledger(), []
    first = make_trainer(model_files, tmp_path / "b", ledger=ledger, deleted=deleted, max_steps=4).run()
    assert (first.reason, first.step) == ("max_steps", 4)
    second_trainer = make_trainer(model_files, tmp_path / "b", ledger=ledger, deleted=deleted)
    second = second_trainer.run()
    assert losses(first) + losses(second) == losses(straight)
    a, b = trainable_state(straight_trainer.draft), trainable_state(second_trainer.draft)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl")] == list(range(1, 8))

    # The ledger: every sample once, in stream order, with next offsets and consumed records.
    assert [r.step for r in ledger.records] == list(range(1, 8))
    ids = [s for r in ledger.records for s in r.ranks[0].sample_ids]
    assert ids == [f"run.e000.p{i:09d}" for i in range(14)]
    assert [(o.offset, o.records) for o in ledger.records[-1].ranks[0].next_offsets] == [(14, 14)]
    # keep_last=1, policy delete: every file was consumed before the final checkpoint's positions.
    assert sorted(deleted) == sorted(f"features/0/run.e000.p{i:09d}.a0.safetensors" for i in range(15))


def test_a_stop_finishes_the_step_and_checkpoints(model_files: ModelSpec, tmp_path: Path) -> None:
    stop = threading.Event()
    trainer = make_trainer(model_files, tmp_path)
    original = trainer._train_step

    def step_then_stop(micro):  # the signal lands in the middle of step 2
        out = original(micro)
        if trainer.step == 1:
            stop.set()
        return out

    trainer._train_step = step_then_stop  # type: ignore[method-assign]
    result = trainer.run(stop)
    assert (result.reason, result.step) == ("stopped", 2)
    assert result.checkpoint is not None and result.checkpoint.endswith("step-000000002")


def test_resume_refuses_a_changed_batch_shape(model_files: ModelSpec, tmp_path: Path) -> None:
    make_trainer(model_files, tmp_path, max_steps=3).run()
    with pytest.raises(RunMismatchError, match="batch_size: checkpoint 2 != this run 3"):
        make_trainer(model_files, tmp_path, batch_size=3).run()


def test_resume_never_refuses_an_existing_checkpoint(model_files: ModelSpec, tmp_path: Path) -> None:
    make_trainer(model_files, tmp_path, max_steps=3).run()
    with pytest.raises(RunMismatchError, match="already holds checkpoints"):
        make_trainer(model_files, tmp_path, resume="never").run()


def test_a_resumed_finished_run_reports_the_same_summary(
    model_files: ModelSpec, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_trainer(model_files, tmp_path).run()
    again = make_trainer(model_files, tmp_path).run()
    assert (again.reason, again.step, again.samples_trained) == ("end_of_stream", 7, 14)
    assert again.completeness is not None and again.completeness.tail == 1
    out = capsys.readouterr().out
    assert out.count("14 of 15 prompts trained, 0 missing") == 2
