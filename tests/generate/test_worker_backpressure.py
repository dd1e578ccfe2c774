"""Backpressure logic without a broker: the start-time refusal and the per-partition hysteresis."""

from __future__ import annotations

import pytest

from pipeline.core.errors import ConfigError
from pipeline.core.progress import PartitionCounters
from pipeline.generate.backlog import consumed_from
from pipeline.generate.backpressure import (
    Backlog,
    FlowControl,
    TrainerWindow,
    Watermarks,
    check_watermarks,
    partition_needs,
    peak_backlog,
    required_high_watermark,
)
from pipeline.generate.synthetic import SyntheticTarget
from pipeline.generate.worker import GeneratorConfig, GeneratorWorker
from pipeline.storage import FeatureStore
from pipeline.transport.kafka import KafkaSettings


def test_window_is_world_times_batch_times_accum_plus_prefetch() -> None:
    window = TrainerWindow(world_size=2, batch_size=4, grad_accum=2, prefetch=3)
    assert window.samples == 2 * (4 * 2 + 3)


def test_a_watermark_below_one_trainer_window_is_refused_naming_the_setting() -> None:
    window = TrainerWindow(world_size=2, batch_size=4, grad_accum=2, prefetch=2)  # 20 samples
    with pytest.raises(ConfigError, match=r"backpressure\.high_watermark.*below one trainer window of 20") as err:
        check_watermarks(Watermarks(high=19), window)
    assert err.value.key == "backpressure.high_watermark"
    check_watermarks(Watermarks(high=20), window)  # exactly one window is enough


def test_the_worker_refuses_it_at_construction_before_any_client_exists(tmp_path) -> None:
    config = GeneratorConfig(
        run_id="r", worker_id="w", backpressure=Watermarks(high=8), trainer=TrainerWindow(2, 4, 1, 1)
    )
    # An unreachable broker: construction must fail on the config, not on the network.
    with pytest.raises(ConfigError, match="backpressure.high_watermark"):
        GeneratorWorker(KafkaSettings("127.0.0.1:1"), FeatureStore(str(tmp_path), "r"), SyntheticTarget(), config)
    with pytest.raises(ConfigError, match="backpressure.trainer"):
        GeneratorConfig(run_id="r", worker_id="w", backpressure=Watermarks(high=64)).validate()


def test_low_must_stay_below_high() -> None:
    with pytest.raises(ConfigError, match="backpressure.low_watermark"):
        check_watermarks(Watermarks(high=16, low=16), TrainerWindow(1, 4))


def test_uneven_partitions_need_a_larger_watermark_than_the_global_window() -> None:
    # 3 partitions, 2 ranks: rank 0 reads {0, 2}, rank 1 reads {1} alone and needs its whole
    # step from partition 1. A watermark of exactly one window starves it under even shares.
    window = TrainerWindow(world_size=2, batch_size=4)
    assert partition_needs(window, 3) == {0: 2, 1: 4, 2: 2}
    check_watermarks(Watermarks(high=8), window, partitions=3)  # proportional shares still fit
    with pytest.raises(ConfigError, match="partitions"):
        check_watermarks(Watermarks(high=8), window, partitions=1)


def test_hysteresis_per_partition() -> None:
    flow = FlowControl(Watermarks(high=16, low=8), TrainerWindow(world_size=2, batch_size=4), partitions=4)
    assert flow.high == {p: 4 for p in range(4)} and flow.low == {p: 2 for p in range(4)}
    backlog = {p: Backlog(produced=3, consumed=0) for p in range(4)}
    assert flow.update(backlog, 0) == set()
    backlog[1] = Backlog(produced=4, consumed=0)
    assert flow.update(backlog, 0) == {1}  # latched at its share of the high watermark
    backlog[1] = Backlog(produced=7, consumed=4)  # 3 left: between low and high, stays paused
    assert flow.update(backlog, 0) == {1}
    backlog[1] = Backlog(produced=7, consumed=5)  # 2 left: at the low share, released
    assert flow.update(backlog, 0) == set()


def test_bytes_watermark_never_pauses_below_one_step() -> None:
    flow = FlowControl(
        Watermarks(high=16, high_bytes=1000), TrainerWindow(world_size=1, batch_size=8), partitions=2
    )  # needs 4 per partition, 500 bytes per partition
    small = {0: Backlog(3, 0), 1: Backlog(0, 0)}
    assert flow.update(small, bytes_per_sample=10_000) == set()  # huge samples, but under one step
    enough = {0: Backlog(4, 0), 1: Backlog(0, 0)}
    assert flow.update(enough, bytes_per_sample=10_000) == {0}


