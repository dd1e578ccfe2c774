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
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from pipeline.core.errors import NonFiniteLossError, StreamError
from pipeline.core.faults import crash_point
from pipeline.core.messages import SampleRef
from pipeline.core.progress import StreamState
from pipeline.train.checkpoint import CheckpointInfo
from pipeline.train.config import LRSchedule, TrainerSettings
from pipeline.train.dataset import ItemSource, LockstepFeeder, MicroBatch, Prefetcher, SampleInfo
from pipeline.train.distributed import DistContext, Vote
from pipeline.train.draft import Eagle3Draft
from pipeline.train.evaluate import Evaluator, eval_line
from pipeline.train.metrics import RankTiming, StepRecord
from pipeline.train.publish import OutputMirror
from pipeline.train.report import StepReporter, rank_progress
from pipeline.train.result import RunCompleteness, TrainResult
from pipeline.train.resume import CheckpointCoordinator, CommitOffsets, LedgerSink
from pipeline.train.ttt import TTTStats, compute_teacher, ttt_loss

__all__ = ("Trainer", "OpenSource")

logger = logging.getLogger(__name__)

#: Opens this rank's sample stream at a state (None: from the start).
OpenSource = Callable[[StreamState | None], ItemSource]


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
    :param source_letters: rank 0 asks it at the end of the stream: input lines the source dead-lettered
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
        source_letters: Callable[[], int] | None = None,
        evaluator: Evaluator | None = None,
    ) -> None:
        self.config = config
        self.evaluator = evaluator if dist.is_main else None  # rank 0 evaluates, between steps
        publish = config.publish_url and config.tracker_root and dist.is_main
        self.outputs = OutputMirror(config.tracker_root, config.publish_url, config.output_options) if publish else None
        self.source_letters = source_letters
        self.draft = draft
        self.dist = dist
        self.device = dist.device
        self.lm_head = lm_head.to(self.device)
        self.open_source = open_source
        self.partitions = sorted(partitions)
        self.num_partitions = num_partitions
        self.ledger = ledger  # rank 0's ledger sink (None: no ledger)
        self.resume_config = {
            **config.resume_fields(),
            "world_size": dist.world_size,
            "partitions": num_partitions,
            **(extra_resume_fields or {}),
        }
        self.params = draft.trainable_parameters()
        self.optimizer = torch.optim.AdamW(
            self.params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, LRSchedule.from_config(config))
        self.checkpoints = CheckpointCoordinator(
            config,
            dist=dist,
            draft=draft,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            partitions=self.partitions,
            resume_config=self.resume_config,
            ledger=ledger,
            commit_offsets=commit_offsets,
            delete_feature=delete_feature,
        )
        self.step = 0
        self.trained_local = 0  # samples this rank stepped, over every attempt
        self.tail_local = 0
        self.state: StreamState | None = None  # stream state after the last stepped sample
        self._interval: list[str] = []  # feature uris consumed since the last checkpoint
        self._saved: CheckpointInfo | None = None
        self._resumed_end = False
        self._own_step_s = 0.0  # this rank's own timings, for its exit log
        self._own_wait_s = 0.0
        self.records: Sequence[StepRecord] = ()  # rank 0: the latest metric rows (report.RECENT_STEPS)

    # --- setup ---------------------------------------------------------------------------

    def _sync_initial_weights(self) -> None:
        """Every rank starts from rank 0's weights (seeding alone is not a guarantee across hosts)."""
        with torch.no_grad():
            self.dist.broadcast_(p.data for p in self.params)

    # --- the loop ------------------------------------------------------------------------

    def run(self, stop: threading.Event | None = None) -> TrainResult:
        """Train until the stream ends, ``max_steps``, or ``stop``; always leaves a checkpoint."""
        stop = stop or threading.Event()
        cfg = self.config
        info = self.checkpoints.choose()
        if info is not None:
            resumed = self.checkpoints.restore(info)
            self.step, self.trained_local, self.tail_local = resumed.step, resumed.trained, resumed.tail
            self.state = resumed.state
            self._saved, self._resumed_end = info, info.end
        else:
            self._sync_initial_weights()
        if self.outputs is not None:
            self.outputs.pull()  # a resumed run's metrics continue the published ones
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
        reporter = StepReporter(cfg, is_main=self.dist.is_main, ledger=self.ledger, initial_step=self.step)
        if self.evaluator is not None:  # its figures go to rank 0's trackers as eval/... scalars
            self.evaluator.on_eval = reporter.eval_callback(self.evaluator.on_eval)
            self.evaluator.start()  # the eval set loads meanwhile: the first evaluation need not wait
        self.records = reporter.records
        try:
            reason = self._loop(feeder, stop, reporter)
            reporter.progress.close()  # the bar ends before the summary line, never inside it
            result = self._finish(reason, feeder)
        finally:
            reporter.close()
            prefetcher.close()
        if self.dist.is_main and cfg.plot_path and cfg.metrics_path:
            from pipeline.train.plot import plot_metrics_file  # lazy: start-up, plotting loads at a run end

            try:
                plot_metrics_file(cfg.metrics_path, cfg.plot_path, title=f"{cfg.run_id}: draft training")
            except Exception:  # a plot must never fail a finished run
                logger.warning("could not plot the training curves", exc_info=True)
        if self.outputs is not None:
            self.outputs.push()
        return result

    def _loop(self, feeder: LockstepFeeder, stop: threading.Event, reporter: StepReporter) -> str:
        """Vote, step, report and checkpoint until the ranks agree to stop; returns why."""
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
            self._interval.extend(self._done_with(samples))
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
            gathered = self.dist.all_gather_object(
                (rank_progress(self.dist.rank, samples, micro[-1].state), timing)
            )
            if self.dist.is_main:
                reporter.report(self.step, gathered, summary, lr, grad_norm)
            if self.evaluator is not None and self.evaluator.due(self.step):
                self._evaluate()
            crash_point("train.after_step")
            if cfg.save_interval and self.step % cfg.save_interval == 0:
                self._checkpoint(end=False)
            if cfg.max_steps is not None and self.step >= cfg.max_steps:
                return "max_steps"

    def _check_ref_factory(self) -> Callable[[SampleRef], None]:
        """A check, run once per distinct target, that the samples fit this draft's shape."""
        checked: set[str] = set()
        config = self.draft.config

        def check(ref: SampleRef) -> None:
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

    # --- checkpoints ---------------------------------------------------------------------

    def _checkpoint(self, *, end: bool) -> CheckpointInfo:
        """Checkpoint every rank's state now; the feature uris consumed so far are now covered."""
        assert self.state is not None
        info = self.checkpoints.save(
            step=self.step,
            end=end,
            state=self.state,
            trained=self.trained_local,
            tail=self.tail_local,
            interval=self._interval,
        )
        self._interval = []
        self._saved = info
        if self.outputs is not None:
            self.outputs.push()  # the metrics so far, beside the checkpoint that covers them
        return info

    # --- the end -------------------------------------------------------------------------

    def _drain(self, feeder: LockstepFeeder) -> tuple[dict[str, int], int]:
        """Read this rank's stream to its end; count the tail; return this rank's accounting."""
        tail = feeder.drain(self.config.drain_timeout_s)
        assert tail.end is not None
        self.tail_local += len(tail.samples)
        self._interval.extend(self._done_with(tail.samples))
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
            "missing": summary.missing,
            "duplicates": summary.duplicates,
            "foreign": summary.foreign,
            "partitions_ended": summary.partitions_ended,
            "partitions": summary.partitions,
            "dropped_upstream": tail.end.dropped_upstream,
            "trained": self.trained_local,
            "tail": self.tail_local,
            "source_letters": self.source_letters() if self.source_letters and self.dist.is_main else 0,
        }
        return mine, len(tail.samples)

    def _done_with(self, samples: list[SampleInfo]) -> list[str]:
        """The feature uris no later epoch reads again: retention may delete them after the next
        checkpoint (a file a storage budget did not keep, or a regenerated one, is read once)."""
        last = self.config.epochs - 1
        return [s.uri for s in samples if s.epoch == last or not s.kept]

    def _evaluate(self) -> None:
        assert self.evaluator is not None
        self.evaluator.run(self.step, self.draft, self.lm_head, device=self.device, autocast=self._autocast)

    def _finish(self, reason: str, feeder: LockstepFeeder) -> TrainResult:
        result = TrainResult(step=self.step, samples_trained=0, reason=reason)
        if self.evaluator is not None and self.step > 0 and reason != "stopped":  # final figures, for the summary
            self._evaluate()
            if self.evaluator.last is not None:
                result.eval_step, result.eval = self.evaluator.last
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
            completeness = RunCompleteness.combine(ranks, epochs=self.config.epochs)
            result.completeness = completeness
            if not (self._resumed_end and self._saved is not None and self._saved.step == self.step):
                result.checkpoint = str(self._checkpoint(end=True).path)
            else:
                result.checkpoint = str(self._saved.path)
            logger.info(
                "rank %d ended at step %d with %d tail samples", self.dist.rank, self.step, tail_count
            )
            if self.dist.is_main:
                group = f"trainer group {self.config.group}: " if self.config.group else ""
                print(group + completeness.line(), flush=True)  # the run's summary line, for people and scripts
                if result.eval is not None:
                    print(eval_line(self.step, result.eval), flush=True)
            completeness.check(self.config.min_trained_fraction)
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
