"""Training-time test (TTT): the EAGLE3 draft unrolled K steps on ground-truth tokens.

Alignment (the one left shift, applied here and only here; the stream is unshifted). For step k
and query position i of a sample ``x[0..L-1]``:

* input token ``x[i+k+1]`` (zero past the end); input hidden ``fc(aux[i])`` at k=0, else the
  draft's own pre-norm ``h2`` at (i, k-1); RoPE position ``i+k``;
* teacher ``Z[i+k+1] = lm_head_target(final[i+k+1])``, the distribution of ``x[i+k+2]``;
* supervised iff ``loss_mask[i+k] == 1`` and the teacher's full-vocab argmax is in the draft vocab.

Loss per step: ``(1/(B*T)) * sum(pm * soft-CE(q, draft))`` in fp32 (the denominator counts every
position, padding included, for parity with SpecForge), total ``sum_k decay^k * loss_k``.
Metrics are returned as sums (numerators and denominators) so data-parallel ranks all-reduce
sums and never average ratios.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.train.attention import AttentionImpl, KVSteps
from pipeline.train.collate import Batch
from pipeline.train.draft import Eagle3Draft

__all__ = (
    "DEFAULT_TTT_LENGTH",
    "DEFAULT_DECAY",
    "Teacher",
    "StepTargets",
    "TTTStats",
    "TTTResult",
    "shift_left",
    "compute_teacher",
    "step_targets",
    "ttt_forward",
    "ttt_loss",
    "score_step",
    "simulated_acceptance_length",
)

DEFAULT_TTT_LENGTH = 7
DEFAULT_DECAY = 0.8


def shift_left(x: torch.Tensor, n: int, fill: float | int | bool = 0) -> torch.Tensor:
    """``out[:, t] = x[:, t+n]`` along dim 1, ``fill`` past the end."""
    if n == 0:
        return x
    length = x.shape[1]
    pad = x.new_full((x.shape[0], min(n, length), *x.shape[2:]), fill)
    return torch.cat([x[:, n:], pad], dim=1)


@dataclass(frozen=True)
class Teacher:
    """The target's view at every *unshifted* position t (the distribution of ``x[t+1]``).

    Rows are padded on the right by ``pad`` filler rows so that every TTT step reads a view.
    """

    target_ids: torch.Tensor  # [B, T+pad] int64: argmax over the full vocabulary of Z[t]
    log_q: torch.Tensor  # [B, T+pad, Vd] fp32: log_softmax(Z[t][t2d]) (renormalised)
    log_draft_mass: torch.Tensor  # [B, T+pad] fp32: logsumexp(Z[t][t2d]) - logsumexp(Z[t])
    in_draft: torch.Tensor  # [B, T+pad] bool: t2d[target_ids]
    length: int  # T

    def rows(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows ``k+1 .. k+T`` (the teacher of TTT step k), as views where the padding allows."""
        start, stop = k + 1, k + 1 + self.length
        if stop > self.target_ids.shape[1]:
            raise ValueError(f"teacher was padded for fewer than {k + 1} TTT steps")
        return (self.target_ids[:, start:stop], self.log_q[:, start:stop],
                self.log_draft_mass[:, start:stop], self.in_draft[:, start:stop])


@torch.no_grad()
def compute_teacher(
    final_hidden_states: torch.Tensor,
    lm_head_weight: torch.Tensor,
    t2d: torch.Tensor,
    *,
    num_steps: int = DEFAULT_TTT_LENGTH,
    chunk_rows: int = 2048,
) -> Teacher:
    """Apply the frozen target lm_head to ``final [B,T,H]`` and restrict to the draft vocab.

    Full-vocab logits are materialised ``chunk_rows`` positions at a time (fp32) to bound memory.
    """
    batch, length, hidden = final_hidden_states.shape
    device = final_hidden_states.device
    weight = lm_head_weight.to(device)
    t2d = t2d.to(device)
    hot = torch.nonzero(t2d).flatten()  # draft ids -> target ids, ascending (one sync per call)
    draft_vocab = hot.numel()
    rows = final_hidden_states.reshape(-1, hidden)
    target_ids = torch.empty(rows.shape[0], dtype=torch.long, device=device)
    log_q = torch.empty(rows.shape[0], draft_vocab, dtype=torch.float32, device=device)
    log_mass = torch.empty(rows.shape[0], dtype=torch.float32, device=device)
    for start in range(0, rows.shape[0], chunk_rows):
        part = slice(start, start + chunk_rows)
        logits = F.linear(rows[part].to(weight.dtype), weight).float()
        restricted = logits.index_select(1, hot)
        target_ids[part] = logits.argmax(dim=-1)
        log_q[part] = torch.log_softmax(restricted, dim=-1)
        log_mass[part] = torch.logsumexp(restricted, dim=-1) - torch.logsumexp(logits, dim=-1)
    def padded(x: torch.Tensor, fill: float | int | bool) -> torch.Tensor:
        """Flat ``[B*T, ...]`` -> ``[B, T + num_steps, ...]`` with filler rows."""
        x = x.view(batch, length, *x.shape[1:])
        return torch.cat([x, x.new_full((batch, num_steps, *x.shape[2:]), fill)], dim=1)

    return Teacher(
        target_ids=padded(target_ids, 0),
        log_q=padded(log_q, -math.log(draft_vocab)),
        log_draft_mass=padded(log_mass, 0.0),
        in_draft=padded(t2d[target_ids], False),
        length=length,
    )


