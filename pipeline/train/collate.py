"""Per-sample EAGLE3 features -> one right-padded training batch.

Samples arrive unshifted and without a batch dimension (see :mod:`pipeline.core.features`). The batch
keeps them unshifted: the single left shift belongs to training-time test. ``loss_mask`` of each
sample's last real token is forced to 0, because its teacher would be the distribution after the
sequence ends, which was never captured.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch

from pipeline.core.errors import PayloadError
from pipeline.core.features import AUX_HIDDEN, FEATURE_NAMES, FINAL_HIDDEN, INPUT_IDS, LOSS_MASK

__all__ = ("Batch", "collate", "copy_pending", "mark_in_flight", "validate_sample")


@dataclass(frozen=True)
class Batch:
    """Right-padded with zeros; ``attention_mask`` is 1 on real tokens."""

    input_ids: torch.Tensor  # [B, T] int64
    loss_mask: torch.Tensor  # [B, T] int64, 0/1, last real token forced to 0
    attention_mask: torch.Tensor  # [B, T] int64
    aux_hidden_states: torch.Tensor  # [B, T, 3H]
    final_hidden_states: torch.Tensor  # [B, T, H]
    lengths: torch.Tensor  # [B] int64

    @property
    def batch_size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Batch:
        """Move every tensor; ``dtype`` (if given) applies to the hidden states only."""
        moved = {}
        for f in fields(self):
            tensor = getattr(self, f.name)
            cast = dtype if dtype is not None and f.name in (AUX_HIDDEN, FINAL_HIDDEN) else None
            moved[f.name] = _moved(tensor, torch.device(device), cast)
        return Batch(**moved)


#: CPU buffers (reused batch slots) with a copy to a GPU maybe still in flight, by id (tensors compare
#: elementwise, so they cannot be weak dict keys): the buffer's weak reference and the copy's event.
_IN_FLIGHT: dict[int, tuple[weakref.ref[torch.Tensor], Any]] = {}


def copy_pending(buffer: torch.Tensor) -> bool:
    """Whether a copy out of ``buffer`` (a slot's base tensor) to a GPU may still be running."""
    entry = _IN_FLIGHT.get(id(buffer))
    if entry is None or entry[0]() is not buffer:
        return False
    if entry[1].query():
        del _IN_FLIGHT[id(buffer)]
        return False
    return True


def mark_in_flight(buffer: torch.Tensor, event: Any) -> None:
    """Remember that a copy out of ``buffer`` ends when ``event`` (a CUDA event) completes."""
    for key in [k for k, (ref, _) in _IN_FLIGHT.items() if ref() is None]:
        del _IN_FLIGHT[key]  # buffers gone since: their ids may be reused
    _IN_FLIGHT[id(buffer)] = (weakref.ref(buffer), event)


def _moved(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None) -> torch.Tensor:
    """``tensor.to``, but a padded view of a reused slot goes to a GPU row by row (each row is
    contiguous: no staging copy of the view), and its buffer is marked busy until the copy ends."""
    if device.type != "cuda" or tensor.device.type != "cpu" or tensor._base is None:
        return tensor.to(device=device, dtype=dtype, non_blocking=True)
    if tensor.is_contiguous():
        out = tensor.to(device=device, non_blocking=True)
    else:
        out = torch.empty(tensor.shape, dtype=tensor.dtype, device=device)
        for row in range(tensor.shape[0]):
            out[row].copy_(tensor[row], non_blocking=True)
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))  # the stream the copies ran on: the target's
    mark_in_flight(tensor._base, event)
    return out if dtype is None else out.to(dtype)