def test_refs_from_metadata_tolerates_foreign_metadata() -> None:
    assert PartitionCounters.parse('{"refs": 7, "dropped": 0, "ended": false}').refs == 7
    assert PartitionCounters.parse("").refs == 0
    assert PartitionCounters.parse("step=12").refs == 0


def test_allowance_caps_each_partition_so_the_total_never_exceeds_high() -> None:
    flow = FlowControl(Watermarks(high=24, low=12), TrainerWindow(world_size=1, batch_size=8, prefetch=4), partitions=4)
    assert sum(flow.high.values()) <= 24 and all(flow.high[p] >= flow.needs[p] for p in range(4))
    assert flow.allowance(0, backlog=4, bytes_per_sample=0) == 2
    assert flow.allowance(0, backlog=6, bytes_per_sample=0) == 0


def test_when_partitions_end_the_rest_of_the_rank_gets_their_share() -> None:
    # Rank 0 reads {0, 2}: once 0 has ended, partition 2 alone must hold a whole step.
    window = TrainerWindow(world_size=2, batch_size=6)
    flow = FlowControl(Watermarks(high=12), window, partitions=4)
    assert flow.needs == {0: 3, 1: 3, 2: 3, 3: 3}
    flow.update({p: Backlog(0, 0) for p in range(4)}, 0, ended={0})
    assert flow.needs == {1: 3, 2: 6, 3: 3} and flow.high[2] >= 6
    assert flow.allowance(0, 0, 0) == 0  # nothing more for an ended partition


def test_what_ended_partitions_still_hold_counts_against_the_watermark() -> None:
    # One rank over 4 partitions, 24 samples: 6 each. Partition 0 ends holding 6 samples the
    # trainer has not read yet: the open ones share the other 18, not all 24 (storage peak).
    window = TrainerWindow(world_size=1, batch_size=4, prefetch=4)
    flow = FlowControl(Watermarks(high=24, low=12), window, partitions=4)
    assert sum(flow.high.values()) == 24
    flow.update({0: Backlog(6, 0), 1: Backlog(0, 0), 2: Backlog(0, 0), 3: Backlog(0, 0)}, 0, ended={0})
    assert sum(flow.high.values()) == 18 and all(flow.high[p] >= flow.needs[p] for p in (1, 2, 3))
    # Holding almost everything, they never starve the open ones below one step (no deadlock):
    flow.update({0: Backlog(22, 0), 1: Backlog(0, 0), 2: Backlog(0, 0), 3: Backlog(0, 0)}, 0, ended={0})
    assert flow.high == flow.needs == {1: 3, 2: 3, 3: 3}
    assert 22 + sum(flow.high.values()) <= peak_backlog(flow.marks, window, 4) == 24 + 9  # 8 over 3 rounds to 9


def test_a_window_that_does_not_divide_over_the_partitions_needs_the_rounded_watermark() -> None:
    window = TrainerWindow(world_size=1, batch_size=10)  # 10 over 4 partitions: 3+3+3+3 = 12
    assert required_high_watermark(window, 4) == 12
    with pytest.raises(ConfigError, match=r"high_watermark >= 12"):
        check_watermarks(Watermarks(high=10), window, partitions=4)


def test_trainer_progress_is_the_newest_ledger_records_counts() -> None:
    from pipeline.core.messages import LedgerStep, PartitionOffset, RankProgress, StepMetrics

    step = LedgerStep(
        run_id="r", step=3, epoch=0, lr=0.0, created_at=0.0, metrics=StepMetrics(loss=0.0, ploss=[0.0], acc=[0.0]),
        ranks=[
            RankProgress(rank=0, sample_ids=[], next_offsets=[PartitionOffset(partition=0, offset=9, records=7)]),
            RankProgress(rank=1, sample_ids=[], next_offsets=[PartitionOffset(partition=1, offset=8, records=6)]),
        ],
    )  # fmt: skip
    assert consumed_from(step) == {0: 7, 1: 6}
    assert consumed_from(None) == {}  # no step yet: nothing consumed
