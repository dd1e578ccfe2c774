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
from typing import Annotated, Optional

import typer
from rich.console import Console

from pipeline import broker as local_broker
from pipeline.errors import SpecstreamError

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


@app.command()
def generate(
    run_id: Annotated[str, typer.Option(help="The run whose prompts to consume.")],
    storage: Annotated[str, typer.Option(help="Feature storage root (path or fsspec URL).")],
    bootstrap: BootstrapOption = None,
    worker_id: Annotated[str, typer.Option(help="Stable id: a restart with the same id fences the old one.")] = "gen-0",
    partitions: Annotated[
        Optional[str], typer.Option(help="Comma-separated prompt partitions to own; default: join the group.")
    ] = None,
    backend: Annotated[str, typer.Option(help="synthetic | hf")] = "synthetic",
    model: Annotated[Optional[Path], typer.Option(help="Local HF model directory (backend hf).")] = None,
    batch_size: int = 8,
    hidden_size: Annotated[int, typer.Option(help="Hidden size (backend synthetic).")] = 64,
    dtype: str = "float32",
    transaction_timeout_ms: int = 60_000,
    session_timeout_ms: int = 45_000,
    verbose: bool = False,
) -> None:
    """Run one generator worker until its partitions end (or SIGTERM)."""
    _setup_logging(verbose)
    from pipeline.generate.worker import GeneratorConfig, GeneratorWorker  # noqa: PLC0415
    from pipeline.kafka import KafkaSettings  # noqa: PLC0415
    from pipeline.storage import FeatureStore  # noqa: PLC0415

    target = _backend(backend, model, hidden_size, dtype)
    stop = threading.Event()
    _stop_on_signals(stop)
    worker = GeneratorWorker(
        KafkaSettings(_bootstrap_or_local(bootstrap)),
        FeatureStore(storage, run_id),
        target,
        GeneratorConfig(
            run_id=run_id,
            worker_id=worker_id,
            partitions=[int(p) for p in partitions.split(",")] if partitions else None,
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


def _backend(name: str, model: Path | None, hidden_size: int, dtype: str) -> object:
    if name == "synthetic":
        from pipeline.generate.synthetic import SyntheticTarget  # noqa: PLC0415

        return SyntheticTarget(hidden_size=hidden_size, dtype=dtype)
    if name == "hf":
        if model is None:
            raise SpecstreamError("backend hf needs --model pointing at a local Hugging Face model directory")
        from pipeline.generate.hf import HFTarget  # noqa: PLC0415

        return HFTarget(model)
    raise SpecstreamError(f"unknown backend {name!r}: use synthetic or hf")


@app.command()
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
    from pipeline.dataplane_demo import run_demo  # noqa: PLC0415

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


def main() -> None:
    try:
        app()
    except SpecstreamError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise SystemExit(2) from None


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
