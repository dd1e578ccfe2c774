"""The generator worker: prompts in, feature files and sample refs out, exactly once.

Consume-transform-produce, exactly once, in Kafka transactions:

1. poll prompt records (``read_committed``) and take a batch round-robin over the partitions,
   within what each partition's share of the backpressure watermark still allows
   (:mod:`pipeline.generate.intake`, :mod:`pipeline.generate.backpressure`);
2. capture the target's hidden states for the prompts (the main thread: compute);
3. hand the batch to the writer thread (:mod:`pipeline.generate.writer`), which writes each
   sample's safetensors file to its deterministic path (complete before its ref), then in one
   transaction produces the refs (prompt partition p -> samples partition p), DLQ records for
   bad input, forwarded end-of-stream markers and the consumed prompt offsets, whose metadata
   carries the partition's running counts (refs, dropped, ended), and commits (batches that
   queued up during a slow commit share the next transaction);
4. meanwhile the main thread polls and captures the next batch.

A worker killed anywhere loses nothing: its open transaction aborts (or is fenced by its restart,
which reuses the transactional id), the prompts are re-read from the committed offset by
whoever owns the partition next, and the same deterministic paths are overwritten. The counts
travel with the offsets, so the end-of-stream marker is right whichever worker forwards it.

In group mode (no fixed partitions) Kafka balances the prompt partitions over the workers. On
revocation the worker lets the writer commit what it already queued (bounded), then forgets the
partitions' counts; the group metadata committed with every batch (KIP-447) fences anything
that was still in flight. After any assignment change or aborted batch the worker drops what is
queued and repositions every owned partition at its committed offset, reloading the counts from
the committed metadata, so a dropped batch is always re-read. A stop (SIGTERM) finishes the
queued transactions or aborts them at the drain timeout, then leaves the group.
"""

from __future__ import annotations

import logging
import threading
import time

from pipeline.core.errors import StreamError
from pipeline.core.faults import crash_point
from pipeline.core.progress import PartitionCounters
from pipeline.core.topics import Admin, FencedError, Reader, RunTopics, Transport, wait_for_topic
from pipeline.generate.backend import SharedTarget, TargetBackend
from pipeline.generate.backlog import BacklogMonitor, Throttle, generator_commits
from pipeline.generate.backpressure import FlowControl
from pipeline.generate.claims import NoClaims, PartitionClaims, claim_partitions
from pipeline.generate.config import GeneratorConfig
from pipeline.generate.eval_capture import EvalCapture
from pipeline.generate.fenced import explain_fenced
from pipeline.generate.intake import Intake, check_batch_share
from pipeline.generate.liveness import IdleReport, generator_heartbeat
from pipeline.generate.planner import BatchPlanner, Decoded
from pipeline.generate.regen_capture import serve_regeneration
from pipeline.generate.stats import GeneratorStats
from pipeline.generate.writer import BatchWriter, PlannedBatch
from pipeline.storage import FeatureStore

__all__ = ("GeneratorConfig", "GeneratorWorker", "GeneratorStats")

logger = logging.getLogger(__name__)