def validate_sample(sample: Mapping[str, torch.Tensor], hidden_size: int | None = None) -> int:
    """Check one sample's names, ranks and widths; return its length. ``PayloadError`` if bad."""
    missing = [name for name in FEATURE_NAMES if name not in sample]
    if missing:
        raise PayloadError(f"sample is missing tensors {missing}")
    ids, mask = sample[INPUT_IDS], sample[LOSS_MASK]
    aux, final = sample[AUX_HIDDEN], sample[FINAL_HIDDEN]
    if ids.dim() != 1 or mask.dim() != 1 or aux.dim() != 2 or final.dim() != 2:
        raise PayloadError(
            "expected input_ids (L,), loss_mask (L,), aux_hidden_states (L, 3H), "
            f"final_hidden_states (L, H); got {tuple(ids.shape)}, {tuple(mask.shape)}, "
            f"{tuple(aux.shape)}, {tuple(final.shape)}"
        )
    length = ids.shape[0]
    if length == 0:
        raise PayloadError("sample has no tokens")
    if {mask.shape[0], aux.shape[0], final.shape[0]} != {length}:
        raise PayloadError(
            f"lengths disagree: input_ids {length}, loss_mask {mask.shape[0]}, "
            f"aux {aux.shape[0]}, final {final.shape[0]}"
        )
    width = final.shape[1]
    if aux.shape[1] != 3 * width:
        raise PayloadError(f"aux width {aux.shape[1]} != 3 x final width {width}")
    if hidden_size is not None and width != hidden_size:
        raise PayloadError(f"hidden size {width} != the target's {hidden_size}")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise PayloadError(f"input_ids must be integers, got {ids.dtype}")
    return length


def collate(
    samples: Sequence[Mapping[str, torch.Tensor]],
    *,
    max_length: int | None = None,
    dtype: torch.dtype | None = None,
    hidden_size: int | None = None,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Batch:
    """Right-pad samples to the longest (after truncation to ``max_length``) with zeros.

    ``dtype`` casts the hidden states (default: as captured, which must agree across samples).
    ``out``: reused ``[B, capacity, 3H]`` and ``[B, capacity, H]`` buffers for the hidden states
    (see :mod:`pipeline.train.slots`), used where they fit; rows a reader filled in place are not copied.
    """
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    lengths = [validate_sample(s, hidden_size) for s in samples]
    widths = {s[FINAL_HIDDEN].shape[1] for s in samples}
    if len(widths) != 1:
        raise PayloadError(f"samples of one batch have different hidden sizes {sorted(widths)}")
    width = widths.pop()
    if max_length is not None:
        if max_length < 1:
            raise ValueError("max_length must be positive")
        lengths = [min(n, max_length) for n in lengths]
    hidden_dtypes = {s[AUX_HIDDEN].dtype for s in samples} | {s[FINAL_HIDDEN].dtype for s in samples}
    if dtype is None:
        if len(hidden_dtypes) != 1:
            raise PayloadError(f"mixed hidden-state dtypes {sorted(map(str, hidden_dtypes))}")
        dtype = hidden_dtypes.pop()
    batch, seq = len(samples), max(lengths)
    input_ids = torch.zeros(batch, seq, dtype=torch.long)
    loss_mask = torch.zeros(batch, seq, dtype=torch.long)
    attention_mask = torch.zeros(batch, seq, dtype=torch.long)
    reuse = out is not None and _fits(out, batch, seq, width, dtype)
    if reuse:
        aux, final = out[0][:batch, :seq], out[1][:batch, :seq]  # padded views: rows stay contiguous
    else:
        aux = torch.zeros(batch, seq, 3 * width, dtype=dtype)
        final = torch.zeros(batch, seq, width, dtype=dtype)
    for row, (sample, n) in enumerate(zip(samples, lengths)):
        input_ids[row, :n] = sample[INPUT_IDS][:n].to(torch.long)
        loss_mask[row, :n] = (sample[LOSS_MASK][:n] != 0).to(torch.long)
        loss_mask[row, n - 1] = 0
        attention_mask[row, :n] = 1
        for name, dst in ((AUX_HIDDEN, aux), (FINAL_HIDDEN, final)):
            src = sample[name]
            if src.data_ptr() != dst[row].data_ptr() or src.dtype != dtype:  # not read in place
                dst[row, :n] = src[:n].to(dtype)
            if reuse:
                dst[row, n:] = 0  # the previous batch's rows: padding must be zeros
    return Batch(
        input_ids=input_ids,
        loss_mask=loss_mask,
        attention_mask=attention_mask,
        aux_hidden_states=aux,
        final_hidden_states=final,
        lengths=torch.tensor(lengths, dtype=torch.long),
    )


def _fits(out: tuple[torch.Tensor, torch.Tensor], batch: int, seq: int, width: int, dtype: torch.dtype) -> bool:
    aux, final = out
    return (
        aux.dtype == final.dtype == dtype
        and aux.shape[0] >= batch
        and aux.shape[1] >= seq
        and tuple(aux.shape[2:]) == (3 * width,)
        and tuple(final.shape[:2]) == tuple(aux.shape[:2])
        and tuple(final.shape[2:]) == (width,)
    )
