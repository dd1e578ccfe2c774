"""``storage.max_bytes``: a budget the run could not keep is refused at load, naming the key and
the fix; one it can keep divides into the transient reserve and each partition's share."""

from __future__ import annotations

from typing import Any

import pytest

from pipeline.app.config_budget import HEADER_BYTES, feature_budget
from pipeline.app.config_file import parse_config
from pipeline.core.errors import ConfigError
from pipeline.core.feature_encoding import bytes_per_token
from tests.app.test_config import with_

# The synthetic target (hidden 64, float32); 2 partitions; one step of 2 plus a prefetch of 2.
RUN: dict[str, Any] = {
    "target": {"backend": "synthetic", "batch_size": 2},
    "data": {"partitions": 2, "max_length": 64},
    "storage": {"retention": "delete"},
    "train": {"epochs": 3, "save_interval": 1, "keep_last": 1, "prefetch": 1, "grad_accum": 1, "batch_size": 2},
    "generate": {"high_watermark": 4, "low_watermark": 2},
}
SAMPLE = 64 * bytes_per_token(64, 4, "as_captured") + HEADER_BYTES


def _config(max_bytes: int | None, **sections: dict[str, Any]) -> Any:
    raw = with_(**{name: {**RUN.get(name, {}), **sections.get(name, {})} for name in {*RUN, *sections}})
    raw["storage"]["max_bytes"] = max_bytes
    return parse_config(raw)


def test_a_budget_reserves_what_the_run_holds_in_flight_and_shares_the_rest() -> None:
    budget = feature_budget(_config(2_000_000))
    assert budget is not None and budget.sample_bytes == SAMPLE
    # 1 x 1 x 2 kept for resume + the generators' peak backlog; a rank holds 4 and asks for 4 more.
    assert budget.window >= 1 and budget.transient_samples >= 2 + 2 * 4
    assert budget.reserve == budget.transient_samples * SAMPLE
    assert budget.keep_share == (2_000_000 - budget.reserve) // 2
    assert feature_budget(_config(0)).keep_share == 0  # type: ignore[union-attr]  # keeps nothing
    assert feature_budget(_config(None)) is None


def test_a_budget_below_the_transient_reserve_is_refused_with_the_minimum() -> None:
    reserve = feature_budget(_config(0)).reserve  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match=f"raise it to at least {reserve:,}") as caught:
        feature_budget(_config(reserve - 1))
    assert caught.value.key == "storage.max_bytes"
    assert feature_budget(_config(reserve)).keep_share == 0  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("sections", "why"),
    [
        ({"storage": {"retention": "retain"}}, "needs storage.retention: delete"),
        ({"train": {"save_interval": 0}}, "needs train.save_interval > 0"),
    ],
)
def test_a_budget_the_run_could_not_keep_stops_at_load(sections: dict[str, Any], why: str) -> None:
    with pytest.raises(ConfigError, match=why) as caught:
        _config(1_000_000, **sections)
    assert caught.value.key == "storage.max_bytes"


def test_a_budget_with_trainer_groups_is_refused() -> None:
    raw = with_(**RUN)
    raw["storage"] = {**raw["storage"], "max_bytes": 1_000_000}
    raw["train_groups"] = {"a": {}, "b": {"ttt_steps": 1}}
    with pytest.raises(ConfigError, match="not supported with train_groups"):
        parse_config(raw)
