"""Checkpoints every rank agrees on: which one to resume from, and writing one with all ranks' state.

Rank 0 picks the checkpoint to resume (so every rank restores the same one) and broadcasts it.
A new checkpoint gathers every rank's stream state, counts, RNG and consumed feature uris to
rank 0, which flushes the ledger, writes the checkpoint, commits the trainer group's offsets
(advisory) and applies the retention policy; then every rank learns the outcome, so a failed
write stops them all instead of leaving some waiting in a collective.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from pipeline.core.errors import BrokerError, RunMismatchError, StreamError
from pipeline.core.messages import LedgerStep
from pipeline.core.progress import StreamState
from pipeline.train.checkpoint import CheckpointInfo, LoadedCheckpoint, config_hash
from pipeline.train.ckpt_objects import open_checkpoints
from pipeline.train.config import TrainerSettings
from pipeline.train.distributed import DistContext
from pipeline.train.draft import Eagle3Draft
from pipeline.train.retention import apply_retention
from pipeline.train.rng import rng_state, set_rng_state

__all__ = ("LedgerSink", "CommitOffsets", "Resumed", "CheckpointCoordinator", "trainable_state")

logger = logging.getLogger(__name__)


class LedgerSink(Protocol):
    """Where rank 0 writes one ledger record per step (the live ledger topic, or nothing)."""

    def write(self, record: LedgerStep) -> None: ...

    def flush(self, timeout_s: float = 30.0) -> None: ...


#: Rank 0's advisory group commit: ``(next offsets, step, ended partitions)``.
CommitOffsets = Callable[[dict[int, int], int, frozenset[int]], None]


def trainable_state(draft: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights a checkpoint holds: only the trainable ones (the embedding is the target's)."""
    return {name: p.detach() for name, p in draft.named_parameters() if p.requires_grad}


@dataclass(frozen=True)
class Resumed:
    """Where a restored rank stands: the checkpoint, its step, this rank's counts and stream."""

    info: CheckpointInfo
    step: int
    trained: int
    tail: int
    state: StreamState


