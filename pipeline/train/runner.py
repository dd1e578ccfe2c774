"""Wire the trainer loop to the live run: Kafka stream, ledger, group offsets, feature store, model.

:func:`run_trainer` is what ``specstream train`` (under torchrun: one process per rank), the
single-process runtime and replay call on every rank: it seeds, builds the draft from the
target's embedding and the frozen vocab map, opens this rank's partitions of the samples topic,
and runs :class:`~pipeline.train.trainer.Trainer` until the end of the stream, ``max_steps`` or a
stop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import torch

from pipeline.core.errors import ConfigError, StreamError
from pipeline.core.heartbeat import HeartbeatPublisher, State
from pipeline.core.progress import StreamState, rank_partitions, read_source_counters
from pipeline.core.topics import RunTopics, Transport, wait_for
from pipeline.ledger import LedgerWriter
from pipeline.storage import FeatureStore
from pipeline.stream import SampleStream, fetch_sample
from pipeline.train.config import TrainerSettings
from pipeline.train.dataset import ItemSource
from pipeline.train.distributed import DistContext, init_distributed
from pipeline.train.epochs import EpochedSource, letter_again
from pipeline.train.regenerate import Need, Regenerator
from pipeline.train.evaluate import Evaluator, OnEval
from pipeline.train.group_retention import GroupRelease
from pipeline.train.model import ModelSpec, build_draft
from pipeline.train.result import TrainResult
from pipeline.train.rng import seed_everything
from pipeline.train.trainer import Trainer

__all__ = ("OffsetCommitter", "single_rank", "final_state", "final_counters", "run_trainer", "load_eval_set")

logger = logging.getLogger(__name__)


def single_rank(device: str | None) -> DistContext:
    """One rank in this process, no process group (single-process runtime, replay); ``device``
    None: CUDA when available."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return DistContext(device=torch.device(device))


class OffsetCommitter:
    """Rank 0's advisory commit of the trainer group's offsets, with ``step=N`` as metadata.

    The trainers read with manual assignment and never join the group, so the commit is a plain
    offset commit for a group without members: it feeds lag monitoring, not correctness.
    """

    def __init__(self, transport: Transport, topics: RunTopics, partitions: int) -> None:
        self._reader = transport.reader(
            topics.samples,
            partitions=range(partitions),
            group_id=topics.trainer_group,
            start="earliest",
        )

    def __call__(self, positions: dict[int, int], step: int, ended: frozenset[int] = frozenset()) -> None:
        """``ended`` partitions are committed at their end offset: the transaction marker after the
        end-of-stream record is no record a reader sees, but it must not look like lag."""
        offsets = dict(positions)
        if ended:
            ends = self._reader.end_offsets(sorted(ended))
            offsets.update({p: max(offsets[p], ends[p]) for p in ended})
        self._reader.commit(offsets, metadata=f"step={step}")

    def close(self) -> None:
        self._reader.close()


def _samples_topic(transport: Transport, topics: RunTopics) -> tuple[int, str | None]:
    """The samples topic's partition count and id (a checkpoint must be of this incarnation)."""
    with transport.admin() as admin:
        count = admin.partition_count(topics.samples)
        topic_id = admin.topic_id(topics.samples)
    if count is None:
        raise StreamError(f"topic {topics.samples} does not exist: create the run's topics first")
    return count, topic_id


def load_eval_set(
    transport: Transport,
    store: FeatureStore,
    *,
    timeout_s: float,
    quiet: bool = False,
) -> list[dict[str, torch.Tensor]] | None:
    """Every sample of the eval sub-run ``store.run_id`` (one partition, to its end marker),
    waiting at most ``timeout_s`` in all; None, with a warning saying why (``quiet``: a debug
    line, for a try ahead of need), when it is not complete by then (training goes on without
    evaluation)."""
    warn = logger.debug if quiet else logger.warning
    topic = RunTopics(store.run_id).samples
    deadline = time.monotonic() + timeout_s
    with transport.admin() as admin:
        exists = wait_for(lambda: admin.partition_count(topic) or None, timeout_s=timeout_s, interval_s=0.5)
    if exists is None:
        warn("eval set: topic %s does not exist after %.0f s: no evaluation", topic, timeout_s)
        return None
    stream = SampleStream(transport, store, store.run_id, [0], idle_timeout_s=None)
    timer = threading.Timer(max(0.0, deadline - time.monotonic()), stream.interrupt)
    timer.start()
    try:
        samples = [item.tensors for item in stream.items()]
        ended = stream.tracker.all_ended()
    except StreamError as exc:
        warn("eval set %s unreadable (%s): no evaluation", topic, exc)
        return None
    finally:
        timer.cancel()
        stream.close()
    if not ended:
        warn(
            "eval set: %s has %d samples and no end marker after %.0f s (are the generators running?): "
            "no evaluation", topic, len(samples), timeout_s,
        )  # fmt: skip
        return None
    return samples