@dataclass(frozen=True)
class StepTargets:
    """Everything TTT step k is fed and judged on, aligned per query position i."""

    input_ids: torch.Tensor  # [B,T]: x[i+k+1]
    loss_mask: torch.Tensor  # [B,T]: loss_mask[i+k] (the accuracy denominator)
    position_mask: torch.Tensor  # [B,T] bool: loss_mask[i+k] and teacher argmax in draft vocab
    target_ids: torch.Tensor  # [B,T]: argmax_V Z[i+k+1]
    log_q: torch.Tensor  # [B,T,Vd]: renormalised teacher on the draft vocab
    log_draft_mass: torch.Tensor  # [B,T]: log of the teacher's probability mass on the draft vocab


def step_targets(batch: Batch, teacher: Teacher, k: int) -> StepTargets:
    """What TTT step ``k`` predicts: the inputs, masks and teacher rows shifted ``k`` ahead."""
    target_ids, log_q, log_mass, in_draft = teacher.rows(k)
    loss_mask = shift_left(batch.loss_mask, k, 0)
    return StepTargets(
        input_ids=shift_left(batch.input_ids, k + 1, 0),
        loss_mask=loss_mask,
        position_mask=in_draft & (loss_mask != 0),
        target_ids=target_ids,
        log_q=log_q,
        log_draft_mass=log_mass,
    )


def _unroll(
    draft: Eagle3Draft,
    input_ids: torch.Tensor,
    aux_hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None,
    num_steps: int,
    attention: AttentionImpl,
) -> Iterator[torch.Tensor]:
    """Yield the logits of steps 0..K-1; gradients flow through every ``h`` and cached key."""
    if num_steps < 1:
        raise ValueError("num_steps must be at least 1")
    length = input_ids.shape[1]
    positions = torch.arange(length, device=input_ids.device)
    padding = None if attention_mask is None else attention_mask != 0
    hidden = draft.project(aux_hidden_states)
    cache = KVSteps()
    for k in range(num_steps):
        tokens = shift_left(input_ids, k + 1, 0)
        logits, hidden = draft(tokens, hidden, positions + k, cache, padding, attention)
        yield logits


def ttt_forward(
    draft: Eagle3Draft,
    input_ids: torch.Tensor,
    aux_hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    num_steps: int = DEFAULT_TTT_LENGTH,
    attention: AttentionImpl = "cached",
) -> list[torch.Tensor]:
    """Draft logits ``[B,T,Vd]`` of every TTT step, from *unshifted* ids and aux features."""
    return list(_unroll(draft, input_ids, aux_hidden_states, attention_mask, num_steps, attention))


_FIELDS = ("loss_sum", "positions", "correct", "acc_tokens", "accept_sum", "supervised")


