"""Feature store: complete-before-visible writes, verification before use, root confinement."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest
import torch

from pipeline.core.errors import ConfinementError, IntegrityError
from pipeline.core.messages import SampleRef, TargetInfo
from pipeline.storage import FeatureStore, checksum_of

TARGET = TargetInfo(
    model_id="t", revision="r", num_layers=4, aux_layer_ids=[0, 1, 2], hidden_size=8, vocab_size=32, dtype="bfloat16"
)


def sample(length: int = 6) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(length)
    return {
        "input_ids": torch.arange(length, dtype=torch.int64),
        "loss_mask": torch.ones(length, dtype=torch.uint8),
        "aux_hidden_states": torch.randn(length, 24, generator=g).bfloat16(),
        "final_hidden_states": torch.randn(length, 8, generator=g).bfloat16(),
    }


def ref_for(store: FeatureStore, stored, sample_id: str = "s1", **overrides) -> SampleRef:
    fields = dict(
        run_id=store.run_id, sample_id=sample_id, prompt_id="p", producer_id="g", uri=stored.uri,
        nbytes=stored.nbytes, checksum=stored.checksum, num_tokens=6, tensors=stored.tensors, target=TARGET,
        created_at=0.0,
    )
    fields.update(overrides)
    return SampleRef(**fields)


@pytest.fixture(params=["file", "memory"])
def store(request, tmp_path: Path) -> FeatureStore:
    root = str(tmp_path) if request.param == "file" else f"memory://{uuid.uuid4().hex}"
    return FeatureStore(root, "run1")


def test_put_then_get_is_bit_identical(store: FeatureStore) -> None:
    tensors = sample()
    stored = store.put(3, "s1", tensors)
    assert stored.uri.startswith("features/3/s1.")
    assert stored.tensors["aux_hidden_states"].dtype == "BF16"
    assert stored.tensors["aux_hidden_states"].shape == [6, 24]
    got = store.get(ref_for(store, stored))
    assert set(got) == set(tensors)
    for name, tensor in tensors.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor)
    assert store.list() == [stored.uri] and store.list(3) == store.list() and store.list(0) == []
    assert stored.uri.startswith("features/3/s1.") and stored.uri.endswith(".safetensors")


def test_a_put_written_in_pieces_is_the_same_file_with_the_same_checksum(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FeatureStore(str(tmp_path), "run1")
    whole = store.put(0, "s1", sample(40))
    monkeypatch.setattr("pipeline.durable_write.WRITE_PIECE_BYTES", 7)  # pieces split tensors, the last one short
    pieces = store.put(0, "s1", sample(40))
    data = (tmp_path / "run1" / pieces.uri).read_bytes()
    assert data == (tmp_path / "run1" / whole.uri).read_bytes()
    assert pieces.checksum == whole.checksum == checksum_of(data) and pieces.nbytes == len(data)


def test_every_attempt_writes_its_own_object_and_orphans_are_swept(store: FeatureStore) -> None:
    """A late writer can never replace the bytes a committed ref describes (issue 9.4)."""
    committed = store.put(0, "s1", sample(6))
    late = store.put(0, "s1", sample(6))  # e.g. a fenced generator's put that lands afterwards
    assert late.uri != committed.uri and sorted(store.list()) == sorted([committed.uri, late.uri])
    assert store.sweep_orphans([committed.uri]) == [late.uri]
    assert store.list() == [committed.uri]


def test_orphans_within_the_grace_period_are_left_alone(tmp_path: Path) -> None:
    """A young file may be an attempt whose transaction is still open: only older ones go."""
    store = FeatureStore(str(tmp_path), "run1")
    committed, old, young = (store.put(0, name, sample(6)) for name in ("s1", "s2", "s3"))
    hour_ago = time.time() - 3600
    os.utime(store.resolve(committed.uri), (hour_ago, hour_ago))
    os.utime(store.resolve(old.uri), (hour_ago, hour_ago))
    assert store.orphans([committed.uri], min_age_s=600) == {old.uri: old.nbytes}
    assert store.sweep_orphans([committed.uri], min_age_s=600) == [old.uri]
    assert store.list() == sorted([committed.uri, young.uri])
    assert store.orphans([committed.uri]) == {young.uri: young.nbytes}  # no grace: every unnamed file


def test_local_write_leaves_no_temp_files_and_is_durable(tmp_path: Path) -> None:
    store = FeatureStore(str(tmp_path), "run1")
    store.put(1, "s1", sample())
    names = os.listdir(tmp_path / "run1" / "features" / "1")
    assert len(names) == 1 and names[0].startswith("s1.") and names[0].endswith(".safetensors")


def test_crashed_writer_temp_files_are_swept_and_never_listed(tmp_path: Path) -> None:
    store = FeatureStore(str(tmp_path), "run1")
    stored = store.put(1, "s1", sample())
    (tmp_path / "run1/features/1/.s2.safetensors.dead.tmp").write_bytes(b"partial")
    assert store.list() == [stored.uri]
    assert store.sweep_temp_files() == 1


def test_truncated_file_is_refused(store: FeatureStore) -> None:
    stored = store.put(0, "s1", sample())
    data = store.fs.cat_file(store.resolve(stored.uri))
    store.fs.pipe_file(store.resolve(stored.uri), data[:-10])
    with pytest.raises(IntegrityError, match="bytes"):
        store.get(ref_for(store, stored))


def test_flipped_byte_fails_the_checksum(store: FeatureStore) -> None:
    stored = store.put(0, "s1", sample())
    data = bytearray(store.fs.cat_file(store.resolve(stored.uri)))
    data[-1] ^= 0xFF
    store.fs.pipe_file(store.resolve(stored.uri), bytes(data))
    with pytest.raises(IntegrityError, match="checksum"):
        store.get(ref_for(store, stored))


def test_header_must_match_the_ref(store: FeatureStore) -> None:
    stored = store.put(0, "s1", sample())
    lying = dict(stored.tensors)
    lying["aux_hidden_states"] = lying["aux_hidden_states"].model_copy(update={"shape": [6, 25]})
    with pytest.raises(IntegrityError, match="differ"):
        store.get(ref_for(store, stored, tensors=lying))


def test_missing_file_is_an_integrity_error(store: FeatureStore) -> None:
    stored = store.put(0, "s1", sample())
    store.delete(stored.uri)
    store.delete(stored.uri)  # idempotent
    with pytest.raises(IntegrityError, match="missing"):
        store.get(ref_for(store, stored))


def test_garbage_with_matching_size_and_checksum_is_still_refused(store: FeatureStore) -> None:
    garbage = b"\xff" * 64
    stored = store.put(0, "s1", sample())
    store.fs.pipe_file(store.resolve("features/0/g.safetensors"), garbage)
    ref = ref_for(store, stored, uri="features/0/g.safetensors", nbytes=64, checksum=checksum_of(garbage))
    with pytest.raises(IntegrityError, match="header"):
        store.get(ref)


@pytest.mark.parametrize(
    "uri",
    ["../other/x.safetensors", "features/../../x", "/etc/passwd", "s3://bucket/x", "features//x", "C:/x",
     "features\\..\\x", "./features/x", "features/0/\x00"],
)
def test_uris_outside_the_run_root_are_never_opened(store: FeatureStore, uri: str) -> None:
    stored = store.put(0, "s1", sample())
    with pytest.raises(ConfinementError):
        store.get(ref_for(store, stored, uri=uri))


def test_ref_of_another_run_is_refused(tmp_path: Path) -> None:
    store = FeatureStore(str(tmp_path), "run1")
    stored = store.put(0, "s1", sample())
    other = ref_for(store, stored).model_copy(update={"run_id": "run2"})
    with pytest.raises(ConfinementError, match="run"):
        store.get(other)


def test_files_are_safetensors_not_pickle(tmp_path: Path) -> None:
    store = FeatureStore(str(tmp_path), "run1")
    stored = store.put(0, "s1", sample())
    head = (tmp_path / "run1" / stored.uri).read_bytes()[:16]
    assert not head.startswith(b"\x80") and b"PK" not in head[:4]  # neither pickle nor torch zip


def test_empty_uri_is_refused(store: FeatureStore) -> None:
    with pytest.raises(ConfinementError):
        store.resolve("")


def test_files_are_readable_by_the_safetensors_library(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    store = FeatureStore(str(tmp_path), "run1")
    tensors = {**sample(), "empty": torch.zeros(0, 3), "flag": torch.tensor([True, False])}
    stored = store.put(0, "s1", tensors)
    loaded = load_file(str(tmp_path / "run1" / stored.uri))
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor)


def test_files_written_by_the_safetensors_library_are_readable(tmp_path: Path) -> None:
    from safetensors.torch import save

    store = FeatureStore(str(tmp_path), "run1")
    tensors = sample()
    stored = store.put_bytes("features/0/lib.safetensors", save(tensors))
    got = store.get(ref_for(store, stored, sample_id="lib"))
    assert all(torch.equal(got[k], v) for k, v in tensors.items())


def test_a_ref_naming_a_directory_is_an_integrity_error(store: FeatureStore) -> None:
    stored = store.put(1, "s1", sample())
    ref = ref_for(store, stored, uri="features/1")
    with pytest.raises(IntegrityError, match="directory"):
        store.get(ref)


def test_the_size_is_checked_before_the_file_is_read(store: FeatureStore, monkeypatch: pytest.MonkeyPatch) -> None:
    stored = store.put(1, "s1", sample())
    ref = ref_for(store, stored, nbytes=10**12)
    monkeypatch.setattr(store, "_read", lambda *a: pytest.fail("read a file whose size is wrong"))
    with pytest.raises(IntegrityError, match="its ref says 1000000000000"):
        store.get(ref)


def test_tensors_of_a_local_get_are_writable_and_writing_them_leaves_the_file_alone(tmp_path: Path) -> None:
    store = FeatureStore(str(tmp_path), "run1")
    stored = store.put(0, "s1", sample())
    path = Path(store.resolve(stored.uri))
    before = path.read_bytes()
    got = store.get(ref_for(store, stored))
    got["aux_hidden_states"].fill_(7.0)  # the mapping is private: the page is copied, not the file
    assert path.read_bytes() == before
    assert torch.equal(store.get(ref_for(store, stored))["aux_hidden_states"], sample()["aux_hidden_states"])
    os.unlink(path)  # removed under a reader (retention): the mapping keeps its pages
    assert bool((got["aux_hidden_states"] == 7.0).all())
    assert torch.equal(got["final_hidden_states"], sample()["final_hidden_states"])
