"""What every ``specstream`` command shares: options, logging, signals, the broker and the config."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.console import Console

from pipeline.core.errors import BrokerError, OptionError
from pipeline.transport import background_broker as local_broker

if TYPE_CHECKING:
    from pipeline.app.config import RunConfig
    from pipeline.core.topics import Transport

__all__ = (
    "console", "BootstrapOption", "ConfigOption", "VerboseOption", "RunIdOption", "OptionalConfig", "GroupOption",
    "verbose_on",
    "rank", "setup_logging", "stop_on_signals", "broker_address", "load", "start_local_broker", "run_transport",
)  # fmt: skip

console = Console(stderr=True)

BootstrapOption = Annotated[
    Optional[str],
    typer.Option("--bootstrap", envvar="KAFKA_BOOTSTRAP_SERVERS", help="Kafka bootstrap servers (host:port,...)."),
]
ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="The run's YAML config (see examples/).")]
VerboseOption = Annotated[bool, typer.Option("--verbose", "-v", help="Log progress (INFO).")]


_state = {"verbose": False}  # set by the command: --verbose prints an unexpected error's traceback


def verbose_on() -> bool:
    """Whether the running command was given --verbose."""
    return _state["verbose"]


def rank() -> str:
    """This process's torchrun rank ("0" outside torchrun)."""
    return os.environ.get("RANK", "") or "0"


#: Loggers whose INFO lines show by default: a stage paused or waiting says so, and why.
_OPERATOR_LOGGERS = ("pipeline.generate.liveness", "pipeline.core.heartbeat")


def setup_logging(verbose: bool, *, operator_lines: bool = True) -> None:
    """Quiet by default (one error line tells what failed), but for the operator lines of a stage
    process (a generator paused or waiting says so, and why); INFO with --verbose. The
    single-process run passes ``operator_lines=False``: its progress bars already show generation
    keeping pace, and its normal backpressure cycles would flood the screen."""
    _state["verbose"] = verbose
    rank_tag = f" rank{rank()}" if os.environ.get("WORLD_SIZE") else ""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format=f"%(asctime)s{rank_tag} %(levelname)s %(name)s: %(message)s",
    )
    # kafka-python logs every retry of its network thread; what it means reaches the user as one
    # error line. Its records are still made (the Kafka adapter reads a failed bootstrap's causes
    # from them), only not printed without --verbose.
    logging.getLogger("kafka").setLevel(logging.WARNING)
    # What an operator must see without --verbose: backpressure pausing and resuming a generator,
    # and a line every heartbeat interval while a stage waits (item 1 of the operator's view).
    for name in _OPERATOR_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if operator_lines or verbose else logging.WARNING)
    if not verbose:
        for handler in logging.getLogger().handlers:
            handler.addFilter(lambda record: not record.name.startswith("kafka"))


def stop_on_signals() -> threading.Event:
    """SIGINT/SIGTERM ask the stage to finish (or abort) its transaction and exit cleanly; a
    SIGINT after that (a second Ctrl-C) ends the process at once with 130, draining nothing (open
    transactions are aborted by the broker, or fenced by the next start)."""
    stop = threading.Event()

    def handler(signum: int, _frame: object) -> None:
        again = stop.is_set()
        stop.set()  # before printing: a second signal may run this handler inside the first one
        if again and signum == signal.SIGINT:
            console.print("[red]SIGINT again: exiting now, without finishing the step")
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)
        if not again and rank() == "0":  # torchrun signals every rank: say it once
            console.print(
                f"[yellow]{signal.Signals(signum).name}: finishing the current step, then exiting "
                "(Ctrl-C again to exit at once)"
            )

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return stop


def broker_address(flag: str | None, configured: str | None = None) -> tuple[str, str]:
    """The broker's address and where it came from: ``--bootstrap`` (or its variable), the
    config, or the local broker of ``specstream broker start``."""
    from pipeline.app.config_file import bootstrap_origin  # lazy: start-up, pydantic + kafka-python

    if flag:
        given = any(arg == "--bootstrap" or arg.startswith("--bootstrap=") for arg in sys.argv)
        return flag, "--bootstrap" if given else "KAFKA_BOOTSTRAP_SERVERS"
    if configured:
        return configured, bootstrap_origin()
    running = local_broker.detached_status()
    if running is None:
        raise BrokerError(
            "no broker given: pass --bootstrap / set KAFKA_BOOTSTRAP_SERVERS, or start the local "
            "one with `specstream broker start`"
        )
    return running.bootstrap, local_broker.ORIGIN


def load(path: Path) -> RunConfig:
    """The validated run config (a bad key is one error line naming it)."""
    from pipeline.app.config_file import load_config  # lazy: start-up, pydantic + kafka-python: only when a command reads a config

    return load_config(path)


def with_device(cfg: RunConfig, device: str | None) -> RunConfig:
    """``cfg`` with ``target.device`` set for this process only (``--device``: one generator process
    per GPU, each with its own); the result is validated like the file (a bad device names the key)."""
    if device is None:
        return cfg
    from pipeline.app.config_file import parse_config  # lazy: start-up, pydantic + kafka-python

    data = cfg.model_dump(mode="json")
    data["target"]["device"] = device
    return parse_config(data, source="--device")


def start_local_broker() -> str:
    """Start (or find) the user's local broker and say where it is."""
    state = local_broker.start_detached()
    console.print(f"local Kafka broker at {state.bootstrap} (stop it with `specstream broker stop`)")
    return state.bootstrap




RunIdOption = Annotated[Optional[str], typer.Option("--run-id", help="The run to inspect.")]
GroupOption = Annotated[Optional[str], typer.Option("--group", help="One trainer group of the run's `train_groups`.")]
OptionalConfig = Annotated[
    Optional[Path], typer.Option("--config", "-c", help="Or take run and broker from a config.")
]


def run_transport(run_id: str | None, config: Path | None, bootstrap: str | None) -> tuple[str, Transport]:
    """The run id and a broker connection, from a config or from --run-id and --bootstrap."""
    if config is not None:
        from pipeline.app.settings import kafka_settings  # lazy: start-up, torch, through the stage dataclasses

        cfg = load(config)
        address, origin = broker_address(bootstrap, cfg.broker.bootstrap_servers)
        return run_id or cfg.run_id, kafka_settings(cfg, address, origin=origin)
    if not run_id:
        raise OptionError("--run-id", "is missing", "pass --run-id or --config")
    from pipeline.transport.kafka import KafkaSettings  # lazy: start-up, kafka-python

    address, origin = broker_address(bootstrap)
    return run_id, KafkaSettings(address, origin=origin)
