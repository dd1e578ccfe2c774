"""``specstream broker ...``: the local single-node Kafka broker (KRaft) from Maven Central jars."""

from __future__ import annotations

import typer
from rich.console import Console

from pipeline.app.phases import Phases, assemble_jars
from pipeline.transport import background_broker as local_broker
from pipeline.transport import kafka_jars

__all__ = ("broker_app",)

broker_app = typer.Typer(help="A local single-node Kafka broker (KRaft) from Maven Central jars.", no_args_is_help=True)
console = Console(stderr=True)


@broker_app.command("install")
def broker_install(version: str = kafka_jars.KAFKA_VERSION) -> None:
    """Assemble the broker's jars from Maven Central into the cache (needs mvn; once)."""
    path = assemble_jars(Phases(), version)
    typer.echo(str(path))


@broker_app.command("start")
def broker_start(version: str = kafka_jars.KAFKA_VERSION, heap_mb: int = 512) -> None:
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
