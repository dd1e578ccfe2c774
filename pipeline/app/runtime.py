"""The single-process runtime: one validated config -> source, generators and trainer, interleaved.

``build_online_run(config)`` composes the stages over one transport (the Kafka broker named by the
config, the local broker, or the in-process ``MemoryBroker``) and one storage root, and returns
an ``OnlineRun`` with handles to the parts and a ``run()`` that executes the interleaved loop:

1. check what would fail later (``pipeline.app.preflight``), then claim the run: create its
   topics, write the run manifest, refuse topics of a run with another configuration
   (``pipeline.app.manifest``);
2. the source stage tokenizes the conversations, stores the draft vocabulary mapping and
   publishes the prompts (fast, before anything else: the trainer needs the mapping);
3. generator workers capture and publish on threads while the trainer trains on the main thread
   (``pipeline.app.interleave``: every ending is bounded, a producer's error is re-raised here);
4. at the end of the stream, the feature files of aborted attempts are swept
   (``pipeline.app.sweep``);
5. the draft is exported for SGLang from the final checkpoint, only when the run succeeded (a
   run that fails its end-of-stream accounting raises before it).

The same stages run as separate processes through the CLI (``source``, ``generate``, ``train``);
each stage's settings come from ``pipeline.app.settings``.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.app.config import RunConfig
from pipeline.app.config_groups import group_config, group_names
from pipeline.app.group_threads import run_groups
from pipeline.app.interleave import run_interleaved
from pipeline.app.config_budget import peak_samples, target_width
from pipeline.app.manifest import claim_run
from pipeline.app.phases import Phases
from pipeline.app.preflight import preflight
from pipeline.app.settings import (
    generator_settings,
    kafka_settings,
    model_spec,
    source_settings,
    trainer_settings,
)
from pipeline.app.sweep import sweep_at_end
from pipeline.core.errors import ConfigError
from pipeline.core.feature_encoding import bytes_per_token
from pipeline.core.topics import RunTopics, Transport
from pipeline.generate.backend import TargetBackend
from pipeline.generate.worker import GeneratorStats, GeneratorWorker
from pipeline.source.stage import SourceResult, SourceStage
from pipeline.storage import FeatureStore

if TYPE_CHECKING:
    from pipeline.app.metrics import LiveProcess
    from pipeline.train.config import TrainerSettings
    from pipeline.train.model import ModelSpec
    from pipeline.train.result import TrainResult

__all__ = ("OnlineRun", "RunResult", "build_online_run", "resolve_transport", "target_backend")

logger = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What a single-process run did: its summary, steps, outputs and timings."""

    summary: str
    steps: int
    reason: str
    samples_trained: int
    export_dir: str | None
    plot_path: str | None
    metrics_path: str | None
    wall_s: float
    first_step_s: float | None = None
    source: SourceResult | None = None
    generators: list[GeneratorStats] = field(default_factory=list)
    eval: dict[str, float] | None = None  # the final figures on the held-out set (``data.eval_path``)
    groups: dict[str, RunResult] = field(default_factory=dict)  # each trainer group's own (``train_groups``)

    def outputs_line(self) -> str:
        """Steps, curves and export, of each trainer group when there are several."""
        if self.groups:
            return "; ".join(f"group {name}: {r.outputs_line()}" for name, r in self.groups.items())
        return (f"{self.steps} optimizer steps ({self.reason})" + (f"; curves: {self.plot_path}" if self.plot_path else "")
                + (f"; SGLang draft: {self.export_dir}" if self.export_dir else ""))  # fmt: skip


def target_backend(config: RunConfig, *, synthetic_hidden_size: int = 64) -> TargetBackend:
    """The capture backend ``target`` names, on its device and dtype."""
    target = config.target
    # Each backend is imported when chosen: transformers and sglang are heavy or optional.
    if target.backend == "synthetic":
        from pipeline.generate.synthetic import SyntheticTarget  # lazy: start-up, a backend loads only when chosen

        return SyntheticTarget(hidden_size=synthetic_hidden_size, dtype=target.dtype or "float32")
    if target.backend == "hf":
        from pipeline.generate.hf import HFTarget  # lazy: start-up, a backend loads only when chosen

        return HFTarget(str(target.model), device=target.device, dtype=target.dtype, aux_layer_ids=target.aux_layer_ids)
    from pipeline.generate.sglang import SGLangTarget  # lazy: start-up, a backend loads only when chosen

    return SGLangTarget(str(target.model), aux_layer_ids=target.aux_layer_ids, dtype=target.dtype or "auto")


def resolve_transport(config: RunConfig) -> Transport:
    """The config's broker, else the local broker (started in the background if needed)."""
    if config.broker.bootstrap_servers == "memory":  # in-process: a single process, no Kafka
        from pipeline.transport.memory import MemoryBroker  # lazy: start-up, rarely used

        return MemoryBroker()
    if config.broker.bootstrap_servers:
        return kafka_settings(config, config.broker.bootstrap_servers)
    from pipeline.transport.background_broker import ORIGIN, start_detached  # lazy: start-up, only without a configured broker

    state = start_detached()
    logger.info("using the local broker at %s", state.bootstrap)
    return kafka_settings(config, state.bootstrap, origin=ORIGIN)


