"""Draft vocabulary mapping (EAGLE3 ``d2t`` / ``t2d``), built from supervised token counts.

The draft predicts over ``Vd`` of the target's ``V`` ids: the ``Vd`` ids seen most often at
``loss_mask == 1`` positions, ties broken by ascending id, padded with unseen ids ``0, 1, 2, ...``
when fewer than ``Vd`` distinct ids were seen, then sorted ascending. ``d2t[i]`` is an *offset*
(target id = ``i + d2t[i]``), ``t2d`` a boolean membership mask over the target vocabulary, so
``Z[..., t2d]`` yields target logits in draft-id order. The map is frozen before training and
shared by every trainer rank; the served ``d2t`` must be the one the draft's ``lm_head`` was
trained against, so it is saved as a safetensors file (never pickled) with a fingerprint.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Union

import fsspec
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from pipeline.core.errors import ConfigError, PayloadError

__all__ = ("TokenCounter", "VocabMapping", "build_vocab_mapping", "count_tokens")

logger = logging.getLogger(__name__)

CountsLike = Union["TokenCounter", torch.Tensor, Mapping[int, int]]


def _as_long_1d(values: Any, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(values)
    if tensor.dim() != 1:
        raise PayloadError(f"{name} must be 1-D, got shape {tuple(tensor.shape)}")
    return tensor.to(torch.long)


class TokenCounter:
    """Accumulates how often each token id is supervised; fed sample by sample by the source.

    Counts live in a dense int64 tensor that grows to the largest id seen, so merging counters
    from several source workers is an addition.
    """

    def __init__(self, vocab_size: int | None = None) -> None:
        self._counts = torch.zeros(vocab_size or 0, dtype=torch.long)
        self.samples = 0

    def update(self, input_ids: Any, loss_mask: Any) -> None:
        """Count the ids of one sample at positions where ``loss_mask`` is non-zero."""
        ids = _as_long_1d(input_ids, "input_ids")
        mask = _as_long_1d(loss_mask, "loss_mask")
        if ids.shape != mask.shape:
            raise PayloadError(
                f"input_ids has {ids.numel()} tokens but loss_mask has {mask.numel()}"
            )
        supervised = ids[mask != 0]
        if supervised.numel():
            if int(supervised.min()) < 0:
                raise PayloadError("negative token id in input_ids")
            self._counts = _add_counts(self._counts, torch.bincount(supervised))
        self.samples += 1

    def merge(self, other: TokenCounter) -> TokenCounter:
        """Add another counter's counts into this one (e.g. from another source worker)."""
        self._counts = _add_counts(self._counts, other._counts)
        self.samples += other.samples
        return self

    @property
    def counts(self) -> torch.Tensor:
        """int64 counts indexed by token id (length = largest id seen + 1, or the given size)."""
        return self._counts.clone()

    @property
    def total(self) -> int:
        return int(self._counts.sum())

    @property
    def num_distinct(self) -> int:
        return int((self._counts > 0).sum())


