"""``specstream``: the command line.

Every stage is a command that can run on its own machine; ``demo`` runs the data plane end to
end on a local broker it starts itself.
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from pipeline.core.errors import SpecstreamError
from pipeline.transport import broker as local_broker

__all__ = ("app", "main")

app = typer.Typer(
    name="specstream",
    help="Online EAGLE3 draft training on Kafka: generators stream hidden states, trainers learn.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
broker_app = typer.Typer(help="A local single-node Kafka broker (KRaft) from Maven Central jars.", no_args_is_help=True)
app.add_typer(broker_app, name="broker")
console = Console(stderr=True)
logger = logging.getLogger(__name__)

BootstrapOption = Annotated[
    Optional[str],
    typer.Option("--bootstrap", envvar="KAFKA_BOOTSTRAP_SERVERS", help="Kafka bootstrap servers (host:port,...)."),
]


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("kafka").setLevel(logging.WARNING)


def _stop_on_signals(stop: threading.Event) -> None:
    """SIGINT/SIGTERM ask the stage to finish (or abort) its transaction and exit cleanly."""

    def handler(signum: int, _frame: object) -> None:
        console.print(f"[yellow]{signal.Signals(signum).name}: finishing the current batch, then exiting")
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def _bootstrap_or_local(bootstrap: str | None) -> str:
    if bootstrap:
        return bootstrap
    running = local_broker.detached_status()
    if running is None:
        raise SpecstreamError(
            "no broker given: pass --bootstrap / set KAFKA_BOOTSTRAP_SERVERS, or start the local "
            "one with `specstream broker start`"
        )
    return running.bootstrap


# --- broker ---------------------------------------------------------------------------------


@broker_app.command("install")
def broker_install(version: str = local_broker.KAFKA_VERSION) -> None:
    """Assemble the broker's jars from Maven Central into the cache (needs mvn; once)."""
    path = local_broker.install(version)
    typer.echo(str(path))


@broker_app.command("start")
def broker_start(version: str = local_broker.KAFKA_VERSION, heap_mb: int = 512) -> None:
    """Start the local broker in the background (or find the running one); print its address."""
    state = local_broker.start_detached(version, heap_mb)
    typer.echo(state.bootstrap)
    console.print(f"Kafka {state.version} (pid {state.pid}), logs in {state.workdir}/kafka.log")


@broker_app.command("stop")
def broker_stop() -> None:
    """Stop the local broker started by `specstream broker start`."""
    if local_broker.stop_detached():
        console.print("stopped")
    else:
        console.print("no local broker was running")


@broker_app.command("status")
def broker_status() -> None:
    """Print the local broker's address, or exit 1 when none runs."""
    state = local_broker.detached_status()
    if state is None:
        console.print("no local broker is running")
        raise typer.Exit(1)
    typer.echo(state.bootstrap)


# --- stages ---------------------------------------------------------------------------------


