"""Reused batch buffers the reader fills in place: each hidden-state byte is copied once, by the kernel.

The prefetcher asks its source (a :class:`~pipeline.stream.SampleStream` on local or POSIX-shared
storage) to read every sample's hidden states straight into row ``k`` of the current micro-batch's
buffer (:meth:`BatchSlots.dest`), pinned when the batch goes to a GPU; the collate then only pads.

A buffer is refilled only when nothing uses it any more: no tensor of the batches handed out (the
prefetch queue, the feeder's held micro-batches, the step in progress, autograd's saved inputs)
still views it, which is the storage's own use count, and no copy to a GPU out of it is still
running (:func:`~pipeline.train.collate.copy_pending`). The ring grows to as many buffers as are in
use at once (the prefetch queue + the feeder's held micro-batches + the one being filled), at most
``keep``; beyond that a fresh one is allocated per micro-batch and dropped after use, never waited on.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.core.feature_encoding import CAPTURED_DTYPE
from pipeline.core.features import AUX_HIDDEN, FEATURE_NAMES, FINAL_HIDDEN
from pipeline.train.collate import copy_pending

__all__ = ("BatchSlots",)

logger = logging.getLogger(__name__)

_FLOATS = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}
_ROUND = 256  # capacity grows in steps of this many tokens when no max_length bounds it


def _users(tensor: torch.Tensor) -> int:
    """How many tensors share ``tensor``'s memory (views included), plus a constant."""
    return int(torch._C._storage_Use_Count(tensor.untyped_storage()._cdata))


@dataclass
class _Slot:
    aux: torch.Tensor  # [B, capacity, 3H]
    final: torch.Tensor  # [B, capacity, H]
    idle: tuple[int, int]  # the use counts when nothing but the slot holds it

    @classmethod
    def new(cls, batch: int, capacity: int, width: int, dtype: torch.dtype, pin: bool) -> _Slot:
        aux = torch.empty(batch, capacity, 3 * width, dtype=dtype, pin_memory=pin)
        final = torch.empty(batch, capacity, width, dtype=dtype, pin_memory=pin)
        return cls(aux, final, (_users(aux), _users(final)))

    def free(self) -> bool:
        if (_users(self.aux), _users(self.final)) != self.idle:
            return False
        return not (copy_pending(self.aux) or copy_pending(self.final))

    def fits(self, capacity: int, width: int, dtype: torch.dtype) -> bool:
        return self.aux.shape[1] >= capacity and self.final.shape[2] == width and self.aux.dtype == dtype


class BatchSlots:
    """The hidden-state buffers of the micro-batch being read, from a small ring of reused ones.

    :param max_length: the batch's token capacity (longer samples are decoded and truncated by the collate)
    :param dtype: the batch's hidden dtype; a sample stored in another dtype is decoded, not read in place
    """

    def __init__(
        self, batch_size: int, *, max_length: int | None, dtype: torch.dtype | None, pin: bool, keep: int
    ) -> None:
        self.batch_size = batch_size
        self.max_length = max_length
        self.dtype = dtype
        self.pin = pin
        self.keep = max(1, keep)
        self.row = 0  # the row the next sample is read into: the prefetcher's pending count
        self.reused = self.allocated = self.transient = 0
        self._ring: list[_Slot] = []
        self._current: _Slot | None = None
        self._capacity = max_length or 0

    @classmethod
    def install(cls, source: Any, batch_size: int, **kwargs: Any) -> BatchSlots | None:
        """Slots the source reads into, or None where it cannot (not a local stream, no use count)."""
        install = getattr(source, "read_into_slots", None)
        if install is None or not hasattr(torch._C, "_storage_Use_Count"):
            return None
        slots = cls(batch_size, **kwargs)
        if not install(slots.dest):
            return None
        logger.debug("hidden states are read into a ring of up to %d reused batch buffers", slots.keep)
        return slots

    def dest(self, ref: Any) -> Mapping[str, torch.Tensor] | None:
        """Row ``self.row`` of the current buffer for ``ref``'s hidden states; None: decode it instead."""
        if set(ref.tensors) != set(FEATURE_NAMES):  # e.g. compact features with scales: get decodes them
            return None
        aux, final = ref.tensors[AUX_HIDDEN], ref.tensors[FINAL_HIDDEN]
        if len(aux.shape) != 2 or len(final.shape) != 2:
            return None
        length, width = final.shape
        stored = _FLOATS.get(final.dtype)
        if stored is None or aux.dtype != final.dtype or aux.shape != [length, 3 * width] or length < 1:
            return None
        if self.max_length is None and length > self._capacity:
            self._capacity = -(-length // _ROUND) * _ROUND  # later buffers hold it; this one is decoded
        if length > self._capacity or self.row >= self.batch_size:
            return None
        captured = _FLOATS.get(
            CAPTURED_DTYPE.get(ref.target.dtype, "F32"), torch.float32
        )  # what decoding gives
        dtype = self.dtype or captured
        if self._current is None:
            self._current = self._acquire(width, dtype)
        slot = self._current
        if not stored == captured == dtype or not slot.fits(length, width, dtype):
            return None  # decoded (storage.dtype) or cast (the batch dtype): the collate copies it in
        return {AUX_HIDDEN: slot.aux[self.row, :length], FINAL_HIDDEN: slot.final[self.row, :length]}

    def take(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The current buffer for the collate (None if no sample used one); the next batch gets another."""
        slot, self._current, self.row = self._current, None, 0
        return None if slot is None else (slot.aux, slot.final)

    def _acquire(self, width: int, dtype: torch.dtype) -> _Slot:
        for slot in self._ring:
            if slot.free():
                if slot.fits(self._capacity, width, dtype):
                    self.reused += 1
                    return slot
                self._ring.remove(slot)  # outgrown (or another dtype): make room for a new one
                break
        slot = _Slot.new(self.batch_size, self._capacity, width, dtype, self.pin)
        if len(self._ring) < self.keep:
            self._ring.append(slot)
            self.allocated += 1
        else:
            self.transient += 1
            logger.debug("all %d batch buffers in use: a transient one for this micro-batch", self.keep)
        return slot