def _evaluator(
    settings: TrainerSettings,
    transport: Transport,
    storage_root: str,
    storage_options: dict[str, object] | None,
    on_eval: OnEval | None,
) -> Evaluator | None:
    """Rank 0's evaluator on the held-out set, when the run has one. Its first use waits for the
    eval set at most ``idle_timeout_s``, and at most half ``collective_timeout_s`` (the other
    ranks wait for rank 0 at the next vote)."""
    if settings.eval_run_id is None:
        return None
    store = FeatureStore(storage_root, settings.eval_run_id, storage_options=storage_options)
    wait_s = min(settings.idle_timeout_s, settings.collective_timeout_s / 2)
    return Evaluator(
        lambda: load_eval_set(transport, store, timeout_s=wait_s),
        load_ahead=lambda: load_eval_set(transport, store, timeout_s=wait_s, quiet=True),
        ahead_wait_s=wait_s,
        interval=settings.eval_interval,
        batch_size=settings.batch_size,
        ttt_steps=settings.ttt_steps,
        decay=settings.loss_decay,
        max_length=settings.max_length,
        path=settings.eval_metrics_path,
        on_eval=on_eval,
    )


def _process_id(group: str | None, rank: int) -> str:
    """A rank's heartbeat id: ``rank-N``, or ``<group>.rank-N`` for a group of several."""
    return f"{group}.rank-{rank}" if group else f"rank-{rank}"


def _delete_feature(settings: TrainerSettings, store: FeatureStore) -> Callable[[str], None]:
    """Retention's delete: the store's, or, for one group of several, a release (the last deletes)."""
    if settings.group is None or len(settings.retention_groups) < 2:
        return store.delete
    return GroupRelease(store, settings.group, settings.retention_groups)


def final_state(result: TrainResult) -> tuple[State, str]:
    """A rank's last heartbeat: finished at the end of the stream, else stopped and why."""
    if result.reason == "end_of_stream":
        return "finished", "end of stream"
    return "stopped", "stop requested" if result.reason == "stopped" else result.reason


def final_counters(result: TrainResult, rank: int) -> dict[str, int | float]:
    """What ``status`` shows of a finished run: the step, the samples and the run's accounting."""
    out: dict[str, int | float] = {"rank": rank, "step": result.step, "samples": result.samples_trained}
    c = result.completeness
    if c is not None:
        out.update(prompts=c.prompts, trained=c.trained, missing=c.missing, duplicates=c.duplicates,
                   tail=c.tail, dead_letters=c.dead_letters, epochs=c.epochs)  # fmt: skip
    return out


