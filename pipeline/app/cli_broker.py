"""``specstream broker ...``: the local single-node Kafka broker (KRaft) from Maven Central jars."""

from __future__ import annotations

import os
from typing import Annotated, Optional

import typer
from rich.console import Console

from pipeline.app.phases import Phases, assemble_jars
from pipeline.core.errors import BrokerError
from pipeline.transport import background_broker as local_broker
from pipeline.transport import kafka_jars, kafka_tools

__all__ = ("broker_app",)

broker_app = typer.Typer(help="A local single-node Kafka broker (KRaft) from Maven Central jars.", no_args_is_help=True)
console = Console(stderr=True)


@broker_app.command("install")
def broker_install(version: str = kafka_jars.KAFKA_VERSION) -> None:
    """Assemble the broker's jars and Kafka's tools from Maven Central into the cache (needs mvn; once)."""
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


def _tool_bootstrap(name: str) -> str:
    """KAFKA_BOOTSTRAP_SERVERS, else the local broker of `specstream broker start`."""
    address = os.environ.get("KAFKA_BOOTSTRAP_SERVERS") or getattr(local_broker.detached_status(), "bootstrap", None)
    if not address:
        raise BrokerError(
            f"no broker for {name}: pass `-- --bootstrap-server host:port`, set KAFKA_BOOTSTRAP_SERVERS, "
            "or start the local one with `specstream broker start`"
        )
    return address


@broker_app.command("tools", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def broker_tools(
    name: Annotated[Optional[str], typer.Argument(help="The tool, as Kafka's script name (no name: list them).")] = None,
    args: Annotated[Optional[list[str]], typer.Argument(help="The tool's own arguments, after `--`.")] = None,
) -> None:
    """Run one of Apache Kafka's command-line tools from the installed jars.

    `specstream broker tools kafka-console-consumer -- --topic RUN.samples --from-beginning`;
    --bootstrap-server defaults to KAFKA_BOOTSTRAP_SERVERS, else the local broker.
    """
    if name is None:
        for tool, main_class in kafka_tools.TOOLS.items():
            typer.echo(f"{tool:<24} {main_class}")
        return
    tool_args = list(args or [])
    command = kafka_tools.tool_command(name, tool_args)  # unknown name, no java, no tools: one line
    if kafka_tools.takes_bootstrap(name, tool_args):
        command += ["--bootstrap-server", _tool_bootstrap(name)]
    os.execv(command[0], command)  # as bin/kafka-run-class.sh: the tool's exit code and signals are the command's
