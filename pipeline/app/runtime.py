"""The single-process runtime: one validated config -> source, generators and trainer, interleaved.

``build_online_run(config)`` composes the stages over one transport (the Kafka broker named by the
config, the local broker, or the in-process ``MemoryBroker``) and one storage root, and returns
an ``OnlineRun`` with handles to the parts and a ``run()`` that executes the interleaved loop:

1. claim the run: create its topics, write the run manifest, refuse topics that belong to a run
   with another configuration;
2. the source stage tokenizes the conversations, stores the draft vocabulary mapping and
   publishes the prompts (fast, before anything else: the trainer needs the mapping);
3. generator workers capture and publish on threads while the trainer trains on the main thread
   (``pipeline.app.interleave``: every ending is bounded, a producer's error is re-raised here);
4. the draft is exported for SGLang from the final checkpoint.

The same stages run as separate processes through the CLI (``source``, ``generate``, ``train``).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.app.config import RunConfig
from pipeline.app.interleave import run_interleaved
from pipeline.core.errors import ConfigError, RunMismatchError
from pipeline.core.messages import RunManifest, decode, encode, now
from pipeline.core.topics import RunTopics, Transport, read_to_end
from pipeline.storage import FeatureStore
from pipeline.transport.kafka import KafkaSettings

__all__ = (
    "OnlineRun",
    "RunResult",
    "build_online_run",
    "resolve_transport",
    "preflight",
    "claim_run",
    "verify_run",
    "train_config_for",
)

logger = logging.getLogger(__name__)


@dataclass
class RunResult:
    summary: str
    steps: int
    reason: str
    samples_trained: int
    export_dir: str | None
    plot_path: str | None
    metrics_path: str | None
    wall_s: float
    first_step_s: float | None = None
    source: Any = None
    generators: list[Any] = field(default_factory=list)


def resolve_transport(config: RunConfig) -> Transport:
    """The config's broker, else the local broker (started in the background if needed)."""
    if config.broker.bootstrap_servers == "memory":  # in-process: a single process, no Kafka
        from pipeline.transport.memory import MemoryBroker  # noqa: PLC0415

        return MemoryBroker()
    if config.broker.bootstrap_servers:
        return KafkaSettings(config.broker.bootstrap_servers, client_options=dict(config.broker.client_options))
    from pipeline.transport.broker import start_detached  # noqa: PLC0415

    state = start_detached()
    logger.info("using the local broker at %s", state.bootstrap)
    return KafkaSettings(state.bootstrap, client_options=dict(config.broker.client_options))


def preflight(config: RunConfig, transport: Transport, *, stages: tuple[str, ...] = ("source", "generate", "train")) -> None:
    """Check what would fail later, before anything is written: one clear error each."""
    import fsspec  # noqa: PLC0415

    target = config.target
    if target.backend in ("hf", "sglang") and {"source", "generate", "train"} & set(stages):
        model = Path(str(target.model))
        if not (model / "config.json").is_file():
            raise ConfigError(
                "target.model",
                f"{model} is not a model directory (no config.json there)",
                "point it at a local Hugging Face model directory (downloaded beforehand: nothing is fetched at run time)",
            )
    if "source" in stages:
        fs, path = fsspec.url_to_fs(config.data.path)
        if not fs.exists(path):
            raise ConfigError("data.path", f"{config.data.path} does not exist", "point it at a JSONL file of conversations")
    fs, root = fsspec.url_to_fs(config.storage.root, **dict(config.storage.options))
    from fsspec.implementations.local import LocalFileSystem  # noqa: PLC0415

    if isinstance(fs, LocalFileSystem):
        _check_writable(Path(root), config.storage.root)
    with transport.admin() as admin:  # an unreachable broker fails here, with the address
        admin.topics()


def _check_writable(root: Path, shown: str) -> None:
    """Create and remove a temp dir in the nearest existing ancestor: leaves nothing behind, and
    unlike ``os.access`` it also tells the truth for root and for read-only mounts."""
    import tempfile  # noqa: PLC0415

    probe = root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        if not probe.is_dir():
            raise NotADirectoryError(f"{probe} is a file")
        Path(tempfile.mkdtemp(prefix=".specstream-probe-", dir=probe)).rmdir()
    except OSError as exc:
        raise ConfigError(
            "storage.root",
            f"{shown} cannot be written ({exc})",
            "choose a directory you can write, or fix its permissions",
        ) from None


def claim_run(transport: Transport, config: RunConfig) -> RunManifest:
    """Create the run's topics and manifest; refuse a run id already used by another config."""
    topics = RunTopics(config.run_id)
    with transport.admin() as admin:
        admin.ensure_run_topics(topics, config.data.partitions)
    manifest = RunManifest(
        run_id=config.run_id,
        config_hash=config.fingerprint(),
        partitions=config.data.partitions,
        world_size=config.train.world_size,
        storage_root=config.storage.root,
        vocab_mapping_uri="vocab_mapping.safetensors",
        created_at=now(),
    )
    existing = _read_manifest(transport, topics)
    if existing is not None:
        if existing.config_hash != manifest.config_hash:
            raise RunMismatchError(
                f"run {config.run_id} already exists with another configuration (manifest "
                f"{existing.config_hash}, this config {manifest.config_hash}): use a new run_id, "
                "or restore the original config to resume"
            )
        return existing
    producer = transport.plain_producer()
    try:
        producer.send(topics.manifest, encode(manifest), partition=0, key=b"manifest")
        producer.flush()
    finally:
        producer.close()
    return manifest