class GeneratorWorker:
    """One target replica: a member of the generators' group (or a fixed set of partitions)."""

    def __init__(
        self, transport: Transport, store: FeatureStore, backend: TargetBackend, config: GeneratorConfig
    ) -> None:
        config.validate()  # refuse a deadlocking watermark before touching anything
        self.transport = transport
        self.store = store
        self.backend = backend
        self.target = SharedTarget(backend)  # its captures and its sub-runs' (eval, regen), one at a time
        self.config = config
        self.topics = RunTopics(config.run_id)
        self.stats = GeneratorStats()
        self.eval_stats: GeneratorStats | None = None  # the eval set's capture (not in ``stats``)
        self._eval = EvalCapture(self)  # started by ``run``, beside the training capture
        self.regen_stats: GeneratorStats | None = None  # later epochs' captures under a budget (nor these)
        self._lock = threading.Lock()
        self._epoch = 0  # bumped on every assignment change and rewind
        self._synced_epoch = -1  # the epoch our positions and counters were last resynced at
        self._counters: dict[int, PartitionCounters] = {}  # optimistic: includes queued batches
        self._reader: Reader | None = None
        self._writer: BatchWriter | None = None
        self._admin: Admin | None = None
        self._claims: PartitionClaims | NoClaims = NoClaims()  # fixed partitions: claimed in _open
        # In-process transports run rebalance callbacks under their own lock, where the writer
        # could not make progress; only Kafka's (on its IO thread) can wait for it.
        self._drain_on_revoke = transport.rebalance_callbacks_may_wait
        self._planner = BatchPlanner(
            self.target, run_id=config.run_id, epoch=config.epoch, dead_letters=config.dead_letters,
            max_prompt_tokens=config.max_prompt_tokens,
        )  # fmt: skip
        self._throttle: Throttle | None = None  # only with backpressure
        self._intake = Intake(config.batch_size, config.run_id)  # polled, not yet captured prompts, per partition
        self._partition_count = 0
        self._done_checked_at = 0.0
        self._first_records_at: float | None = None
        self._heartbeat = generator_heartbeat(transport, config, self.stats)
        self._idle = IdleReport(config.worker_id, self._heartbeat, config.idle_report_s)

    @property
    def transactional_id(self) -> str:
        return f"{self.config.run_id}.generate.{self.config.worker_id}"

    # --- lifecycle -----------------------------------------------------------------------

    def run(self, stop: threading.Event | None = None) -> GeneratorStats:
        """Process until every owned partition has ended (fixed partitions), every partition
        of the run has ended (group mode, ``exit_when_done``), or ``stop`` is set."""
        stop = stop or threading.Event()
        started = time.perf_counter()
        with self._heartbeat.lifetime(stop):  # the final heartbeat says how it ended
            self._eval.start(stop)  # the held-out set, once, on a thread beside the training capture
            try:
                if self._open(stop):  # False: stopped while waiting for the run's prompts topic
                    self._loop(stop)
                    self._finish()
                    self.close(backend=False)  # leave the run's group, keep the target for the sub-runs
                    self.eval_stats = self._eval.wait()
                    self.regen_stats = serve_regeneration(self, stop)
            except FencedError as exc:
                raise explain_fenced(exc, self.config.worker_id, self.transactional_id) from exc
            finally:
                self._eval.cancel()  # a no-op once it has ended
                self.close()
                self.stats.wall_s = time.perf_counter() - started
        return self.stats

    def _open(self, stop: threading.Event) -> bool:
        cfg = self.config
        self._admin = self.transport.admin()
        self._heartbeat.set_state("waiting", f"waiting for {self.topics.prompts} (start the run's source)")
        self._partition_count = wait_for_topic(self._admin, self.topics.prompts, cfg.wait_for_source_s, stop)
        self._heartbeat.set_state("running")
        if not self._partition_count:
            return False
        self._claims = claim_partitions(self.transport, cfg)  # fixed partitions: or PartitionsClaimedError
        if cfg.backpressure is not None:
            assert cfg.trainer is not None
            flow = FlowControl(cfg.backpressure, cfg.trainer, self._partition_count)
            if cfg.partitions is not None:  # group mode: checked where the generator count is known
                check_batch_share(cfg.backpressure, cfg.trainer, self._partition_count, cfg.batch_size, len(cfg.partitions))
            monitor = BacklogMonitor(
                self.transport, self.topics, interval_s=cfg.backpressure.check_interval_s, admin=self._admin,
                groups=cfg.trainer_groups,
            )
            self._throttle = Throttle(flow, monitor, self.stats, name=cfg.worker_id, heartbeat=self._heartbeat)
        producer = self.transport.transactional_producer(
            self.transactional_id, transaction_timeout_ms=cfg.transaction_timeout_ms,
            writes=[self.topics.samples, self.topics.dlq],
        )  # fmt: skip
        self._writer = BatchWriter(
            producer,
            self.store,
            run_id=cfg.run_id,
            producer_id=cfg.worker_id,
            epoch=cfg.epoch,
            target=self.backend.info,
            samples_topic=self.topics.samples,
            is_stale=lambda epoch: epoch != self._epoch or not self._claim_holds(),
            on_committed=self._on_committed,
            depth=cfg.queue_depth,
            storage_dtype=cfg.storage_dtype,
        )
        self._writer.start()
        self._reader = self.transport.reader(
            self.topics.prompts,
            partitions=cfg.partitions,
            group_id=self.topics.generator_group,
            start="committed",
            max_poll_records=cfg.batch_size,
            # Small fetches per partition: the consumer hands out one partition's fetched records
            # until they are used up, so with the 1 MiB default a worker would turn a whole prompt
            # partition into samples before starting the next, and a trainer rank (which takes its
            # partitions round-robin) would wait for the last one. 16 KiB is ~10 prompts a turn.
            max_partition_fetch_bytes=16 * 1024,
            session_timeout_ms=cfg.session_timeout_ms,
            on_assigned=self._on_assigned,
            on_revoked=self._on_revoked,
            on_lost=self._on_lost,
            client_id=self.transactional_id,
        )
        return True

    def _loop(self, stop: threading.Event) -> None:
        cfg = self.config
        assert self._reader is not None and self._writer is not None
        while not stop.is_set():
            self._writer.raise_if_failed()
            self._eval.raise_if_failed()
            self._claims.check()  # fixed partitions another instance took over: stop
            if self._writer.take_reset() or self._epoch != self._synced_epoch:
                self._resync()
            if not self._claims.valid():  # being renewed (a broker outage): nothing could commit
                stop.wait(cfg.poll_timeout_s)
                continue
            if self._finished():
                # Finished on our optimistic counts: make sure the last batches really commit.
                self._drain_or_fail()
                if not self._writer.take_reset():
                    return
                continue
            records, decoded = self._intake.poll(
                self._reader, self._throttle, self._local_counters, self._planner.bytes_per_sample,
                timeout_s=cfg.poll_timeout_s, current=lambda: self._epoch == self._synced_epoch,
            )  # fmt: skip
            self._idle.update(self._reader.assignment(), self._partition_count)
            if records and self._first_records_at is None:
                self._first_records_at = time.perf_counter()
            if not decoded:
                continue
            epoch = self._synced_epoch  # the intake hands out records of the synced epoch only
            group = self._reader.group_metadata()
            batch = self._plan(decoded, epoch, group)
            with self._lock:
                if epoch != self._epoch:  # the assignment changed during the capture
                    self.stats.stale_batches += 1
                    continue
                self._counters.update(batch.counters)
            crash_point("generate.after_capture")
            if cfg.queue_depth > 0:
                self._writer.submit(batch, stop=stop, stop_grace_s=cfg.drain_timeout_s)
            else:  # no overlap: the capture waits for the write and the commit (baseline)
                self._writer.write_now(batch)

    def _drain_or_fail(self) -> None:
        """Wait for the writer to be idle; a writer stuck past the drain timeout is fatal (a
        restart resumes exactly; repositioning under a batch that may still commit would not)."""
        assert self._writer is not None
        if not self._writer.drain(self.config.drain_timeout_s):
            raise StreamError(
                f"the writer did not finish {self._writer.pending} batches in "
                f"{self.config.drain_timeout_s:.0f} s (storage or broker stuck)"
            )
        self._writer.raise_if_failed()

    def _finish(self) -> None:
        """Stop or end: let the queued transactions commit (bounded), abort what is left."""
        if self._writer is None:
            return
        if not self._writer.drain(self.config.drain_timeout_s):
            logger.warning(
                "%s: %d batches still queued after %.0f s; aborting them",
                self.config.worker_id,
                self._writer.pending,
                self.config.drain_timeout_s,
            )
        if self._first_records_at is not None:
            self.stats.busy_s = time.perf_counter() - self._first_records_at
        self._writer.raise_if_failed()

    def close(self, *, backend: bool = True) -> None:
        """Abort anything open, leave the group, close the clients and the target (idempotent)."""
        writer, self._writer = self._writer, None
        if writer is not None:
            with self._lock:
                self._epoch += 1  # anything still queued is dropped, not committed
            writer.stop(timeout_s=self.config.drain_timeout_s)
            self._collect(writer)
            writer.producer.close()  # aborts an open transaction: nothing half-published
        if self._reader is not None:
            self._reader.close()  # leaves the group: the partitions move now, not at session timeout
            self._reader = None
        if self._throttle is not None:
            self._throttle.monitor.close()
            self._throttle = None
        if self._admin is not None:
            self._admin.close()
            self._admin = None
        self._claims.release()  # after the producer's close: nothing of ours is open any more
        if backend:
            self.backend.close()

    def _claim_holds(self) -> bool:
        """Whether a batch may still commit under our claim; a batch dropped because it may not
        moves the epoch, so the worker rewinds to the committed offsets and redoes its prompts."""
        if self._claims.valid():
            return True
        with self._lock:
            self._epoch += 1
        return False

    def _on_committed(self, batch: PlannedBatch) -> None:
        """Live stats, from the writer thread, once a batch's transaction has committed."""
        s = self.stats
        s.batches += 1
        s.refs += batch.samples
        s.dropped += sum(batch.dropped.values())
        s.tokens += batch.tokens
        s.ended_partitions.extend(batch.ended)
        writer = self._writer  # its bytes and timings, live for the metrics exporter (_collect: at the end)
        if writer is not None:
            s.nbytes, s.write_s, s.commit_s = writer.stats.nbytes, writer.stats.write_s, writer.stats.commit_s

    def _collect(self, writer: BatchWriter) -> None:
        w, s = writer.stats, self.stats
        s.nbytes, s.write_s, s.commit_s = w.nbytes, w.write_s, w.commit_s
        s.stale_batches += w.stale_batches
        s.aborted_batches = w.aborted_batches

    # --- group membership ----------------------------------------------------------------

    def _on_revoked(self, partitions: list[int]) -> None:
        """Let the writer commit what it queued while we still own the partitions (bounded:
        fencing covers the rest), then forget their counts: they belong to the next owner."""
        writer = self._writer
        if writer is not None and self._drain_on_revoke:
            budget = min(self.config.drain_timeout_s, self.config.session_timeout_ms / 3000)
            if not writer.drain(budget):
                logger.warning("revocation: writer not drained in %.1f s; fencing will abort the rest", budget)
        self._forget(partitions)
        logger.info("%s: partitions %s revoked", self.config.worker_id, partitions)

    def _on_lost(self, partitions: list[int]) -> None:
        """Evicted from the group (e.g. its session expired in a broker outage): the partitions
        are already the next owner's, so nothing queued may commit (fencing refuses it anyway)."""
        self._forget(partitions)
        logger.info("%s: partitions %s lost (evicted from the group); their queued batches are dropped",
                       self.config.worker_id, partitions)  # fmt: skip

    def _forget(self, partitions: list[int]) -> None:
        with self._lock:
            self._epoch += 1
            for p in partitions:
                self._counters.pop(p, None)
        self.stats.rebalances += 1

    def _on_assigned(self, partitions: list[int]) -> None:
        with self._lock:
            self._epoch += 1
            for p in partitions:
                self._counters.pop(p, None)  # reloaded from the committed metadata on first use
        logger.info("%s: partitions %s assigned", self.config.worker_id, partitions)

    def _resync(self) -> None:
        """After an assignment change or an aborted batch: drop what is queued, reposition
        every owned partition at its committed offset and reload its counts from there.

        Seeking explicitly (not trusting the client's own reset) keeps this right whatever the
        assignor: a batch dropped as stale is always re-read, by us or by the next owner.
        """
        assert self._reader is not None and self._writer is not None
        with self._lock:
            self._epoch += 1
            epoch = self._epoch
            self._counters.clear()
        self._drain_or_fail()  # queued batches are stale now: dropped without writing
        self.stats.reread += self._intake.clear()  # polled but not captured: read again from the commit
        self._writer.take_reset()
        assigned = self._reader.assignment()
        committed = self._reader.committed(assigned)
        for p in assigned:
            self._reader.seek(p, committed[p].offset if p in committed else 0)
        self._synced_epoch = epoch
        positions = {p: committed[p].offset if p in committed else 0 for p in assigned}
        logger.info("%s: at the committed offsets of %s: %s", self.config.worker_id, assigned, positions)

    # --- progress --------------------------------------------------------------------------

    def _counters_for(self, partitions: list[int]) -> dict[int, PartitionCounters]:
        """Our view of these partitions' counts, loading missing ones from the group's commits."""
        assert self._reader is not None
        with self._lock:
            epoch = self._epoch
            have = {p: self._counters[p] for p in partitions if p in self._counters}
        missing = [p for p in partitions if p not in have]
        if missing:
            committed = self._reader.committed(missing)
            loaded = {
                p: PartitionCounters.from_metadata(committed[p].metadata) if p in committed else PartitionCounters()
                for p in missing
            }
            logger.info(
                "%s: resuming partitions %s from committed %s",
                self.config.worker_id,
                missing,
                {p: (committed[p].offset if p in committed else None, loaded[p].refs) for p in missing},
            )
            with self._lock:
                if epoch == self._epoch:
                    for p, c in loaded.items():
                        self._counters.setdefault(p, c)
            have.update(loaded)
        return have

    def _finished(self) -> bool:
        owned = self.config.partitions
        if owned is not None:
            return all(c.ended for c in self._counters_for(owned).values())
        if not self.config.exit_when_done:
            return False
        now_ = time.monotonic()
        if now_ - self._done_checked_at < self.config.done_check_interval_s:
            return False
        self._done_checked_at = now_
        assert self._admin is not None
        committed = generator_commits(self._admin, self.topics)
        ended = [p for p, c in committed.items() if PartitionCounters.from_metadata(c.metadata).ended]
        return len(ended) == self._partition_count and self._writer is not None and self._writer.pending == 0

    def _local_counters(self) -> dict[int, PartitionCounters]:
        """A snapshot of our own counts (queued batches included), for the throttle."""
        with self._lock:
            return dict(self._counters)

    # --- one batch -----------------------------------------------------------------------

    def _plan(self, decoded: list[Decoded], epoch: int, group: object) -> PlannedBatch:
        """Capture the batch's own prompts and decide, in record order, what its transaction holds."""
        counters = self._counters_for(sorted({r.partition for r, _ in decoded}))
        started = time.perf_counter()
        batch = self._planner.plan(decoded, counters, epoch=epoch, group=group)
        self.stats.capture_s += time.perf_counter() - started
        return batch