class CheckpointCoordinator:
    """One rank's side of choosing, restoring and writing checkpoints that all ranks share.

    :param resume_config: the settings a checkpoint must match to be resumed
    :param ledger: rank 0's ledger sink, flushed before a checkpoint publishes
    :param commit_offsets: rank 0's advisory group commit
    :param delete_feature: deletes one feature file by uri, for retention ``delete``
    """

    def __init__(
        self,
        config: TrainerSettings,
        *,
        dist: DistContext,
        draft: Eagle3Draft,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        partitions: list[int],
        resume_config: dict[str, Any],
        ledger: LedgerSink | None,
        commit_offsets: CommitOffsets | None,
        delete_feature: Callable[[str], None] | None,
    ) -> None:
        self.config = config
        self.dist = dist
        self.draft = draft
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.partitions = partitions
        self.resume_config = resume_config
        self.ledger = ledger
        self.commit_offsets = commit_offsets
        self.delete_feature = delete_feature
        self.manager = open_checkpoints(
            config.checkpoint_dir, keep_last=config.keep_last, storage_options=config.output_options
        )

    def choose(self) -> CheckpointInfo | None:
        """Rank 0 picks (so every rank resumes the same one) and broadcasts."""
        choice: str | None = None
        error: str | None = None
        if self.dist.is_main:
            self.manager.sweep_temp()
            resume = self.config.resume
            latest = self.manager.latest()
            if resume == "never":
                if latest is not None:
                    error = (
                        f"{self.config.checkpoint_dir} already holds checkpoints (latest {latest.name}) and "
                        "resume is 'never': use another checkpoint directory or resume 'auto'"
                    )
            elif resume in ("auto", "required"):
                if latest is None and resume == "required":
                    error = f"resume is 'required' but {self.config.checkpoint_dir} holds no checkpoint"
                choice = str(latest.path) if latest else None
            else:
                choice = str(resume)
        choice, error = self.dist.broadcast_object((choice, error))
        if error:
            raise RunMismatchError(error)
        if choice is None:
            return None
        found = self.manager.find(choice)
        if found is not None:
            return found
        raise RunMismatchError(
            f"no complete checkpoint at {choice} (checkpoints must live in {self.config.checkpoint_dir})"
        )

    def restore(self, info: CheckpointInfo) -> Resumed:
        """Load weights, optimizer, scheduler and RNG; return where this rank's stream stood."""
        rank = self.dist.rank
        loaded: LoadedCheckpoint = self.manager.load(
            info, config=self.resume_config, world_size=self.dist.world_size, device=self.dist.device
        )
        expected = set(trainable_state(self.draft))
        if set(loaded.model) != expected:
            raise RunMismatchError(
                f"checkpoint {info.path} holds weights {sorted(set(loaded.model) ^ expected)} that do not "
                "match the draft's trainable parameters"
            )
        self.draft.load_state_dict(loaded.model, strict=False)
        self.optimizer.load_state_dict(loaded.state["optimizer"])
        self.scheduler.load_state_dict(loaded.state["scheduler"])
        set_rng_state(loaded.state["rng"][rank], self.dist.device)
        rank_meta = loaded.meta["ranks"][rank]
        if sorted(rank_meta["partitions"]) != self.partitions:
            raise RunMismatchError(
                f"rank {rank} read partitions {rank_meta['partitions']} in {info.path}, now {self.partitions}"
            )
        logger.info("rank %d resumed from %s at step %d", rank, info.path, loaded.step)
        return Resumed(
            info=info,
            step=loaded.step,
            trained=int(rank_meta["trained"]),
            tail=int(rank_meta.get("tail", 0)),
            state=StreamState.from_json(rank_meta["stream"]),
        )

    def save(
        self, *, step: int, end: bool, state: StreamState, trained: int, tail: int, interval: list[str]
    ) -> CheckpointInfo:
        """Gather every rank's state; rank 0 writes, commits offsets, applies retention; all agree."""
        payload = {
            "rank": self.dist.rank,
            "partitions": self.partitions,
            "stream": state.to_json(),
            "trained": trained,
            "tail": tail,
            "interval": list(interval),
            "rng": rng_state(self.dist.device),
        }
        gathered = self.dist.all_gather_object(payload)
        outcome: tuple[CheckpointInfo | None, str | None] = (None, None)
        error: BaseException | None = None
        if self.dist.is_main:
            try:
                outcome = (self._write(step, gathered, end=end), None)
            except Exception as exc:  # every rank must learn of it, not wait in a barrier
                logger.debug("checkpoint at step %d failed", step, exc_info=True)  # re-raised below
                outcome, error = (None, f"{type(exc).__name__}: {exc}"), exc
        info, message = self.dist.broadcast_object(outcome)
        if message is not None or info is None:
            if error is not None:
                raise error
            raise StreamError(f"rank 0 could not write the checkpoint at step {step}: {message}")
        return info

    def _write(self, step: int, gathered: list[dict[str, Any]], *, end: bool) -> CheckpointInfo:
        if self.ledger is not None:
            self.ledger.flush()  # the ledger covers every step up to the checkpoint before it publishes
        ranks = [
            {k: v for k, v in g.items() if k not in ("rng", "interval")}
            for g in sorted(gathered, key=lambda g: g["rank"])
        ]
        meta = {
            "config": self.resume_config,
            "config_hash": config_hash(self.resume_config),
            "world_size": self.dist.world_size,
            "run_id": self.config.run_id,
            "ranks": ranks,
            "samples_trained": sum(int(r["trained"]) for r in ranks),
        }
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": [g["rng"] for g in sorted(gathered, key=lambda g: g["rank"])],
        }
        interval = [uri for g in gathered for uri in g["interval"]]
        info = self.manager.save(
            step, end=end, model=trainable_state(self.draft), state=state, meta=meta, interval=interval
        )
        if self.commit_offsets is not None:
            states = [StreamState.from_json(r["stream"]) for r in ranks]
            positions = {p: o for s in states for p, o in s.positions.items()}
            ended = frozenset(p for s in states for p, st in s.partitions.items() if st.get("marker"))
            try:
                self.commit_offsets(positions, step, ended)
            except BrokerError:
                raise  # the broker stayed away past the outage budget: the stage stops (and resumes from here)
            except Exception as exc:  # advisory (monitoring, lag): the checkpoint holds the truth
                logger.warning("committing the trainer group offsets at step %d failed (advisory): %s", step, exc)
        delete = self.delete_feature if self.delete_feature is not None else (lambda uri: None)
        policy = self.config.retention if self.delete_feature is not None else "retain"
        try:
            apply_retention(self.manager, policy, delete)
        except Exception:  # housekeeping: idempotent, retried after the next checkpoint
            logger.warning(
                "retention after step %d failed; retried at the next checkpoint", step, exc_info=True
            )
        return info