def verify_run(transport: Transport, config: RunConfig) -> None:
    """A stage joining a run (generate, train) refuses a run whose manifest has another config."""
    existing = _read_manifest(transport, RunTopics(config.run_id))
    if existing is not None and existing.config_hash != config.fingerprint():
        raise RunMismatchError(
            f"run {config.run_id} was started with another configuration (manifest {existing.config_hash}, "
            f"this config {config.fingerprint()}): give every stage the same config file"
        )


def _read_manifest(transport: Transport, topics: RunTopics) -> RunManifest | None:
    with transport.admin() as admin:
        if topics.manifest not in admin.topics():
            return None
    found = None
    for record in read_to_end(transport, topics.manifest, [0], timeout_s=30):
        message = decode(record.value or b"")
        if isinstance(message, RunManifest):
            found = message  # compacted topic: the newest manifest counts
    return found


def train_config_for(config: RunConfig, *, schedule_steps: int | None) -> Any:
    """The trainer's own config from the run config."""
    from pipeline.train.config import TrainConfig  # noqa: PLC0415

    t = config.train
    out = Path(t.output_dir)
    return TrainConfig(
        run_id=config.run_id,
        checkpoint_dir=str(out / "checkpoints"),
        batch_size=t.batch_size,
        grad_accum=t.grad_accum,
        lr=t.lr,
        warmup_ratio=t.warmup_ratio,
        schedule="cosine" if (schedule_steps or t.max_steps) else "constant",
        schedule_steps=schedule_steps,
        max_steps=t.max_steps,
        ttt_steps=t.ttt_steps,
        max_length=t.max_length or config.data.max_length,
        seed=t.seed,
        deterministic=t.deterministic,
        save_interval=t.save_interval,
        keep_last=t.keep_checkpoints,
        retention=config.storage.retention,
        prefetch=t.prefetch,
        metrics_path=str(out / "metrics.jsonl"),
        plot_path=str(out / "curves.png"),
        progress=True,
    )