def generate(
    config: Annotated[
        Optional[Path], typer.Option("--config", "-c", help="The run's YAML config (run, storage, target, watermarks).")
    ] = None,
    run_id: Annotated[Optional[str], typer.Option(help="Without --config: the run whose prompts to consume.")] = None,
    storage: Annotated[Optional[str], typer.Option(help="Without --config: feature storage root (path or URL).")] = None,
    bootstrap: BootstrapOption = None,
    worker_id: Annotated[str, typer.Option(help="Stable id: a restart with the same id fences the old one.")] = "gen-0",
    partitions: Annotated[
        Optional[str], typer.Option(help="Comma-separated prompt partitions to own; default: join the group.")
    ] = None,
    backend: Annotated[str, typer.Option(help="Without --config: synthetic | hf")] = "synthetic",
    model: Annotated[Optional[Path], typer.Option(help="Local HF model directory (backend hf).")] = None,
    aux_layer_ids: Annotated[
        Optional[str], typer.Option(help="Comma-separated aux layer ids (backend hf); default EAGLE3's.")
    ] = None,
    batch_size: int = 8,
    hidden_size: Annotated[int, typer.Option(help="Hidden size (backend synthetic).")] = 64,
    dtype: str = "float32",
    transaction_timeout_ms: int = 60_000,
    session_timeout_ms: int = 45_000,
    verbose: bool = False,
) -> None:
    """Run one generator worker until the prompts end (or SIGTERM).

    Start several, on one machine or many: with the same config and different --worker-id they
    share the prompt partitions through the generators' consumer group.
    """
    _setup_logging(verbose)
    from pipeline.generate.worker import GeneratorConfig, GeneratorWorker  # noqa: PLC0415
    from pipeline.storage import FeatureStore  # noqa: PLC0415
    from pipeline.transport.kafka import KafkaSettings  # noqa: PLC0415

    owned = [int(p) for p in partitions.split(",")] if partitions else None
    stop = threading.Event()
    _stop_on_signals(stop)
    if config is not None:
        from pipeline.app.runtime import build_online_run, preflight, verify_run  # noqa: PLC0415

        cfg = _load(config)
        online = build_online_run(cfg)
        preflight(cfg, online.transport, stages=("generate",))
        verify_run(online.transport, cfg)
        worker = online.generator(worker_id, owned)
    else:
        if not run_id or not storage:
            raise SpecstreamError("generate needs --config, or --run-id and --storage")
        aux = [int(i) for i in aux_layer_ids.split(",")] if aux_layer_ids else None
        worker = GeneratorWorker(
            KafkaSettings(_bootstrap_or_local(bootstrap)),
            FeatureStore(storage, run_id),
            _backend(backend, model, hidden_size, dtype, aux),
            GeneratorConfig(
                run_id=run_id,
                worker_id=worker_id,
                partitions=owned,
                batch_size=batch_size,
                transaction_timeout_ms=transaction_timeout_ms,
                session_timeout_ms=session_timeout_ms,
            ),
        )
    stats = worker.run(stop)
    console.print(
        f"generator {worker_id}: {stats.refs} samples, {stats.dropped} to the DLQ, "
        f"partitions ended {sorted(stats.ended_partitions)}"
    )


def _backend(name: str, model: Path | None, hidden_size: int, dtype: str, aux: list[int] | None = None) -> object:
    if name == "synthetic":
        from pipeline.generate.synthetic import SyntheticTarget  # noqa: PLC0415

        return SyntheticTarget(hidden_size=hidden_size, dtype=dtype)
    if name == "hf":
        if model is None:
            raise SpecstreamError("backend hf needs --model pointing at a local Hugging Face model directory")
        from pipeline.generate.hf import HFTarget  # noqa: PLC0415

        return HFTarget(model, aux_layer_ids=aux)
    raise SpecstreamError(f"unknown backend {name!r}: use synthetic or hf")


def demo(
    samples: Annotated[int, typer.Option(help="How many samples to move.")] = 64,
    partitions: int = 4,
    tokens: Annotated[int, typer.Option(help="Tokens per sample.")] = 128,
    hidden_size: int = 256,
    storage: Annotated[Optional[str], typer.Option(help="Feature storage root; default a temp dir.")] = None,
    bootstrap: BootstrapOption = None,
) -> None:
    """The data plane end to end: prompts -> generator (transactions) -> verified samples."""
    _setup_logging(False)
    from pipeline.app.demo import run_demo  # noqa: PLC0415

    if bootstrap is None:
        state = local_broker.start_detached()
        bootstrap = state.bootstrap
        console.print(f"local Kafka broker at {bootstrap} (stop it with `specstream broker stop`)")
    root = storage or tempfile.mkdtemp(prefix="specstream-demo-")
    started = time.perf_counter()
    summary = run_demo(bootstrap, root, samples=samples, partitions=partitions, tokens=tokens, hidden_size=hidden_size)
    console.print(f"features in {root}")
    typer.echo(summary.line())
    console.print(f"{time.perf_counter() - started:.1f} s")
    if not summary.ok:
        raise typer.Exit(1)


ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="The run's YAML config (see examples/).")]


def _load(config_path: Path) -> Any:
    from pipeline.app.config import load_config  # noqa: PLC0415

    return load_config(config_path)


