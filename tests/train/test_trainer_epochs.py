"""Epochs over retained features, without a broker: once per epoch, fresh orders, exact resume."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from pipeline.core.messages import SampleRef
from pipeline.core.progress import StreamState
from pipeline.train.epochs import EpochedSource, epoch_order
from pipeline.train.model import ModelSpec
from pipeline.train.result import TrainResult
from pipeline.train.resume import trainable_state
from pipeline.train.trainer import Trainer
from tests.train.test_trainer_loop import Ledger, model_files  # noqa: F401 - the fixture
from tests.train.test_trainer_loop import make_trainer as trainer_over
from tests.train_support import MemorySource, sample_tensors

LENGTHS = [10 + (i * 7) % 9 for i in range(15)]  # 3 epochs: 45 passes, 22 steps of 2, 1 tail
EPOCHS = 3


def _fetch(ref: SampleRef) -> dict[str, torch.Tensor]:
    index = int(ref.prompt_id[1:])
    return sample_tensors(index, LENGTHS[index])


def epoched(state: StreamState | None, fetched: list[str] | None = None) -> EpochedSource:
    def fetch(ref: SampleRef) -> dict[str, torch.Tensor]:
        if fetched is not None:
            fetched.append(ref.sample_id)
        return _fetch(ref)

    return EpochedSource(
        MemorySource("run", LENGTHS, state=state),
        open_listing=lambda: MemorySource("run", LENGTHS),
        fetch=fetch,
        epochs=EPOCHS,
        seed=0,
        state=state,
    )


def make_trainer(spec: ModelSpec, ckpt: Path, **values: object) -> Trainer:
    return trainer_over(spec, ckpt, open_source=epoched, epochs=EPOCHS, **values)  # type: ignore[arg-type]


def losses(result: TrainResult) -> list[float]:
    return [r.loss for r in result.metrics]


def test_epoch_orders_are_permutations_fixed_by_seed_and_epoch() -> None:
    orders = {epoch: epoch_order(50, 7, epoch) for epoch in range(1, 4)}
    assert all(sorted(o) == list(range(50)) for o in orders.values())
    assert orders[1] == epoch_order(50, 7, 1)  # the same on every run and resume
    assert len({tuple(o) for o in orders.values()}) == 3  # a fresh order each epoch
    assert epoch_order(50, 8, 1) != orders[1]


def test_every_sample_once_per_epoch_and_features_deleted_only_after_the_last(
    model_files: ModelSpec, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ledger, deleted = Ledger(), []
    result = make_trainer(model_files, tmp_path, ledger=ledger, deleted=deleted).run()
    assert (result.reason, result.step, result.samples_trained) == ("end_of_stream", 22, 44)
    assert "44 of 45 sample passes trained (15 prompts x 3 epochs), 0 missing" in capsys.readouterr().out
    trained = Counter(
        (epoch, sample_id)
        for record in ledger.records
        for rank in record.ranks
        for epoch, sample_id in zip(rank.sample_epochs(record.epoch), rank.sample_ids)
    )
    assert max(trained.values()) == 1  # nothing twice in one epoch
    by_epoch = Counter(epoch for epoch, _ in trained)
    assert by_epoch == {0: 15, 1: 15, 2: 14}  # the last epoch's one tail sample is not stepped
    epoch_1 = [s for r in ledger.records for rk in r.ranks for e, s in zip(rk.sample_epochs(r.epoch), rk.sample_ids) if e == 1]
    assert epoch_1 != [f"run.e000.p{i:09d}" for i in range(15)]  # not the topic order
    assert [r.epoch for r in ledger.records] == sorted(r.epoch for r in ledger.records)
    # Retention delete: every feature exactly once, and only once the last epoch has read it.
    assert sorted(deleted) == sorted(f"features/0/run.e000.p{i:09d}.a0.safetensors" for i in range(15))


def test_a_stop_in_a_later_epoch_resumes_bit_identically(model_files: ModelSpec, tmp_path: Path) -> None:
    straight_trainer = make_trainer(model_files, tmp_path / "a")
    straight = straight_trainer.run()
    first = make_trainer(model_files, tmp_path / "b", max_steps=11).run()  # step 11: inside epoch 1
    assert first.reason == "max_steps"
    second_trainer = make_trainer(model_files, tmp_path / "b")
    second = second_trainer.run()
    assert losses(first) + losses(second) == losses(straight)
    a, b = trainable_state(straight_trainer.draft), trainable_state(second_trainer.draft)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_state_carries_the_epoch_and_position(tmp_path: Path) -> None:
    fetched: list[str] = []
    source = epoched(None, fetched)
    items = source.items()
    for _ in range(15 + 4):  # the online pass, then 4 samples of epoch 1
        next(items)
    state = StreamState.from_json(source.state().to_json())
    assert (state.epoch, state.epoch_position, state.replayed) == (1, 4, 4)
    assert source.summary().used == 19
    rest = [(i.epoch, i.ref.sample_id) for i in items]
    resumed = [(i.epoch, i.ref.sample_id) for i in epoched(state).items()]
    assert resumed == rest  # the same order from the same point
    assert len(fetched) == 4 + 26  # later epochs fetch each payload again; the online pass did not


def test_later_epochs_request_each_next_file_before_reading_this_one() -> None:
    """With reads into slots, the next sample of the epoch's order is hinted (the disk starts on it)
    before the current one is fetched: the online pass's own stream does the same."""
    events: list[tuple[str, str]] = []

    class Live(MemorySource):
        def read_into_slots(self, dest: object) -> bool:
            return True

        def fetch(self, ref: SampleRef) -> dict[str, torch.Tensor]:
            events.append(("fetch", ref.sample_id))
            return _fetch(ref)

        def hint(self, ref: SampleRef) -> None:
            events.append(("hint", ref.sample_id))

    source = EpochedSource(
        Live("run", LENGTHS), open_listing=lambda: MemorySource("run", LENGTHS), fetch=_fetch, epochs=2,
        seed=0,
    )
    assert source.read_into_slots(lambda ref: None)
    got = [(item.epoch, item.ref.sample_id) for item in source.items()]
    later = [sample_id for epoch, sample_id in got if epoch == 1]
    assert len(later) == len(LENGTHS) and later != sorted(later)  # epoch 1, in its own order
    assert [s for kind, s in events if kind == "fetch"] == later
    assert [s for kind, s in events if kind == "hint"] == later[1:]  # each after the first, once
    for previous, sample_id in zip(later, later[1:]):  # hinted before the one before it is read
        assert events.index(("hint", sample_id)) < events.index(("fetch", previous))