def run_trainer(
    settings: TrainerSettings,
    *,
    transport: Transport,
    storage_root: str,
    model: ModelSpec,
    stop: threading.Event | None = None,
    dist: DistContext | None = None,
    device: str | None = None,
    storage_options: dict[str, object] | None = None,
    record: bool = True,
    on_eval: OnEval | None = None,
    observe: Callable[[Trainer], None] | None = None,
) -> TrainResult:
    """Train one rank of ``settings.run_id`` on the live samples topic (call it on every rank).

    ``record=False`` (replay) writes no ledger records and commits no group offsets: the run's
    own history stays the live run's. ``on_eval(step, figures)`` receives rank 0's evaluations on
    the held-out set (``settings.eval_run_id``); ``observe`` receives the trainer before it runs
    (the metrics exporter reads its live counters).
    """
    own_dist = dist is None
    dist = dist or init_distributed(timeout_s=settings.collective_timeout_s, device=device)
    closers: list[object] = []
    live: list[Trainer] = []  # the trainer, once built: the heartbeat's counters read it
    heartbeat = HeartbeatPublisher(
        transport, settings.run_id, "trainer", _process_id(settings.group, dist.rank),
        settings.heartbeat_interval_s if record else None,
        lambda: {"rank": dist.rank, "step": live[0].step, "samples": live[0].trained_local} if live else {},
    ).start()  # fmt: skip
    try:
        seed_everything(settings.seed, deterministic=settings.deterministic)
        draft, lm_head, vocab = build_draft(model, seed=settings.seed, device=dist.device)
        topics = RunTopics(settings.run_id, settings.group)
        num_partitions, topic_id = _samples_topic(transport, topics)
        partitions = rank_partitions(num_partitions, dist.world_size, dist.rank)
        if not partitions:
            raise ConfigError(
                "world_size",
                f"{dist.world_size} trainer ranks for {num_partitions} samples partitions leave rank "
                f"{dist.rank} without data",
                "use at most as many ranks as partitions (ideally partitions = k * ranks)",
            )
        if num_partitions % dist.world_size:
            logger.warning(
                "%d partitions over %d ranks: ranks read unequal shares; the larger shares end as tail",
                num_partitions,
                dist.world_size,
            )
        store = FeatureStore(storage_root, settings.run_id, storage_options=storage_options)
        dlq = transport.plain_producer() if record else None  # a replay writes nothing into the live run
        if dlq is not None:
            closers.append(dlq)

        def open_stream(state: StreamState | None, *, fetch: bool = True) -> SampleStream:
            return SampleStream(
                transport,
                store,
                settings.run_id,
                partitions,
                state=state,
                dlq=dlq if fetch else None,  # a listing for later epochs letters nothing twice
                idle_timeout_s=settings.idle_timeout_s,
                dead_letters=settings.dead_letters,
                fetch=fetch,
                keep_share=settings.keep_share,
            )

        def regenerate(needs: list[Need]) -> Regenerator:
            sub = topics.regen.run_id  # its refs are read without payloads; the files are in the run's store
            return Regenerator(
                transport, settings.run_id, partitions, num_partitions, needs, rank=dist.rank,
                window=settings.regen_window, transaction_timeout_ms=settings.transaction_timeout_ms,
                open_arrivals=lambda: SampleStream(transport, store, sub, partitions, dlq=dlq, idle_timeout_s=None,
                                                   dead_letters=settings.dead_letters, fetch=False),
            )  # fmt: skip

        def open_source(state: StreamState | None) -> ItemSource:
            if settings.epochs == 1:
                return open_stream(state)
            return EpochedSource(
                open_stream(state),
                open_listing=lambda: open_stream(None, fetch=False),
                fetch=lambda ref: fetch_sample(store, ref),
                epochs=settings.epochs,
                seed=settings.seed,
                state=state,
                reject=(lambda item, exc: letter_again(dlq, topics.samples, item, exc, settings.run_id))
                if dlq is not None else None,
                regenerate=regenerate if settings.keep_share is not None and record else None,
            )

        ledger = committer = None
        if dist.is_main and record:
            ledger = LedgerWriter(transport, settings.run_id, settings.group)
            committer = OffsetCommitter(transport, topics, num_partitions)
            closers.extend([ledger, committer])
        trainer = Trainer(
            settings,
            draft=draft,
            lm_head=lm_head,
            dist=dist,
            open_source=open_source,
            partitions=partitions,
            num_partitions=num_partitions,
            ledger=ledger,
            commit_offsets=committer,
            delete_feature=_delete_feature(settings, store),
            extra_resume_fields={
                "draft": draft.config.to_dict(),
                "vocab": vocab.fingerprint(),
                "samples_topic_id": topic_id,  # a re-created topic is another stream: no resume
            },
            source_letters=lambda: sum(
                c.letters for c in read_source_counters(transport, topics, num_partitions).values()
            ),
            evaluator=_evaluator(settings, transport, storage_root, storage_options, on_eval)
            if dist.is_main else None,
        )
        if observe is not None:
            observe(trainer)
        live.append(trainer)
        heartbeat.set_state("running")
        result = trainer.run(stop)
    except BaseException as exc:
        heartbeat.fail(exc)
        raise
    else:
        heartbeat.counters = lambda: final_counters(result, dist.rank)
        heartbeat.close(*final_state(result))
        return result
    finally:
        for closer in reversed(closers):
            try:
                closer.close()  # type: ignore[attr-defined]
            except Exception as exc:  # closing must not mask the run's own error
                logger.warning("closing %s failed: %s", type(closer).__name__, exc)
        if own_dist:
            dist.close()