@dataclass(frozen=True)
class TTTStats:
    """Per-step sums ``[K, 6]`` (float64): add across micro-batches, all-reduce across ranks.

    Columns: ``loss_sum`` (sum of pm * CE), ``positions`` (B*T), ``correct`` and ``acc_tokens``
    (accuracy numerator/denominator), ``accept_sum`` and ``supervised`` (acceptance-rate
    numerator/denominator; ``supervised`` is the position-mask count).
    """

    sums: torch.Tensor

    FIELDS = _FIELDS

    def __add__(self, other: TTTStats) -> TTTStats:
        return TTTStats(self.sums + other.sums.to(self.sums.device))

    def all_reduced(self, group: object | None = None) -> TTTStats:
        """Sum over data-parallel ranks (a no-op without an initialised process group)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return self
        total = self.sums.clone()
        torch.distributed.all_reduce(total, group=group)
        return TTTStats(total)

    def _ratio(self, num: str, den: str) -> list[float]:
        n, d = self.sums[:, _FIELDS.index(num)], self.sums[:, _FIELDS.index(den)]
        return [float(a / b) if b > 0 else 0.0 for a, b in zip(n.tolist(), d.tolist())]

    def column(self, name: str) -> list[float]:
        return self.sums[:, _FIELDS.index(name)].tolist()

    def ploss(self) -> list[float]:
        return self._ratio("loss_sum", "positions")

    def acc(self) -> list[float]:
        return self._ratio("correct", "acc_tokens")

    def acceptance_rate(self) -> list[float]:
        return self._ratio("accept_sum", "supervised")

    def weighted_loss(self, decay: float = DEFAULT_DECAY) -> float:
        return sum(decay**k * loss for k, loss in enumerate(self.ploss()))

    def acceptance_length(self) -> float:
        return simulated_acceptance_length(self.acc())

    def summary(self, decay: float = DEFAULT_DECAY) -> dict[str, object]:
        return {
            "loss": self.weighted_loss(decay),
            "ploss": self.ploss(),
            "acc": self.acc(),
            "acceptance_rate": self.acceptance_rate(),
            "acceptance_length": self.acceptance_length(),
        }


@dataclass(frozen=True)
class TTTResult:
    """One batch's TTT loss (differentiable) and its detached statistics."""

    loss: torch.Tensor  # differentiable scalar: sum_k decay^k * step_losses[k]
    step_losses: list[torch.Tensor]  # differentiable ploss_k
    stats: TTTStats  # detached sums for logging and all-reduce


def simulated_acceptance_length(acc: Sequence[float]) -> float:
    """``sum_k prod_{m<=k} acc_m``: expected accepted drafts of a chain (no bonus token)."""
    total, running = 0.0, 1.0
    for value in acc:
        running *= value
        total += running
    return total


def score_step(
    logits: torch.Tensor, target: StepTargets, d2t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Score one TTT step: (differentiable ``sum(pm * CE)``, detached stats row of 6 sums).

    The stats row follows :attr:`TTTStats.FIELDS` except ``positions``, which the caller fills.
    """
    log_p = F.log_softmax(logits.float(), dim=-1)
    pm = target.position_mask.to(log_p.dtype)
    cross_entropy = -(target.log_q.exp() * log_p).sum(-1)
    loss_sum = (pm * cross_entropy).sum()
    with torch.no_grad():
        drafted = logits.argmax(dim=-1)
        lm = target.loss_mask != 0
        correct = ((drafted + d2t.to(drafted.device)[drafted]) == target.target_ids) & lm
        p_on_draft = (target.log_q + target.log_draft_mass[..., None]).exp()
        accept = torch.minimum(p_on_draft, log_p.exp()).sum(-1)
        row = torch.stack([
            loss_sum.detach().double(),
            torch.zeros((), dtype=torch.float64, device=log_p.device),
            correct.sum().double(),
            lm.sum().double(),
            (accept * pm).sum().double(),
            pm.sum().double(),
        ])
    return loss_sum, row


def ttt_loss(
    draft: Eagle3Draft,
    batch: Batch,
    teacher: Teacher,
    *,
    num_steps: int = DEFAULT_TTT_LENGTH,
    decay: float = DEFAULT_DECAY,
    attention: AttentionImpl = "cached",
) -> TTTResult:
    """Unroll ``num_steps`` draft steps on ``batch`` and score them against ``teacher``."""
    if teacher.length != batch.seq_len:
        raise ValueError(f"teacher covers {teacher.length} positions, batch has {batch.seq_len}")
    positions = batch.batch_size * batch.seq_len
    step_losses: list[torch.Tensor] = []
    rows: list[torch.Tensor] = []
    steps = _unroll(draft, batch.input_ids, batch.aux_hidden_states, batch.attention_mask,
                    num_steps, attention)
    for k, logits in enumerate(steps):
        loss_sum, row = score_step(logits, step_targets(batch, teacher, k), draft.d2t)
        row[_FIELDS.index("positions")] = positions
        step_losses.append(loss_sum / positions)
        rows.append(row)
    total = torch.stack([loss * decay**k for k, loss in enumerate(step_losses)]).sum()
    return TTTResult(loss=total, step_losses=step_losses, stats=TTTStats(torch.stack(rows)))
