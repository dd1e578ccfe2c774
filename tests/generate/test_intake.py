"""The generator's intake without a broker: batches span partitions within each partition's share,
and a share of all one generator's partitions below its batch is refused at start."""

from __future__ import annotations

import pytest

from pipeline.app.config import RunConfig
from pipeline.core.errors import ConfigError
from pipeline.core.messages import EndOfStream
from pipeline.core.topics import Record
from pipeline.generate.backpressure import TrainerWindow, Watermarks
from pipeline.generate.intake import Intake, batch_share, check_batch_share
from pipeline.generate.planner import Decoded
from tests.support import make_prompts


def held(partition: int, count: int, start: int = 0) -> list[Decoded]:
    prompts = make_prompts("r", count)
    return [(Record("r.prompts", partition, start + i, None, b""), p) for i, p in enumerate(prompts)]


def where(batch: list[Decoded]) -> list[tuple[int, int]]:
    return [(r.partition, r.offset) for r, _ in batch]


def test_a_batch_spans_partitions_round_robin_in_offset_order_within_each_share() -> None:
    intake = Intake(batch_size=8, run_id="r")
    for p in range(4):
        intake.add(held(p, 8))  # what four polls of one partition each would return
    allowance = {0: 4, 1: 1, 2: 0, 3: 4}  # partition 2 is at its cap
    assert intake.takeable(allowance) == 8
    batch = intake.take(allowance)
    assert where(batch) == [(0, 0), (1, 0), (3, 0), (0, 1), (3, 1), (0, 2), (3, 2), (0, 3)]
    assert intake.held == 32 - 8  # nothing polled is dropped (or fetched again)
    # The next batch starts at the next partition, each partition resuming at its cut.
    batch = intake.take({p: 8 for p in range(4)})
    assert where(batch)[:4] == [(1, 1), (2, 0), (3, 3), (0, 4)]


def test_markers_pass_without_room_but_nothing_passes_a_prompt_without_room() -> None:
    intake = Intake(batch_size=8, run_id="r")
    eos = EndOfStream(run_id="r", stage="source", partition=0, count=1, seq=1)
    intake.add(held(0, 1) + [(Record("r.prompts", 0, 1, None, b""), eos)])
    intake.add([(Record("r.prompts", 1, 0, None, b""), eos)])
    assert where(intake.take({0: 0, 1: 0})) == [(1, 0)]  # partition 0's marker waits behind its prompt
    assert where(intake.take({0: 1})) == [(0, 0), (0, 1)]
    assert intake.held == 0


def test_partitions_holding_a_batch_are_paused_and_resumed_once_taken() -> None:
    class FakeReader:
        def __init__(self) -> None:
            self.held: set[int] = set()

        def assignment(self) -> list[int]:
            return [0, 1, 2]

        def paused(self) -> list[int]:
            return sorted(self.held)

        def pause(self, ps: list[int]) -> None:
            self.held |= set(ps)

        def resume(self, ps: list[int]) -> None:
            self.held -= set(ps)

    reader = FakeReader()
    intake = Intake(batch_size=4, run_id="r")
    intake.add(held(0, 4) + held(1, 2))
    intake.pause(reader, latched={2})  # type: ignore[arg-type]
    assert reader.held == {0, 2}
    intake.take(None)
    intake.pause(reader, latched=set())  # type: ignore[arg-type]
    assert reader.held == set()


def test_one_generator_over_64_partitions_is_accepted_and_64_generators_are_refused_naming_the_minimum() -> None:
    marks, window = Watermarks(high=256, low=192), TrainerWindow(world_size=1, batch_size=1, prefetch=8)
    assert batch_share(marks, window, 64, owned=1) == 4
    check_batch_share(marks, window, 64, batch_size=8, owned=64)  # one generator: a share of 256
    with pytest.raises(ConfigError) as err:
        check_batch_share(marks, window, 64, batch_size=8, owned=1)
    assert err.value.key == "backpressure.high_watermark"
    assert "generate.batch_size 8 > the share 4 of backpressure.high_watermark 256" in str(err.value)
    assert ">= 512" in str(err.value)
    check_batch_share(Watermarks(high=512), window, 64, batch_size=8, owned=1)  # the minimum named fits


def run_config(partitions: int, workers: int, high: int = 256) -> RunConfig:
    return RunConfig.model_validate({
        "run_id": "r", "data": {"path": "x.jsonl", "partitions": partitions},
        "target": {"backend": "synthetic", "batch_size": 8},
        "generate": {"workers": workers, "high_watermark": high, "low_watermark": high * 3 // 4},
    })  # fmt: skip


def test_the_run_config_accepts_the_default_at_64_partitions_and_names_its_keys_when_refusing() -> None:
    assert run_config(64, 1).data.partitions == 64  # the default watermark just works
    run_config(64, 32)  # 2 partitions each: a share of 8 fits
    with pytest.raises(ConfigError) as err:
        run_config(64, 64)
    assert err.value.key == "generate.high_watermark"
    assert "target.batch_size 8" in str(err.value) and "generate.high_watermark to >= 512" in str(err.value)
    run_config(64, 64, high=512)
