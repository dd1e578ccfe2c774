"""The feature store on a real S3 server (moto's server mode): the claim check on an object store."""

from __future__ import annotations

import time

import pytest
import torch

from pipeline.core.errors import ConfinementError, IntegrityError
from pipeline.storage import FeatureStore
from pipeline.train.checkpoint import CheckpointManager
from pipeline.train.retention import apply_retention
from tests.test_storage import ref_for, sample

pytestmark = pytest.mark.integration


@pytest.fixture
def store(s3_root) -> FeatureStore:
    return FeatureStore(s3_root.url, "run1", storage_options=s3_root.options)


def test_put_get_list_delete_on_s3(store: FeatureStore, s3_root) -> None:
    tensors = sample()
    stored = store.put(3, "s1", tensors)
    got = store.get(ref_for(store, stored))
    for name, tensor in tensors.items():
        assert torch.equal(got[name], tensor)
    other = store.put(0, "s2", sample(8))
    assert store.list() == sorted([stored.uri, other.uri]) and store.list(3) == [stored.uri]
    size, modified = store.listing()[stored.uri]
    assert size == stored.nbytes and modified is not None and abs(time.time() - modified) < 600
    store.delete(stored.uri)
    store.delete(stored.uri)  # idempotent
    assert store.list() == [other.uri]
    assert s3_root.fs().find(f"{store.run_root}/features/3") == []  # gone for another client too
    with pytest.raises(IntegrityError, match="missing"):
        store.get(ref_for(store, stored))


def test_put_is_one_put_and_visible_whole_before_it_returns(store: FeatureStore, s3_root) -> None:
    calls: list[str] = []
    inner = store.fs._call_s3
    other = s3_root.fs()  # its coroutines run on fsspec's loop, where this hook runs

    async def counting(method, *args, **kwargs):
        calls.append(method)
        if method == "put_object":  # the object must not be readable before its one PUT
            assert not await other._exists(f"{store.run_root}/{uri_seen(kwargs)}")
        return await inner(method, *args, **kwargs)

    def uri_seen(kwargs) -> str:
        return kwargs["Key"].split("/run1/", 1)[1]

    store.fs._call_s3 = counting
    stored = store.put(1, "s1", sample(64))
    writes = [m for m in calls if m in ("put_object", "create_multipart_upload", "upload_part", "copy_object")]
    assert writes == ["put_object"]
    fresh = s3_root.fs()  # another machine's client, nothing cached: the whole object is there already
    data = fresh.cat_file(f"{store.run_root}/{stored.uri}")
    assert len(data) == stored.nbytes
    reader = FeatureStore(s3_root.url, "run1", storage_options=s3_root.options)
    assert torch.equal(reader.get(ref_for(reader, stored))["aux_hidden_states"], sample(64)["aux_hidden_states"])


def test_tampered_or_truncated_objects_are_refused(store: FeatureStore, s3_root) -> None:
    stored = store.put(0, "s1", sample())
    path = f"{store.run_root}/{stored.uri}"
    data = bytearray(s3_root.fs().cat_file(path))
    data[-1] ^= 0xFF
    s3_root.fs().pipe_file(path, bytes(data))
    with pytest.raises(IntegrityError, match="checksum"):
        FeatureStore(s3_root.url, "run1", storage_options=s3_root.options).get(ref_for(store, stored))
    s3_root.fs().pipe_file(path, bytes(data[:-5]))
    with pytest.raises(IntegrityError, match="bytes, its ref says"):
        FeatureStore(s3_root.url, "run1", storage_options=s3_root.options).get(ref_for(store, stored))


def test_uris_stay_inside_the_run_root_on_s3(store: FeatureStore, s3_root) -> None:
    neighbour = FeatureStore(s3_root.url, "run2", storage_options=s3_root.options)
    theirs = neighbour.put(0, "s1", sample())
    for uri in ("../run2/" + theirs.uri, "/" + theirs.uri, "s3://" + theirs.uri, "features/../../run2/x"):
        with pytest.raises(ConfinementError):
            store.get(ref_for(store, theirs, uri=uri))
    with pytest.raises(ConfinementError):
        store.get(ref_for(neighbour, theirs))  # a ref of another run
    assert store.list() == [] and neighbour.list() == [theirs.uri]


def test_sweep_orphans_and_min_age_on_s3(store: FeatureStore) -> None:
    committed = store.put(0, "s1", sample())
    late = store.put(0, "s1", sample())  # a fenced writer's attempt: no committed ref names it
    assert store.orphans([committed.uri], min_age_s=600) == {}  # S3 reports LastModified: too new
    assert store.orphans([committed.uri], min_age_s=0) == {late.uri: late.nbytes}
    assert store.sweep_orphans([committed.uri]) == [late.uri]
    assert store.list() == [committed.uri]


def test_retention_deletes_consumed_features_on_s3(store: FeatureStore, tmp_path) -> None:
    uris = [store.put(0, f"s{i}", sample()).uri for i in range(4)]
    manager = CheckpointManager(tmp_path / "ck", keep_last=1)
    for step, interval in ((1, uris[:2]), (2, uris[2:])):
        manager.save(step, end=False, model={"w": torch.zeros(2)}, state={}, meta={}, interval=interval)
    report = apply_retention(manager, "delete", store.delete)
    assert report.features_deleted == 4 and store.list() == []


def test_listing_sees_objects_another_client_wrote_after_it_listed(store: FeatureStore, s3_root) -> None:
    first = store.put(0, "s1", sample())
    assert store.list() == [first.uri]  # s3fs caches this listing
    writer = FeatureStore(s3_root.url, "run1", storage_options=s3_root.options)  # another machine
    second = writer.put(0, "s2", sample())
    assert store.list() == sorted([first.uri, second.uri])
    writer.delete(first.uri)
    assert store.list() == [second.uri]
