"""read_into: the tensors and the errors of ``FeatureStore.get``, with the hidden states read in place."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import pipeline.read_into as read_into_module
from pipeline.core.errors import ConfinementError, IntegrityError, SpecstreamError
from pipeline.core.messages import SampleRef
from pipeline.read_into import read_into
from pipeline.storage import FeatureStore, StoredFeature, checksum_of
from tests.test_storage import ref_for, sample

HIDDEN = ("aux_hidden_states", "final_hidden_states")


def dest_for(
    tensors: dict[str, torch.Tensor], names=HIDDEN, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Garbage-filled destinations, as a reused batch buffer's rows would be."""
    return {n: torch.full_like(tensors[n], 7.0, dtype=dtype or tensors[n].dtype) for n in names}


@pytest.fixture()
def local(tmp_path: Path) -> FeatureStore:
    return FeatureStore(str(tmp_path), "run1")


def _rewrite(store: FeatureStore, stored: StoredFeature, change: Callable[[bytearray], bytes]) -> None:
    path = store.resolve(stored.uri)
    data = bytearray(store.fs.cat_file(path))
    store.fs.pipe_file(path, change(data))


@pytest.mark.parametrize("chunk", [7, 300, 400, 650, 700, 1 << 20])
def test_the_tensors_are_gets_and_the_hidden_states_are_the_destinations(
    local: FeatureStore, chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Many chunks: the CRC runs on across them. The first read is one chunk from offset 0, and
    # ends in the header (7, 300), in a tensor (400, 650, 700) or past the end (774 bytes here).
    monkeypatch.setattr(read_into_module, "CHUNK_BYTES", chunk)
    monkeypatch.setattr(read_into_module, "FIRST_READ_BYTES", chunk)
    tensors = sample(6)
    stored = local.put(0, "s1", tensors)
    ref = ref_for(local, stored)
    dest = dest_for(tensors)
    got = read_into(local, ref, dest)
    expected = local.get(ref)
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor)
    for name in HIDDEN:
        assert got[name] is dest[name]


def test_a_destination_of_another_dtype_or_shape_is_decoded_instead(local: FeatureStore) -> None:
    tensors = sample(6)
    ref = ref_for(local, local.put(0, "s1", tensors))
    dest = {
        "aux_hidden_states": torch.zeros(6, 24),
        "final_hidden_states": torch.zeros(5, 8, dtype=torch.bfloat16),
    }
    got = read_into(local, ref, dest)
    assert all(got[n] is not dest[n] and torch.equal(got[n], tensors[n]) for n in HIDDEN)
    assert not dest["aux_hidden_states"].any() and not dest["final_hidden_states"].any()


def test_a_remote_store_reads_through_get(tmp_path: Path) -> None:
    store = FeatureStore(f"memory://{uuid.uuid4().hex}", "run1")
    tensors = sample(6)
    ref = ref_for(store, store.put(0, "s1", tensors))
    got = read_into(store, ref, dest_for(tensors))
    assert all(torch.equal(got[n], tensors[n]) for n in tensors)


def _flip_last(data: bytearray) -> bytes:
    data[-1] ^= 0xFF
    return bytes(data)


def _flip_header(data: bytearray) -> bytes:
    data[12] ^= 0x01
    return bytes(data)


CORRUPTIONS: dict[str, Callable[[FeatureStore, StoredFeature], SampleRef]] = {
    "flipped data byte": lambda s, st: (_rewrite(s, st, _flip_last), ref_for(s, st))[1],
    "flipped header byte": lambda s, st: (_rewrite(s, st, _flip_header), ref_for(s, st))[1],
    "truncated": lambda s, st: (_rewrite(s, st, lambda d: bytes(d[:-10])), ref_for(s, st))[1],
    "appended": lambda s, st: (_rewrite(s, st, lambda d: bytes(d) + b"x"), ref_for(s, st))[1],
    "ref's size wrong": lambda s, st: ref_for(s, st, nbytes=10**12),
    "ref's checksum wrong": lambda s, st: ref_for(s, st, checksum="crc32c:00000000"),
    "ref's header wrong": lambda s, st: ref_for(
        s,
        st,
        tensors={
            **st.tensors,
            "aux_hidden_states": st.tensors["aux_hidden_states"].model_copy(update={"shape": [6, 25]}),
        },
    ),
    "missing": lambda s, st: (s.delete(st.uri), ref_for(s, st))[1],
    "a directory": lambda s, st: ref_for(s, st, uri="features/0"),
    "outside the root": lambda s, st: ref_for(s, st, uri="../other/x.safetensors"),
    "another run": lambda s, st: ref_for(s, st).model_copy(update={"run_id": "run2"}),
    "garbage with its own checksum": lambda s, st: (
        s.fs.pipe_file(s.resolve("features/0/g.safetensors"), b"\xff" * 64),
        ref_for(s, st, uri="features/0/g.safetensors", nbytes=64, checksum=checksum_of(b"\xff" * 64)),
    )[1],
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_every_defect_get_refuses_is_refused_with_gets_error(local: FeatureStore, case: str) -> None:
    tensors = sample(6)
    ref = CORRUPTIONS[case](local, local.put(0, "s1", tensors))
    with pytest.raises(SpecstreamError) as by_get:
        local.get(ref)
    with pytest.raises(type(by_get.value)) as by_read_into:
        read_into(local, ref, dest_for(tensors))
    assert isinstance(by_get.value, (IntegrityError, ConfinementError))
    assert str(by_read_into.value) == str(by_get.value)


def test_a_corrupt_hidden_state_fails_in_the_single_pass(
    local: FeatureStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checksum is computed over the bytes read into the destination, not by a second read."""
    tensors = sample(6)
    stored = local.put(0, "s1", tensors)
    _rewrite(local, stored, _flip_last)  # the last tensor in the file: final_hidden_states
    monkeypatch.setattr(local, "get", lambda ref: pytest.fail("fell back to get"))
    with pytest.raises(IntegrityError, match="checksum"):
        read_into(local, ref_for(local, stored), dest_for(tensors))