@dataclass
class OnlineRun:
    """Handles to a composed run; ``run()`` executes it."""

    config: RunConfig
    transport: Transport
    store: FeatureStore
    topics: RunTopics
    #: Receives rank 0's evaluations on the held-out set ``(step, figures)`` (trackers).
    on_eval: Callable[[int, dict[str, float]], None] | None = None

    def make_backend(self) -> TargetBackend:
        return target_backend(self.config)

    def source_stage(self) -> SourceStage:
        return SourceStage(self.transport, source_settings(self.config))

    def generator(self, worker_id: str, partitions: list[int] | None) -> GeneratorWorker:
        config = generator_settings(self.config, worker_id, partitions)
        return GeneratorWorker(self.transport, self.store, self.make_backend(), config)

    def model_spec(self) -> ModelSpec:
        return model_spec(self.config, self.store.root_url)

    def projected_peak_samples(self) -> tuple[int, int] | None:
        """The most feature files a run holds at once, as (kept for resume, produced but not yet
        stepped); None: unbounded (it keeps them all).

        Retention ``delete`` removes a checkpoint interval's files only once no retained
        checkpoint can need them, so up to ``keep_last`` intervals of ``save_interval`` global
        steps are kept (``keep_last - 1`` retained, plus the one being trained, until its
        checkpoint). The generators keep at most ``peak_backlog`` samples produced but not yet
        stepped: the high watermark (the trainer's prefetch and the batches in flight included),
        plus one trainer window that the end of a partition can add."""
        return peak_samples(self.config)

    def projected_storage(self, avg_tokens: float) -> str:
        """DESIGN 4.4: exact resume keeps checkpoint intervals of features on storage."""
        c = self.config
        width = target_width(c)
        if width is None:
            return "projected peak feature storage: unknown (no hidden size in the target config)"
        hidden, dtype_bytes = width
        per_sample = avg_tokens * bytes_per_token(hidden, dtype_bytes, c.storage.dtype)  # aux 3H + final H, ids, mask
        projected = self.projected_peak_samples()
        if projected is None:
            why = "retention: retain" if c.storage.retention == "retain" else "save_interval 0: one interval"
            return f"feature storage grows with the run ({why}): ~{per_sample / 1e6:.2f} MB per sample"
        kept, backlog = projected
        return (
            f"projected peak feature storage: ({c.train.keep_last} x {c.train.save_interval} x {c.global_batch} + "
            f"{backlog}) samples x {per_sample / 1e6:.2f} MB = {(kept + backlog) * per_sample / 1e6:,.1f} MB "
            "(keep_last x save_interval x global batch kept for resume + the generators' peak backlog)"
        )

    def run(
        self,
        stop: threading.Event | None = None,
        announce: Callable[[str], object] | None = None,
        phases: Phases | None = None,
        watch: LiveProcess | None = None,
    ) -> RunResult:
        """Source, then generators (threads) and trainer (here) interleaved, then export.

        ``announce`` receives the start-up facts a person should see (the banner, projected
        storage); ``phases`` times and announces the phases (default: silently); ``watch`` (the
        metrics exporter's view) is given the generators and the trainer.
        """
        # The training stack (torch, the loop, export) is imported when a run starts, not with this
        # module: the source and generator processes compose an OnlineRun without training.
        from pipeline.app.outputs import checkpoints, output_options, output_path  # lazy: start-up, reads checkpoints (torch)
        from pipeline.app.resume_topic import refuse_a_checkpoint_of_another_topic  # lazy: start-up, reads checkpoints (torch)
        from pipeline.app.start_banner import start_banner  # lazy: start-up, reads checkpoints (torch)
        from pipeline.train.export import export_checkpoint  # lazy: start-up, torch loads only when the trainer runs
        from pipeline.train.runner import run_trainer, single_rank  # lazy: start-up, torch loads only when the trainer runs

        say = announce or logger.info
        phases = phases or Phases(io.StringIO())
        started = time.perf_counter()
        c = self.config
        if (ranks := max(group_config(c, n).train.world_size for n in group_names(c))) != 1:
            raise ConfigError(
                "train.world_size",
                f"the single-process runtime trains on one rank, the config asks for {ranks}",
                "run the stages as processes (`specstream train` under torchrun), or set world_size: 1",
            )
        preflight(c, self.transport)
        refuse_a_checkpoint_of_another_topic(c, self.transport)  # before the source re-creates the topics
        claim_run(self.transport, c)
        with phases.phase("source", "publishing the prompts...") as publishing:
            source = self.source_stage().run(stop)
            publishing.done = f"{source.prompts} prompts published"
        if source.stats.stopped:  # a signal while publishing: the same command again continues
            say("source stopped before the end (open chunk aborted); run the same command again to continue")
            return RunResult("source stopped", 0, "source stopped", 0, None, None, None,
                             time.perf_counter() - started, source=source)  # fmt: skip
        groups = {name: group_config(c, name) for name in group_names(c)}  # {None: c} without train_groups
        every = {name: trainer_settings(
            g, schedule_steps=g.train.max_steps or max(1, source.prompts * g.train.epochs // g.global_batch),
            group=name, groups=tuple(c.train_groups)) for name, g in groups.items()}  # fmt: skip
        settings = next(iter(every.values()))
        say(start_banner(c, schedule_steps=settings.schedule_steps, prompts=source.prompts,
                         conversations=source.prompts + source.malformed))  # fmt: skip
        say(self.projected_storage(source.tokens / max(1, source.prompts)))
        workers = [
            self.generator(f"{c.run_id}-gen-{i}", list(range(i, c.data.partitions, c.generate.workers)))
            for i in range(min(c.generate.workers, c.data.partitions))
        ]
        stats: list[GeneratorStats] = []
        if watch is not None:
            for worker in workers:
                watch.watch_generator(worker)

        def producer(worker: GeneratorWorker) -> Callable[[threading.Event], None]:
            def run(stop_event: threading.Event) -> None:
                stats.append(worker.run(stop_event))
                generation.tick()  # its last count shows when it ends, before the trainer's summary

            return run

        def group_trainer(name: str | None) -> Callable[[threading.Event], TrainResult]:
            return lambda stop_event: run_trainer(
                every[name],
                transport=self.transport,
                storage_root=c.storage.root,
                model=self.model_spec(),
                stop=stop_event,
                dist=single_rank(groups[name].train.device),
                storage_options=dict(c.storage.options),
                on_eval=self.on_eval,
                observe=watch.watch_trainer if watch is not None else None,
            )

        def trainer(stop_event: threading.Event) -> dict[str | None, TrainResult]:
            return run_groups({name: group_trainer(name) for name in groups}, stop_event)

        trainers = "the trainer" if len(groups) == 1 else f"{len(groups)} trainer groups"
        fresh = not any(checkpoints(g).list() for g in groups.values())  # a continued run generates only what is left
        with (
            phases.phase("training", f"training: {len(workers)} generator(s) and {trainers}, interleaved..."),
            phases.watch("generation", total=source.prompts if fresh else None, unit="sample",
                         read=lambda: {w.config.worker_id.removeprefix(f"{c.run_id}-"): w.stats.refs + w.stats.dropped
                                       for w in workers},
                         finished=lambda: len(stats) == len(workers)) as generation,
        ):  # fmt: skip
            outcome = run_interleaved([producer(w) for w in workers], trainer, stop=stop)
        if all(r.reason == "end_of_stream" for r in outcome.trainer.values()):  # no attempt is in flight
            sweep_at_end(self.transport, self.store, say)
        runs = {}
        for name, result in outcome.trainer.items():
            export_dir = None
            if result.checkpoint:
                with phases.phase("export", f"exporting the draft{f' of group {name}' if name else ''} for SGLang..."):
                    export_dir = export_checkpoint(result.checkpoint, self.model_spec(), output_path(groups[name], "export"),
                                                   storage_options=output_options(groups[name]))  # fmt: skip
            runs[name] = self._result(result, every[name], export_dir, started, source, stats)
        if len(runs) == 1:
            return runs[None]
        first = next(iter(runs.values()))
        return dataclasses.replace(first, summary="; ".join(f"{n}: {r.summary}" for n, r in runs.items()),
                                   groups={str(n): r for n, r in runs.items()})  # fmt: skip

    @staticmethod
    def _result(result: TrainResult, settings: TrainerSettings, export_dir: str | None, started: float,
                source: SourceResult, stats: list[GeneratorStats]) -> RunResult:  # fmt: skip
        """One trainer's part of the run's result (its summary line, outputs and the timings)."""
        from pipeline.train.evaluate import eval_line  # lazy: start-up, torch loads only when the trainer runs

        summary = result.completeness.line() if result.completeness else f"{result.samples_trained} samples trained"
        if result.eval is not None:
            summary += f"; {eval_line(result.eval_step or result.step, result.eval)}"
        plot = settings.plot_path
        return RunResult(
            summary=summary,
            steps=result.step,
            reason=result.reason,
            samples_trained=result.samples_trained,
            export_dir=export_dir,
            plot_path=plot if plot and Path(plot).exists() else None,
            metrics_path=settings.metrics_path,
            wall_s=time.perf_counter() - started,
            source=source,
            generators=stats,
            eval=result.eval,
        )


def build_online_run(config: RunConfig, *, transport: Transport | None = None) -> OnlineRun:
    """Compose a run from a validated config (nothing runs until ``run()``)."""
    transport = transport or resolve_transport(config)
    store = FeatureStore(config.storage.root, config.run_id, storage_options=dict(config.storage.options))
    return OnlineRun(config, transport, store, RunTopics(config.run_id))