def quickstart(
    workdir: Annotated[Path, typer.Option(help="Where the target, data, features and outputs go.")] = Path(
        "./specstream-quickstart"
    ),
    conversations: Annotated[int, typer.Option(help="Synthetic conversations to train on.")] = 768,
    max_steps: Annotated[Optional[int], typer.Option(help="Stop after this many optimizer steps.")] = None,
    bootstrap: BootstrapOption = None,
    verbose: bool = False,
) -> None:
    """The main job on a fresh machine: local broker, tiny target, online EAGLE3 training, export.

    Builds a tiny Llama target and synthetic chats locally, then runs source, generator and
    trainer interleaved on the local Kafka broker (started if needed) and prints the
    completeness summary. The config it ran is saved as WORKDIR/config.yaml.
    """
    _setup_logging(verbose)
    from pipeline.app.quickstart import quickstart_config  # noqa: PLC0415
    from pipeline.app.runtime import build_online_run  # noqa: PLC0415

    if bootstrap is None:
        state = local_broker.start_detached()
        bootstrap = state.bootstrap
        console.print(f"local Kafka broker at {bootstrap} (stop it with `specstream broker stop`)")
    console.print("building the tiny target and synthetic data (cached after the first run)...")
    config = quickstart_config(workdir, conversations=conversations, bootstrap=bootstrap, max_steps=max_steps)
    _run_and_report(build_online_run(config))


def run(config: ConfigOption, verbose: bool = False) -> None:
    """Run every stage in this process: source, generators and trainer, interleaved."""
    _setup_logging(verbose)
    from pipeline.app.runtime import build_online_run  # noqa: PLC0415

    _run_and_report(build_online_run(_load(config)))


def _run_and_report(online: Any) -> None:
    stop = threading.Event()
    _stop_on_signals(stop)
    result = online.run(stop, announce=console.print)  # the trainer prints the completeness line (rank 0)
    console.print(
        f"{result.steps} optimizer steps ({result.reason}) in {result.wall_s:.1f} s"
        + (f"; curves: {result.plot_path}" if result.plot_path else "")
        + (f"; SGLang draft: {result.export_dir}" if result.export_dir else "")
    )


def source(config: ConfigOption, verbose: bool = False) -> None:
    """Tokenize the conversations, store the draft vocabulary and publish the prompts (once)."""
    _setup_logging(verbose)
    from pipeline.app.runtime import build_online_run, claim_run, preflight  # noqa: PLC0415

    cfg = _load(config)
    online = build_online_run(cfg)
    preflight(cfg, online.transport, stages=("source",))
    claim_run(online.transport, cfg)
    result = online.source_stage().run()
    typer.echo(
        f"{result.prompts} prompts published over {cfg.data.partitions} partitions "
        f"({result.malformed} malformed lines, {result.truncated} truncated); vocab: {result.vocab_mapping_url}"
    )


def train(
    config: ConfigOption,
    device: Annotated[Optional[str], typer.Option(help="cpu or cuda (default: cuda when available).")] = None,
    verbose: bool = False,
) -> None:
    """Train the draft on the samples topic; run it under torchrun for several ranks.

    torchrun --nproc-per-node N -m pipeline.app.cli train --config run.yaml
    """
    _setup_logging(verbose)
    from pipeline.app.runtime import (  # noqa: PLC0415
        build_online_run,
        preflight,
        train_config_for,
        verify_run,
    )
    from pipeline.train.runner import run_trainer  # noqa: PLC0415

    cfg = _load(config)
    online = build_online_run(cfg)
    preflight(cfg, online.transport, stages=("train",))
    verify_run(online.transport, cfg)
    from pipeline.train.distributed import init_distributed  # noqa: PLC0415

    stop = threading.Event()
    _stop_on_signals(stop)
    dist = init_distributed(device=device)
    try:
        # One schedule for every rank and every attempt: rank 0 decides, the others follow.
        steps = dist.broadcast_object(_schedule_steps(online.transport, cfg) if dist.is_main else None)
        result = run_trainer(
            train_config_for(cfg, schedule_steps=steps),
            settings=online.transport,
            storage_root=cfg.storage.root,
            model=online.model_spec(),
            stop=stop,
            dist=dist,
            device=device,
            storage_options=dict(cfg.storage.options),
        )
    finally:
        dist.close()
    console.print(f"{result.step} optimizer steps ({result.reason}); checkpoint {result.checkpoint}")