def _add_counts(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    size = max(a.numel(), b.numel())
    out = torch.zeros(size, dtype=torch.long)
    out[: a.numel()] += a
    out[: b.numel()] += b
    return out


def _dense_counts(counts: CountsLike, target_vocab_size: int) -> torch.Tensor:
    if isinstance(counts, TokenCounter):
        dense = counts.counts
    elif isinstance(counts, torch.Tensor):
        dense = counts.detach().to("cpu", torch.long).flatten()
    else:
        dense = torch.zeros(target_vocab_size, dtype=torch.long)
        for token, count in counts.items():
            if not 0 <= int(token) < target_vocab_size:
                raise ConfigError(
                    "vocab", f"token id {token} is outside the target vocabulary of "
                    f"{target_vocab_size}", "count with the target's tokenizer"
                )
            dense[int(token)] += int(count)
    if dense.numel() > target_vocab_size and bool((dense[target_vocab_size:] > 0).any()):
        raise ConfigError(
            "vocab",
            f"token counts include id {int(torch.nonzero(dense).max())} >= target vocab size "
            f"{target_vocab_size}",
            "count with the target's tokenizer and pass the target config's vocab_size",
        )
    out = torch.zeros(target_vocab_size, dtype=torch.long)
    n = min(dense.numel(), target_vocab_size)
    out[:n] = dense[:n]
    if bool((out < 0).any()):
        raise ConfigError("vocab", "token counts must be non-negative")
    return out


@dataclass(frozen=True, eq=False)
class VocabMapping:
    """``d2t`` int64 ``[Vd]`` offsets and ``t2d`` bool ``[V]`` membership, kept consistent."""

    d2t: torch.Tensor
    t2d: torch.Tensor

    def __post_init__(self) -> None:
        d2t, t2d = self.d2t, self.t2d
        if d2t.dtype != torch.long or d2t.dim() != 1:
            raise PayloadError(f"d2t must be int64 [Vd], got {d2t.dtype} {tuple(d2t.shape)}")
        if t2d.dtype != torch.bool or t2d.dim() != 1:
            raise PayloadError(f"t2d must be bool [V], got {t2d.dtype} {tuple(t2d.shape)}")
        hot = torch.arange(d2t.numel()) + d2t.cpu()
        if not torch.equal(hot, torch.nonzero(t2d.cpu()).flatten()):
            raise PayloadError("d2t and t2d disagree: arange(Vd) + d2t != nonzero(t2d)")

    @property
    def draft_vocab_size(self) -> int:
        return self.d2t.numel()

    @property
    def target_vocab_size(self) -> int:
        return self.t2d.numel()

    @property
    def hot_token_ids(self) -> torch.Tensor:
        """Target id of every draft id (SGLang's ``hot_token_id``), ascending."""
        return torch.arange(self.d2t.numel(), device=self.d2t.device) + self.d2t

    def to_target(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """Map draft ids to target ids."""
        return draft_ids + self.d2t.to(draft_ids.device)[draft_ids]

    def fingerprint(self) -> str:
        """Short content hash, for manifests: two runs with equal maps have equal fingerprints."""
        digest = hashlib.blake2b(digest_size=8)
        digest.update(str(self.target_vocab_size).encode())
        digest.update(self.hot_token_ids.cpu().numpy().tobytes())
        return digest.hexdigest()

    def to_bytes(self) -> bytes:
        return st_save(
            {"d2t": self.d2t.cpu().contiguous(), "t2d": self.t2d.cpu().contiguous()},
            metadata={"format": "specstream.vocab_mapping/1", "fingerprint": self.fingerprint()},
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> VocabMapping:
        try:
            tensors = st_load(data)
        except Exception as exc:  # safetensors raises its own error type for a bad header
            raise PayloadError(f"not a safetensors vocab mapping: {exc}") from None
        missing = {"d2t", "t2d"} - tensors.keys()
        if missing:
            raise PayloadError(f"vocab mapping is missing {sorted(missing)}")
        return cls(d2t=tensors["d2t"], t2d=tensors["t2d"])

    def save(self, url: str) -> None:
        """Write to a local path or any fsspec URL (one PUT on object stores)."""
        with fsspec.open(str(url), "wb") as handle:
            handle.write(self.to_bytes())
        logger.info("saved vocab mapping %s (Vd=%d) to %s", self.fingerprint(),
                    self.draft_vocab_size, url)

    @classmethod
    def load(cls, url: str, storage_options: Mapping[str, Any] | None = None) -> VocabMapping:
        """Read from a local path or any fsspec URL (``storage_options``: the storage root's)."""
        with fsspec.open(str(url), "rb", **dict(storage_options or {})) as handle:
            return cls.from_bytes(handle.read())


def build_vocab_mapping(
    counts: CountsLike, target_vocab_size: int, draft_vocab_size: int
) -> VocabMapping:
    """Pick the ``Vd`` most supervised ids (ties by ascending id, unseen ids 0,1,2.. as padding)."""
    if not 0 < draft_vocab_size <= target_vocab_size:
        raise ConfigError(
            "draft_vocab_size",
            f"{draft_vocab_size} must be in 1..{target_vocab_size} (the target vocab size)",
        )
    dense = _dense_counts(counts, target_vocab_size)
    # A stable descending sort over ids 0..V-1 orders equal counts by ascending id, which is both
    # the tie rule and the padding rule (unseen ids all have count 0 and come in id order).
    order = torch.sort(dense, descending=True, stable=True).indices
    used = torch.sort(order[:draft_vocab_size]).values
    seen = int((dense > 0).sum())
    if seen < draft_vocab_size:
        logger.warning(
            "only %d distinct supervised ids for a draft vocab of %d: padding with unseen ids",
            seen, draft_vocab_size,
        )
    t2d = torch.zeros(target_vocab_size, dtype=torch.bool)
    t2d[used] = True
    d2t = used - torch.arange(draft_vocab_size)
    covered = int(dense[used].sum())
    total = int(dense.sum())
    if total:
        logger.info("draft vocab covers %.4f of %d supervised tokens", covered / total, total)
    return VocabMapping(d2t=d2t, t2d=t2d)


def count_tokens(samples: Iterable[tuple[Any, Any]], vocab_size: int | None = None) -> TokenCounter:
    """Convenience: count an iterable of ``(input_ids, loss_mask)`` pairs."""
    counter = TokenCounter(vocab_size)
    for ids, mask in samples:
        counter.update(ids, mask)
    return counter