@dataclass
class OnlineRun:
    """Handles to a composed run; ``run()`` executes it."""

    config: RunConfig
    transport: Transport
    store: FeatureStore
    topics: RunTopics

    def make_backend(self) -> Any:
        target = self.config.target
        if target.backend == "synthetic":
            from pipeline.generate.synthetic import SyntheticTarget  # noqa: PLC0415

            return SyntheticTarget(hidden_size=64, dtype=target.dtype or "float32")
        if target.backend == "hf":
            from pipeline.generate.hf import HFTarget  # noqa: PLC0415

            return HFTarget(
                target.model, device=target.device, dtype=target.dtype, aux_layer_ids=target.aux_layer_ids
            )
        from pipeline.generate.sglang import SGLangTarget  # noqa: PLC0415

        return SGLangTarget(target.model, aux_layer_ids=target.aux_layer_ids, dtype=target.dtype or "auto")

    def source_stage(self) -> Any:
        from pipeline.source.stage import SourceConfig, SourceStage  # noqa: PLC0415

        c = self.config
        return SourceStage(
            self.transport,
            SourceConfig(
                run_id=c.run_id,
                data=c.data.path,
                tokenizer=str(c.target.model),
                partitions=c.data.partitions,
                storage_root=c.storage.root,
                max_length=c.data.max_length,
                on_malformed=c.data.on_malformed,
                draft_vocab_size=c.train.draft_vocab_size,
                limit=c.data.limit,
                transaction_timeout_ms=c.broker.transaction_timeout_ms,
                storage_options=dict(c.storage.options),
            ),
        )

    def generator(self, worker_id: str, partitions: list[int] | None) -> Any:
        from pipeline.generate.backpressure import TrainerWindow, Watermarks  # noqa: PLC0415
        from pipeline.generate.worker import GeneratorConfig, GeneratorWorker  # noqa: PLC0415

        c = self.config
        config = GeneratorConfig(
            run_id=c.run_id,
            worker_id=worker_id,
            partitions=partitions,
            batch_size=c.target.batch_size,
            transaction_timeout_ms=c.broker.transaction_timeout_ms,
            session_timeout_ms=c.broker.session_timeout_ms,
            backpressure=Watermarks(
                high=c.generate.high_watermark,
                low=c.generate.low_watermark,
                high_bytes=c.generate.high_watermark_bytes,
                low_bytes=c.generate.low_watermark_bytes,
            ),
            trainer=TrainerWindow(
                world_size=c.train.world_size,
                batch_size=c.train.batch_size,
                grad_accum=c.train.grad_accum,
                prefetch=c.train.prefetch * c.train.batch_size,
            ),
        )
        return GeneratorWorker(self.transport, self.store, self.make_backend(), config)

    def model_spec(self) -> Any:
        from pipeline.train.model import ModelSpec  # noqa: PLC0415

        target = self.config.target
        ids = tuple(target.aux_layer_ids) if target.aux_layer_ids else None
        return ModelSpec(
            target_model_path=str(target.model),
            vocab_mapping=f"{self.store.root_url.rstrip('/')}/{self.config.run_id}/vocab_mapping.safetensors",
            aux_layer_ids=ids,  # type: ignore[arg-type]
        )

    def projected_storage(self, avg_tokens: float) -> str:
        """DESIGN 4.4: exact resume keeps one checkpoint interval of features on storage."""
        import json  # noqa: PLC0415

        c = self.config
        hidden, dtype_bytes = 0, 2
        config_file = Path(str(c.target.model)) / "config.json"
        if config_file.is_file():
            target = json.loads(config_file.read_text())
            hidden = int(target.get("hidden_size") or target.get("text_config", {}).get("hidden_size", 0))
            dtype_bytes = 4 if (c.target.dtype or target.get("torch_dtype") or target.get("dtype")) == "float32" else 2
        if not hidden:
            return "projected peak feature storage: unknown (no hidden size in the target config)"
        per_sample = avg_tokens * (4 * hidden * dtype_bytes + 9)  # aux 3H + final H, ids int64, mask uint8
        window = c.train.save_interval * c.global_batch if c.storage.retention == "delete" else None
        if window is None:
            return (
                f"feature storage grows with the run (retention: retain): ~{per_sample / 1e6:.2f} MB per sample"
            )
        peak = (window + c.generate.high_watermark) * per_sample
        return (
            f"projected peak feature storage: ({c.train.save_interval} x {c.global_batch} + "
            f"{c.generate.high_watermark}) samples x {per_sample / 1e6:.2f} MB = {peak / 1e9:.2f} GB"
        )

    def run(self, stop: threading.Event | None = None, announce: Any = None) -> RunResult:
        """Source, then generators (threads) and trainer (here) interleaved, then export.

        ``announce`` receives the start-up facts a person should see (e.g. projected storage).
        """
        announce = announce or logger.info
        from pipeline.train.distributed import DistContext  # noqa: PLC0415
        from pipeline.train.runner import run_trainer  # noqa: PLC0415

        started = time.perf_counter()
        c = self.config
        if c.train.world_size != 1:
            raise ConfigError(
                "train.world_size",
                f"the single-process runtime trains on one rank, the config asks for {c.train.world_size}",
                "run the stages as processes (`specstream train` under torchrun), or set world_size: 1",
            )
        preflight(c, self.transport)
        claim_run(self.transport, c)
        source = self.source_stage().run()
        announce(self.projected_storage(source.tokens / max(1, source.prompts)))
        schedule = c.train.max_steps or max(1, source.prompts // c.global_batch)
        train_config = train_config_for(c, schedule_steps=schedule)
        workers = [
            self.generator(f"{c.run_id}-gen-{i}", list(range(i, c.data.partitions, c.generate.workers)))
            for i in range(min(c.generate.workers, c.data.partitions))
        ]
        stats: list[Any] = []

        def producer(worker: Any) -> Any:
            def run(stop_event: threading.Event) -> None:
                stats.append(worker.run(stop_event))

            return run

        def trainer(stop_event: threading.Event) -> Any:
            return run_trainer(
                train_config,
                settings=self.transport,
                storage_root=c.storage.root,
                model=self.model_spec(),
                stop=stop_event,
                dist=DistContext(),
                device=c.target.device if c.target.device.startswith("cuda") else "cpu",
                storage_options=dict(c.storage.options),
            )

        outcome = run_interleaved([producer(w) for w in workers], trainer, stop=stop)
        result = outcome.trainer
        export_dir = None
        if result.checkpoint:
            from pipeline.train.export import export_checkpoint  # noqa: PLC0415

            export_dir = export_checkpoint(result.checkpoint, self.model_spec(), str(Path(c.train.output_dir) / "export"))
        summary = result.completeness.line() if result.completeness else f"{result.samples_trained} samples trained"
        return RunResult(
            summary=summary,
            steps=result.step,
            reason=result.reason,
            samples_trained=result.samples_trained,
            export_dir=export_dir,
            plot_path=train_config.plot_path if Path(train_config.plot_path).exists() else None,
            metrics_path=train_config.metrics_path,
            wall_s=time.perf_counter() - started,
            source=source,
            generators=stats,
        )


def build_online_run(config: RunConfig, *, transport: Transport | None = None) -> OnlineRun:
    """Compose a run from a validated config (nothing runs until ``run()``)."""
    transport = transport or resolve_transport(config)
    store = FeatureStore(config.storage.root, config.run_id, storage_options=dict(config.storage.options))
    return OnlineRun(config, transport, store, RunTopics(config.run_id))
