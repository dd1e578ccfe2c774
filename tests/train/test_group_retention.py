"""Retention ``delete`` with several groups: a feature goes only when the last group releases it,
in either order, and a release repeated after a crash leaves nothing behind."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.storage import FeatureStore
from pipeline.train.group_retention import RELEASED_DIR, GroupRelease


def _store(tmp_path: Path) -> tuple[FeatureStore, list[str]]:
    store = FeatureStore(str(tmp_path), "run1")
    uris = [store.put(0, f"s{i}", {"x": torch.zeros(2)}).uri for i in range(3)]
    return store, uris


def _markers(tmp_path: Path) -> list[Path]:
    return [p for p in (tmp_path / "run1" / RELEASED_DIR).rglob("*") if p.is_file()]


@pytest.mark.parametrize("order", [("a", "b", "c"), ("c", "a", "b")])
def test_the_last_group_to_release_deletes(tmp_path: Path, order: tuple[str, ...]) -> None:
    store, uris = _store(tmp_path)
    releases = {g: GroupRelease(store, g, ("a", "b", "c")) for g in order}
    for group in order[:-1]:
        releases[group](uris[0])
        assert store.exists(uris[0]), f"deleted after only {order[: order.index(group) + 1]}"
    assert releases[order[0]].released_by(uris[0]) == sorted(order[:-1])
    releases[order[-1]](uris[0])
    assert not store.exists(uris[0]) and store.exists(uris[1]) and store.exists(uris[2])
    assert _markers(tmp_path) == []
    releases[order[0]](uris[0])  # the pass repeated after a crash: no stray marker
    assert _markers(tmp_path) == []


def test_markers_live_beside_the_features_not_among_them(tmp_path: Path) -> None:
    store, uris = _store(tmp_path)
    GroupRelease(store, "a", ("a", "b"))(uris[1])
    assert store.list() == sorted(uris) and len(_markers(tmp_path)) == 1
    with pytest.raises(ValueError, match="not one of the declared groups"):
        GroupRelease(store, "z", ("a", "b"))