def _schedule_steps(transport: Any, cfg: Any) -> int | None:
    """The cosine schedule's length: max_steps; else, when resuming, the one the checkpoint was
    trained with (a schedule is part of what a resume must match); else one pass over the
    prompts once the source has closed every partition; else None (constant rate)."""
    from pipeline.core.topics import RunTopics  # noqa: PLC0415
    from pipeline.source.publisher import committed_prompt_counts  # noqa: PLC0415
    from pipeline.train.checkpoint import CheckpointManager  # noqa: PLC0415

    if cfg.train.max_steps:
        return int(cfg.train.max_steps)
    manager = CheckpointManager(Path(cfg.train.output_dir) / "checkpoints")
    latest = manager.latest()
    if latest is not None:
        schedule = manager.read_meta(latest).get("config", {}).get("lr_schedule", {})
        return schedule.get("total_steps")
    counts, closed = committed_prompt_counts(transport, RunTopics(cfg.run_id), cfg.data.partitions)
    if len(closed) < cfg.data.partitions:
        console.print("[yellow]the source has not finished: constant learning rate (set train.max_steps for cosine)")
        return None
    return max(1, sum(counts.values()) // cfg.global_batch)


def status(
    run_id: Annotated[Optional[str], typer.Option(help="The run to inspect.")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="Or take run and broker from a config.")] = None,
    bootstrap: BootstrapOption = None,
) -> None:
    """Per partition: produced, dropped, consumed, lag and end-of-stream state; DLQ; samples/s."""
    from pipeline.app.status import render_status, run_status  # noqa: PLC0415
    from pipeline.transport.kafka import KafkaSettings  # noqa: PLC0415

    if config is not None:
        cfg = _load(config)
        run_id = run_id or cfg.run_id
        bootstrap = bootstrap or cfg.broker.bootstrap_servers
    if not run_id:
        raise SpecstreamError("status needs --run-id or --config")
    typer.echo(render_status(run_status(KafkaSettings(_bootstrap_or_local(bootstrap)), run_id)))


def export(
    config: ConfigOption,
    checkpoint: Annotated[Optional[Path], typer.Option(help="Checkpoint directory; default the newest.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Output directory; default OUTPUT_DIR/export.")] = None,
) -> None:
    """Write an SGLang-loadable EAGLE3 draft (config.json + model.safetensors) from a checkpoint."""
    from pipeline.app.runtime import build_online_run  # noqa: PLC0415
    from pipeline.train.checkpoint import CheckpointManager  # noqa: PLC0415
    from pipeline.train.export import export_checkpoint  # noqa: PLC0415

    cfg = _load(config)
    if checkpoint is None:
        latest = CheckpointManager(Path(cfg.train.output_dir) / "checkpoints").latest()
        if latest is None:
            raise SpecstreamError(f"no checkpoint under {cfg.train.output_dir}/checkpoints: train first")
        checkpoint = latest.path
    online = build_online_run(cfg, transport=_NoBroker())
    target = export_checkpoint(checkpoint, online.model_spec(), str(out or Path(cfg.train.output_dir) / "export"))
    typer.echo(target)


def replay(
    config: ConfigOption,
    out: Annotated[Path, typer.Option(help="Where the replay's checkpoints and metrics go.")] = Path("./replay"),
    verbose: bool = False,
) -> None:
    """Train again from the retained samples and features; compare every step's loss with the ledger.

    Needs the run's features retained (storage.retention: retain). With train.deterministic: true
    on CPU the losses are bit-identical to the live run's.
    """
    _setup_logging(verbose)
    from pipeline.app.replay import replay_run  # noqa: PLC0415

    stop = threading.Event()
    _stop_on_signals(stop)
    report = replay_run(_load(config), str(out), stop=stop)
    typer.echo(report.line())
    if report.first_difference is not None:
        raise typer.Exit(1)


class _NoBroker:
    """Export needs no broker; anything that tries to reach one is a bug."""

    bootstrap_servers = "none"

    def __getattr__(self, name: str) -> Any:
        raise SpecstreamError(f"export does not talk to Kafka (asked for {name})")


# Commands in the order --help shows them: the main job first, then the stages, then tools.
app.command()(quickstart)
app.command()(run)
app.command()(source)
app.command()(generate)
app.command()(train)
app.command()(status)
app.command()(export)
app.command()(replay)
app.command()(demo)


def main() -> None:
    """Exit 0: done or cleanly stopped; 2: a setting or the broker is wrong (fix and rerun);
    1: the run failed while running (look at the message, then restart or resume)."""
    from pipeline.core.errors import BrokerError, ConfigError, RunMismatchError  # noqa: PLC0415

    try:
        app()
    except (ConfigError, BrokerError, RunMismatchError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise SystemExit(2) from None
    except SpecstreamError as exc:
        console.print(f"[red]error:[/red] {type(exc).__name__}: {exc}")
        raise SystemExit(1) from None


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
