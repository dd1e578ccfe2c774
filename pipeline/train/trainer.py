"""The data-parallel EAGLE3 trainer loop: lockstep steps, exact-resume checkpoints, ledger, summary.

Per optimizer step every rank (1) waits until it holds ``batch_size * grad_accum`` samples or its
stream ended, (2) votes, and one ``all_reduce(MIN)`` decides for all (:class:`Vote`): only a
unanimous READY trains, so every rank takes the same number of steps and no collective is left
waiting at the end of the stream, (3) runs TTT on its micro-batches, averages gradients over the
ranks, clips and steps, (4) gathers the ranks' sample ids and offsets to rank 0, which writes the
step's ledger record and metrics. Every ``save_interval`` steps, at a stop and at the end of the
stream it checkpoints (model, optimizer, scheduler, RNG, every rank's stream state), then commits
the trainer group's offsets with ``step=N`` and applies the retention policy.

The loop knows nothing of Kafka: it reads an :class:`~pipeline.train.dataset.ItemSource` opened
from a stream state, and reports through small sinks (ledger, offset commit, feature deletion).
:mod:`pipeline.train.runner` wires the live Kafka versions in.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from pipeline.core.errors import NonFiniteLossError, RunMismatchError, StreamError
from pipeline.core.faults import crash_point
from pipeline.core.messages import LedgerStep, PartitionOffset, RankProgress, StepMetrics, now
from pipeline.core.progress import StreamState
from pipeline.train.checkpoint import CheckpointInfo, CheckpointManager, LoadedCheckpoint, config_hash
from pipeline.train.config import LRSchedule, TrainerSettings
from pipeline.train.dataset import ItemSource, LockstepFeeder, MicroBatch, Prefetcher, SampleInfo
from pipeline.train.distributed import DistContext, Vote
from pipeline.train.draft import Eagle3Draft
from pipeline.train.metrics import MetricsLog, ProgressBar, RankTiming, StepRecord, ThroughputTotals
from pipeline.train.plot import plot_metrics_file
from pipeline.train.retention import apply_retention
from pipeline.train.ttt import TTTStats, compute_teacher, ttt_loss

__all__ = (
    "Trainer",
    "TrainResult",
    "RunCompleteness",
    "LedgerSink",
    "NonFiniteLossError",
    "trainable_state",
)

logger = logging.getLogger(__name__)



class LedgerSink(Protocol):
    def write(self, record: LedgerStep) -> None: ...

    def flush(self, timeout_s: float = 30.0) -> None: ...


OpenSource = Callable[[StreamState | None], ItemSource]
CommitOffsets = Callable[[dict[int, int], int, frozenset[int]], None]


@dataclass(frozen=True)
class RunCompleteness:
    """The end-of-stream accounting over all ranks (DESIGN 4.2)."""

    prompts: int  # distinct prompts: refs on the samples topic (less duplicates) + dropped upstream
    trained: int
    tail: int
    duplicates: int
    dead_letters: int  # rejected by the trainer + dropped upstream
    partitions_ended: int
    partitions: int

    @property
    def missing(self) -> int:
        return self.prompts - self.trained - self.tail - self.dead_letters

    def line(self) -> str:
        return (
            f"{self.trained} of {self.prompts} prompts trained, {self.missing} missing, "
            f"{self.duplicates} duplicates dropped, {self.tail} tail samples not stepped, "
            f"{self.dead_letters} dead letters"
        )

    def check(self) -> None:
        if self.partitions_ended != self.partitions:
            raise StreamError(
                f"{self.partitions - self.partitions_ended} partitions did not end: {self.line()}"
            )
        if self.missing != 0:
            raise StreamError(f"incomplete run: {self.line()}")

    @classmethod
    def combine(cls, ranks: list[dict[str, int]]) -> RunCompleteness:
        def total(key: str) -> int:
            return sum(int(r[key]) for r in ranks)

        return cls(
            prompts=total("expected") - total("duplicates") + total("dropped_upstream"),
            trained=total("trained"),
            tail=total("tail"),
            duplicates=total("duplicates"),
            dead_letters=total("rejected") + total("dropped_upstream"),
            partitions_ended=total("partitions_ended"),
            partitions=total("partitions"),
        )


@dataclass
class TrainResult:
    step: int
    samples_trained: int  # over all ranks, this run and the attempts it resumed
    reason: str  # "end_of_stream", "max_steps", "stopped"
    completeness: RunCompleteness | None = None
    checkpoint: str | None = None
    data_wait_frac: float = 0.0  # this rank's share of step time spent waiting for data
    metrics: list[StepRecord] = field(default_factory=list)


def trainable_state(draft: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in draft.named_parameters() if p.requires_grad}


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        kind, keys, pos, has_gauss, cached = numpy.random.get_state()
        state["numpy"] = (
            kind,
            torch.from_numpy(keys.astype("int64")),
            int(pos),
            int(has_gauss),
            float(cached),
        )
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"].cpu())
    random.setstate(_tuples(state["python"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)
    if "numpy" in state and "numpy" in sys.modules:
        import numpy  # noqa: PLC0415

        kind, keys, pos, has_gauss, cached = state["numpy"]
        numpy.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))


def _tuples(value: Any) -> Any:
    """``random.setstate`` wants tuples where a serializer may have produced lists."""
    if isinstance(value, (list, tuple)):
        return tuple(_tuples(v) for v in value)
    return value


def _offsets(state: StreamState) -> list[PartitionOffset]:
    return [
        PartitionOffset(
            partition=p,
            offset=state.positions[p],
            records=state.used.get(p, 0) + state.rejected.get(p, 0) + state.duplicates.get(p, 0),
        )
        for p in sorted(state.positions)
    ]


class Trainer:
    """One rank of the data-parallel trainer.

    :param draft: the model, already on ``dist.device`` and seeded identically on every rank
    :param lm_head: the target's frozen ``lm_head`` weight ``[V, Ht]`` (teacher logits)
    :param open_source: opens this rank's sample stream at a state (None: from the start)
    :param partitions: the samples partitions this rank reads
    :param num_partitions: partitions of the samples topic (all ranks)
    :param ledger: rank 0's ledger sink (None: no ledger)
    :param commit_offsets: rank 0's advisory group commit ``(next offsets, step, ended partitions)``
    :param delete_feature: deletes one feature file by uri, for retention ``delete``
    :param extra_resume_fields: more settings a checkpoint must match (draft shape, vocab map)
    """

    def __init__(
        self,
        config: TrainerSettings,
        *,
        draft: Eagle3Draft,
        lm_head: torch.Tensor,
        dist: DistContext,
        open_source: OpenSource,
        partitions: list[int],
        num_partitions: int,
        ledger: LedgerSink | None = None,
        commit_offsets: CommitOffsets | None = None,
        delete_feature: Callable[[str], None] | None = None,
        extra_resume_fields: dict[str, Any] | None = None,
    ) -> None:
        self.config = config
        self.draft = draft
        self.dist = dist
        self.device = dist.device
        self.lm_head = lm_head.to(self.device)
        self.open_source = open_source
        self.partitions = sorted(partitions)
        self.num_partitions = num_partitions
        self.ledger = ledger
        self.commit_offsets = commit_offsets
        self.delete_feature = delete_feature
        self.resume_config = {
            **config.resume_fields(),
            "world_size": dist.world_size,
            "partitions": num_partitions,
            **(extra_resume_fields or {}),
        }
        self.manager = CheckpointManager(config.checkpoint_dir, keep_last=config.keep_last)
        self.params = draft.trainable_parameters()
        self.optimizer = torch.optim.AdamW(
            self.params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, LRSchedule.from_config(config))
        self.step = 0
        self.trained_local = 0  # samples this rank stepped, over every attempt
        self.tail_local = 0
        self.state: StreamState | None = None  # stream state after the last stepped sample
        self._interval: list[str] = []  # feature uris consumed since the last checkpoint
        self._saved: CheckpointInfo | None = None
        self._resumed_end = False
        self.totals = ThroughputTotals()  # rank 0: every rank's timings
        self._own_step_s = 0.0  # this rank's own timings, for its exit log
        self._own_wait_s = 0.0
        self.records: list[StepRecord] = []

    # --- setup ---------------------------------------------------------------------------

    def _choose_checkpoint(self) -> CheckpointInfo | None:
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
        wanted = Path(choice).resolve()
        for info in self.manager.list():
            if info.path.resolve() == wanted:
                return info
        raise RunMismatchError(
            f"no complete checkpoint at {choice} (checkpoints must live in {self.config.checkpoint_dir})"
        )

    def _restore(self, info: CheckpointInfo) -> StreamState:
        loaded: LoadedCheckpoint = self.manager.load(
            info, config=self.resume_config, world_size=self.dist.world_size, device=self.device
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
        rng = loaded.state["rng"]
        _set_rng_state(rng[self.dist.rank], self.device)
        rank_meta = loaded.meta["ranks"][self.dist.rank]
        if sorted(rank_meta["partitions"]) != self.partitions:
            raise RunMismatchError(
                f"rank {self.dist.rank} read partitions {rank_meta['partitions']} in {info.path}, "
                f"now {self.partitions}"
            )
        self.step = loaded.step
        self.trained_local = int(rank_meta["trained"])
        self.tail_local = int(rank_meta.get("tail", 0))
        self._saved = info
        self._resumed_end = info.end
        state = StreamState.from_json(rank_meta["stream"])
        logger.info("rank %d resumed from %s at step %d", self.dist.rank, info.path, self.step)
        return state

    def _sync_initial_weights(self) -> None:
        """Every rank starts from rank 0's weights (seeding alone is not a guarantee across hosts)."""
        if not self.dist.distributed:
            return
        import torch.distributed as tdist  # noqa: PLC0415

        with torch.no_grad():
            for p in self.params:
                tdist.broadcast(p.data, src=0)

    # --- the loop ------------------------------------------------------------------------

    def run(self, stop: threading.Event | None = None) -> TrainResult:
        """Train until the stream ends, ``max_steps``, or ``stop``; always leaves a checkpoint."""
        stop = stop or threading.Event()
        cfg = self.config
        info = self._choose_checkpoint()
        if info is not None:
            self.state = self._restore(info)
        else:
            self._sync_initial_weights()
        try:
            source = self.open_source(self.state)
        except BaseException:
            self.dist.agree(Vote.FAILED)  # the other ranks are at their first vote: let them stop too
            raise
        prefetcher = Prefetcher(
            source,
            batch_size=cfg.batch_size,
            depth=cfg.prefetch,
            max_length=cfg.max_length,
            pin_memory=self.device.type == "cuda",
            check_ref=self._check_ref_factory(),
            name=f"prefetch-r{self.dist.rank}",
        ).start()
        feeder = LockstepFeeder(prefetcher, cfg.grad_accum)
        metrics = MetricsLog(cfg.metrics_path if self.dist.is_main else None)
        progress = ProgressBar(
            enabled=cfg.progress and self.dist.is_main, total=cfg.max_steps, initial=self.step
        )
        try:
            reason = self._loop(feeder, stop, metrics, progress)
            result = self._finish(reason, feeder)
        finally:
            progress.close()
            metrics.close()
            prefetcher.close()
        if self.dist.is_main and cfg.plot_path and cfg.metrics_path:
            try:
                plot_metrics_file(cfg.metrics_path, cfg.plot_path, title=f"{cfg.run_id}: draft training")
            except Exception:  # a plot must never fail a finished run
                logger.warning("could not plot the training curves", exc_info=True)
        return result

    def _loop(
        self, feeder: LockstepFeeder, stop: threading.Event, metrics: MetricsLog, progress: ProgressBar
    ) -> str:
        cfg = self.config
        if cfg.max_steps is not None and self.step >= cfg.max_steps:
            return "max_steps"
        while True:
            started = time.perf_counter()
            wait_before = feeder.wait_s
            vote = feeder.vote(stop)
            voted = time.perf_counter()
            decision = self.dist.agree(vote)
            sync_s = time.perf_counter() - voted
            if decision is Vote.FAILED:
                if feeder.error is not None:
                    raise feeder.error
                raise StreamError("another trainer rank failed reading its stream; see its log")
            if decision is Vote.STOP:
                return "stopped"
            if decision is Vote.ENDED:
                return "end_of_stream"
            micro = feeder.take()
            lr = float(self.scheduler.get_last_lr()[0])
            stats, grad_norm = self._train_step(micro)
            self.step += 1
            self.state = micro[-1].state
            samples = [s for m in micro for s in m.samples]
            self.trained_local += len(samples)
            self._interval.extend(s.uri for s in samples)
            summary = stats.all_reduced().summary(cfg.loss_decay)
            if not all(math.isfinite(x) for x in [summary["loss"], *summary["ploss"]]):
                raise NonFiniteLossError(f"step {self.step}: loss {summary['loss']} ({summary['ploss']})")
            timing = RankTiming(
                samples=len(samples),
                tokens=sum(s.num_tokens for s in samples),
                step_s=time.perf_counter() - started,
                wait_s=feeder.wait_s - wait_before,
                sync_s=sync_s,
                prepare_s=sum(m.prepare_s for m in micro),
            )
            self._own_step_s += timing.step_s
            self._own_wait_s += timing.wait_s
            gathered = self.dist.all_gather_object((self._progress(samples), timing))
            if self.dist.is_main:
                self._report(gathered, summary, lr, grad_norm, metrics, progress)
            crash_point("train.after_step")
            if cfg.save_interval and self.step % cfg.save_interval == 0:
                self._checkpoint(end=False)
            if cfg.max_steps is not None and self.step >= cfg.max_steps:
                return "max_steps"

    def _check_ref_factory(self) -> Callable[[Any], None]:
        checked: set[str] = set()
        config = self.draft.config

        def check(ref: Any) -> None:
            key = ref.target.model_dump_json()
            if key in checked:
                return
            config.check_target(
                aux_layer_ids=ref.target.aux_layer_ids,
                hidden_size=ref.target.hidden_size,
                vocab_size=ref.target.vocab_size,
            )
            checked.add(key)

        return check

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.config.bf16 and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _train_step(self, micro: list[MicroBatch]) -> tuple[TTTStats, float]:
        """Forward/backward every micro-batch, average gradients over ranks, clip, step."""
        cfg = self.config
        self.draft.train()
        stats: TTTStats | None = None
        for mb in micro:
            batch = mb.batch.to(self.device)
            teacher = compute_teacher(
                batch.final_hidden_states, self.lm_head, self.draft.t2d, num_steps=cfg.ttt_steps
            )
            with self._autocast():
                result = ttt_loss(self.draft, batch, teacher, num_steps=cfg.ttt_steps, decay=cfg.loss_decay)
            (result.loss / cfg.grad_accum).backward()
            stats = result.stats if stats is None else stats + result.stats
        for p in self.params:  # every rank all-reduces the same tensors, even unused ones
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.dist.all_reduce_mean_(p.grad for p in self.params)
        if cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        else:
            norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in self.params]))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        assert stats is not None
        return stats, float(norm)

    def _progress(self, samples: list[SampleInfo]) -> dict[str, Any]:
        assert self.state is not None
        return RankProgress(
            rank=self.dist.rank,
            sample_ids=[s.sample_id for s in samples],
            next_offsets=_offsets(self.state),
        ).model_dump()

    def _report(
        self,
        gathered: list[tuple[dict[str, Any], RankTiming]],
        summary: dict[str, Any],
        lr: float,
        grad_norm: float,
        metrics: MetricsLog,
        progress: ProgressBar,
    ) -> None:
        timings = [t for _, t in gathered]
        self.totals.add(timings)
        record = StepRecord.build(
            step=self.step,
            summary=summary,
            lr=lr,
            timings=timings,
            totals=self.totals,
            grad_norm=grad_norm,
            now=time.time(),
        )
        self.records.append(record)
        metrics.write(record)
        progress.update(record)
        if self.ledger is not None:
            self.ledger.write(
                LedgerStep(
                    run_id=self.config.run_id,
                    step=self.step,
                    epoch=self.config.epoch,
                    ranks=[RankProgress.model_validate(p) for p, _ in gathered],
                    metrics=StepMetrics(loss=record.loss, ploss=record.ploss, acc=record.acc),
                    lr=lr,
                    created_at=now(),
                )
            )
        logger.debug(
            "step %d loss %.4f acc0 %.3f", self.step, record.loss, record.acc[0] if record.acc else 0
        )

    # --- checkpoints ---------------------------------------------------------------------

    def _checkpoint(self, *, end: bool, extra: dict[str, int] | None = None) -> CheckpointInfo:
        """Gather every rank's state; rank 0 writes, commits offsets, applies retention; all agree."""
        assert self.state is not None
        payload = {
            "rank": self.dist.rank,
            "partitions": self.partitions,
            "stream": self.state.to_json(),
            "trained": self.trained_local,
            "tail": self.tail_local,
            "interval": list(self._interval),
            "rng": _rng_state(self.device),
            **(extra or {}),
        }
        gathered = self.dist.all_gather_object(payload)
        outcome: tuple[CheckpointInfo | None, str | None] = (None, None)
        error: BaseException | None = None
        if self.dist.is_main:
            try:
                outcome = (self._write_checkpoint(gathered, end=end), None)
            except Exception as exc:  # every rank must learn of it, not wait in a barrier
                logger.exception("checkpoint at step %d failed", self.step)
                outcome, error = (None, f"{type(exc).__name__}: {exc}"), exc
        info, message = self.dist.broadcast_object(outcome)
        if message is not None or info is None:
            if error is not None:
                raise error
            raise StreamError(f"rank 0 could not write the checkpoint at step {self.step}: {message}")
        self._interval = []
        self._saved = info
        return info

    def _write_checkpoint(self, gathered: list[dict[str, Any]], *, end: bool) -> CheckpointInfo:
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
            self.step, end=end, model=trainable_state(self.draft), state=state, meta=meta, interval=interval
        )
        if self.commit_offsets is not None:
            states = [StreamState.from_json(r["stream"]) for r in ranks]
            positions = {p: o for s in states for p, o in s.positions.items()}
            ended = frozenset(p for s in states for p, m in s.markers.items() if m)
            try:
                self.commit_offsets(positions, self.step, ended)
            except Exception:  # advisory (monitoring, lag): the checkpoint holds the truth
                logger.warning(
                    "committing the trainer group offsets at step %d failed", self.step, exc_info=True
                )
        delete = self.delete_feature if self.delete_feature is not None else (lambda uri: None)
        policy = self.config.retention if self.delete_feature is not None else "retain"
        try:
            apply_retention(self.manager, policy, delete)
        except Exception:  # housekeeping: idempotent, retried after the next checkpoint
            logger.warning(
                "retention after step %d failed; retried at the next checkpoint", self.step, exc_info=True
            )
        return info

    # --- the end -------------------------------------------------------------------------

    def _drain(self, feeder: LockstepFeeder) -> tuple[dict[str, int], int]:
        """Read this rank's stream to its end; count the tail; return this rank's accounting."""
        tail = feeder.drain(self.config.drain_timeout_s)
        assert tail.end is not None
        self.tail_local += len(tail.samples)
        self._interval.extend(s.uri for s in tail.samples)
        self.state = tail.end.state
        summary = tail.end.summary
        if self.trained_local + self.tail_local != summary.used:
            raise StreamError(
                f"rank {self.dist.rank}: {summary.used} samples read but {self.trained_local} trained "
                f"+ {self.tail_local} tail: the trainer lost track of samples"
            )
        mine = {
            "expected": summary.expected,
            "used": summary.used,
            "rejected": summary.rejected,
            "duplicates": summary.duplicates,
            "partitions_ended": summary.partitions_ended,
            "partitions": summary.partitions,
            "dropped_upstream": tail.end.dropped_upstream,
            "trained": self.trained_local,
            "tail": self.tail_local,
        }
        return mine, len(tail.samples)

    def _finish(self, reason: str, feeder: LockstepFeeder) -> TrainResult:
        result = TrainResult(step=self.step, samples_trained=0, reason=reason)
        if reason == "end_of_stream":
            error: BaseException | None = None
            try:
                mine, tail_count = self._drain(feeder)
            except Exception as exc:  # the other ranks learn of it in the gather below, then stop too
                error, mine, tail_count = exc, {"error": f"{type(exc).__name__}: {exc}"}, 0
            ranks = self.dist.all_gather_object(mine)
            failed = [f"rank {i}: {r['error']}" for i, r in enumerate(ranks) if "error" in r]
            if failed:
                if error is not None:
                    raise error
                raise StreamError("the end of the stream failed on " + "; ".join(failed))
            completeness = RunCompleteness.combine(ranks)
            result.completeness = completeness
            if not (self._resumed_end and self._saved is not None and self._saved.step == self.step):
                result.checkpoint = str(self._checkpoint(end=True).path)
            else:
                result.checkpoint = str(self._saved.path)
            logger.info(
                "rank %d ended at step %d with %d tail samples", self.dist.rank, self.step, tail_count
            )
            if self.dist.is_main:
                print(completeness.line(), flush=True)  # the run's summary line, for people and scripts
            completeness.check()
        else:
            if self.state is None:
                logger.info("%s before the first step: nothing to checkpoint", reason)
            elif self._saved is None or self._saved.step != self.step:
                result.checkpoint = str(self._checkpoint(end=False).path)
            else:
                result.checkpoint = str(self._saved.path)
            if self.dist.is_main:
                logger.info("%s at step %d; the stream is not finished", reason, self.step)
        totals = self.dist.all_gather_object(self.trained_local)
        result.samples_trained = sum(int(t) for t in totals)
        result.data_wait_frac = self._own_wait_s / self._own_step_s if self._own_step_s > 0 else 0.0
        result.metrics = list(self.records)
        return result
