"""``specstream``: the one command line.

Every stage is a command that can run on its own machine, configured by one YAML file
(``--config``); ``train`` runs under torchrun for several ranks
(``torchrun --nproc-per-node N --no-python specstream train --config run.yaml``). ``demo`` runs
the data plane end to end on a local broker it starts itself.

The stage commands import the runtime (torch, transformers, kafka-python) when they run, not at
the top: ``--help``, ``broker`` and ``config`` answer without loading them.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.markup import escape

from pipeline.app.cli_broker import broker_app
from pipeline.app.cli_common import (
    BootstrapOption,
    ConfigOption,
    GroupOption,
    VerboseOption,
    broker_address,
    console,
    load,
    rank,
    setup_logging,
    start_local_broker,
    stop_on_signals,
    verbose_on,
    with_device,
)
from pipeline.app.cli_acls import acls
from pipeline.app.cli_inspect import audit, dlq, status
from pipeline.app.cli_sweep import sweep
from pipeline.app.cli_topics import topics_app
from pipeline.app.failures import explain
from pipeline.app.phases import Phases, local_broker_phase
from pipeline.core.errors import (
    BrokerError,
    ConfigError,
    OptionError,
    PartitionsClaimedError,
    RunMismatchError,
    SpecstreamError,
)
from pipeline.core.topics import FencedError, TransportError
from pipeline.transport import background_broker as local_broker

if TYPE_CHECKING:
    from pipeline.app.runtime import OnlineRun

__all__ = ("app", "main")

app = typer.Typer(
    name="specstream",
    help="Online EAGLE3 draft training on Kafka: generators stream hidden states, trainers learn.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="The run config: its reference, and a check of a file.", no_args_is_help=True)
app.add_typer(broker_app, name="broker")
app.add_typer(config_app, name="config")
app.add_typer(topics_app, name="topics")
logger = logging.getLogger(__name__)
MetricsPortOption = Annotated[
    Optional[int],
    typer.Option(help="Serve Prometheus metrics on this port (/metrics); 0: any free port; overrides "
                 "monitor.metrics_port (a trainer rank adds its LOCAL_RANK)."),
]  # fmt: skip


def _say(line: str) -> None:  # one line, never wrapped: scripts and tests read the URL from it
    console.print(line, soft_wrap=True, markup=False, highlight=False)

# --- the main job ---------------------------------------------------------------------------


def quickstart(
    workdir: Annotated[Path, typer.Option(help="Where the target, data, features and outputs go.")] = Path(
        "./specstream-quickstart"
    ),
    conversations: Annotated[int, typer.Option(help="Synthetic conversations to train on.")] = 768,
    max_steps: Annotated[Optional[int], typer.Option(help="Stop after this many optimizer steps.")] = None,
    bootstrap: BootstrapOption = None,
    metrics_port: MetricsPortOption = None,
    verbose: VerboseOption = False,
) -> None:
    """The main job on a fresh machine: local broker, tiny target, online EAGLE3 training, export.

    Builds a tiny Llama target and synthetic chats locally, then runs source, generator and
    trainer interleaved on the local Kafka broker (started if needed) and prints the
    completeness summary. The config it ran is saved as WORKDIR/config.yaml; the same
    quickstart again continues that run, and a WORKDIR that holds another run is refused.
    """
    setup_logging(verbose, operator_lines=False)
    phases = Phases()
    from pipeline.app.quickstart import continued_run_id, quickstart_config  # lazy: start-up, torch
    from pipeline.app.runtime import build_online_run  # lazy: start-up, torch, transformers
    from pipeline.app.settings import kafka_settings  # lazy: start-up, torch

    run_id = continued_run_id(workdir, conversations, max_steps)  # another run in the workdir stops here
    address, origin = broker_address(bootstrap) if bootstrap else (local_broker_phase(phases), local_broker.ORIGIN)
    if run_id is not None:
        console.print(f"continuing run {run_id} in {workdir}")
    with phases.phase("target", "building the tiny target and synthetic data (cached after the first run)..."):
        config = quickstart_config(workdir, conversations=conversations, bootstrap=address, max_steps=max_steps,
                                   run_id=run_id, progress=phases.bar)  # fmt: skip
    _run_and_report(
        build_online_run(config, transport=kafka_settings(config, address, origin=origin)), phases, metrics_port
    )


def run(config: ConfigOption, metrics_port: MetricsPortOption = None, verbose: VerboseOption = False) -> None:
    """Run every stage in this process: source, generators and trainer, interleaved."""
    setup_logging(verbose, operator_lines=False)
    from pipeline.app.preflight import check_local  # lazy: start-up, fsspec
    from pipeline.app.runtime import build_online_run  # lazy: start-up, torch, transformers

    phases = Phases()
    cfg = load(config)
    check_local(cfg)  # before the local broker may be started for it
    if not cfg.broker.bootstrap_servers and local_broker.detached_status() is None:
        local_broker_phase(phases)  # resolve_transport finds it running
    _run_and_report(build_online_run(cfg), phases, metrics_port)


def _run_and_report(online: OnlineRun, phases: Phases, metrics_port: int | None) -> None:
    """Run it (serving metrics when asked); the trainer prints the summary line after its bar
    closes, then the outputs and the whole command's wall time with what each phase took."""
    from pipeline.app.metrics_server import start_metrics  # lazy: start-up, prometheus_client loads for the stages

    stop = stop_on_signals()
    c = online.config
    live = start_metrics(c.monitor.metrics_port, metrics_port, c.run_id, transport=online.transport, say=_say)
    result = online.run(stop, announce=phases.say, phases=phases, watch=live)
    phases.say(result.outputs_line())
    phases.say(phases.summary())


# --- the stages as processes ----------------------------------------------------------------


def source(config: ConfigOption, verbose: VerboseOption = False) -> None:
    """Tokenize the conversations, store the draft vocabulary and publish the prompts (once).

    SIGINT/SIGTERM abort the open chunk and stop; the same command again continues exactly."""
    setup_logging(verbose)
    stop = stop_on_signals()
    from pipeline.app.manifest import claim_run  # lazy: start-up, kafka-python
    from pipeline.app.preflight import check_broker, check_local  # lazy: start-up, fsspec
    from pipeline.app.runtime import build_online_run  # lazy: start-up, torch, transformers

    cfg = load(config)
    check_local(cfg, ("source",))
    online = build_online_run(cfg)
    check_broker(online.transport)
    claim_run(online.transport, cfg)
    result = online.source_stage().run(stop)
    if result.stats.stopped:
        console.print(_SOURCE_STOPPED)
        return
    typer.echo(
        f"{result.prompts} prompts published over {cfg.data.partitions} partitions "
        f"({result.malformed} malformed lines, {result.truncated} truncated); vocab: {result.vocab_mapping_url}"
    )


_SOURCE_STOPPED = (
    "source stopped before the end: the prompts committed so far stay, the open chunk was aborted; "
    "run the same command again to continue (no prompt is published twice)"
)


def generate(
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="The run's YAML config.")] = None,
    worker_id: Annotated[
        Optional[str],
        typer.Option(
            help="A restart with the same id fences the old one. Default: gen-p<partitions> with --partitions "
            "(a restart of the same set takes over at once), else <host>-<pid> (unique per process)."
        ),
    ] = None,
    partitions: Annotated[
        Optional[str], typer.Option(help="Comma-separated prompt partitions to own; default: join the group.")
    ] = None,
    device: Annotated[
        Optional[str], typer.Option(help="Overrides target.device (cuda:N): one generator process per GPU.")
    ] = None,
    run_id: Annotated[Optional[str], typer.Option(help="Without --config: the run whose prompts to consume.")] = None,
    storage: Annotated[Optional[str], typer.Option(help="Without --config: feature storage root.")] = None,
    bootstrap: BootstrapOption = None,
    backend: Annotated[
        Optional[str], typer.Option(help="Without --config: synthetic | hf (required: no silent default).")
    ] = None,
    model: Annotated[Optional[Path], typer.Option(help="Without --config: local HF model directory.")] = None,
    aux_layer_ids: Annotated[Optional[str], typer.Option(help="Without --config: e.g. 0,1,2.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Without --config: target.batch_size.")] = None,
    hidden_size: Annotated[int, typer.Option(help="Without --config, backend synthetic: hidden size.")] = 64,
    dtype: Annotated[Optional[str], typer.Option(help="Without --config: target.dtype.")] = None,
    transaction_timeout_ms: Annotated[Optional[int], typer.Option(help="Without --config.")] = None,
    session_timeout_ms: Annotated[Optional[int], typer.Option(help="Without --config.")] = None,
    metrics_port: MetricsPortOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Run one generator worker until the prompts end (or SIGTERM).

    Start several, on one machine or many: with the same config and different --worker-id they
    share the prompt partitions through the generators' consumer group. Without --config, the
    flags describe a bare worker without backpressure (the data plane alone, for tests and
    benchmarks); unset ones take the run config's defaults.
    """
    setup_logging(verbose)
    from pipeline.app.generate_job import ad_hoc_generator, configured_generator  # lazy: start-up, torch
    from pipeline.app.metrics_server import start_metrics  # lazy: start-up, prometheus_client loads for the stages

    from pipeline.generate.claims import default_worker_id  # lazy: start-up, through the generate package

    owned = [int(p) for p in partitions.split(",")] if partitions else None
    stop = stop_on_signals()  # a worker started before the source waits for it, and a signal ends that wait
    worker_id = worker_id or default_worker_id(owned)
    cfg = with_device(load(config), device) if config is not None else None
    live = start_metrics(cfg.monitor.metrics_port if cfg else None, metrics_port, cfg.run_id if cfg else run_id or "",
                         say=_say)  # fmt: skip
    if cfg is not None:
        worker = configured_generator(cfg, worker_id, owned, stop)
    else:
        if not run_id or not storage:
            raise OptionError("--config", "is missing", "pass --config, or --run-id and --storage")
        if backend is None:  # a real run must never fall back to random synthetic features
            raise OptionError("--backend", "is missing", "pass --config for a run, or --backend synthetic|hf")
        overrides: dict[str, dict[str, Any]] = {
            "target": {"backend": backend, "model": str(model) if model else None, "dtype": dtype, "device": device,
                       "batch_size": batch_size,
                       "aux_layer_ids": [int(i) for i in aux_layer_ids.split(",")] if aux_layer_ids else None},
            "broker": {"transaction_timeout_ms": transaction_timeout_ms, "session_timeout_ms": session_timeout_ms},
        }  # fmt: skip
        address, origin = broker_address(bootstrap)
        worker = ad_hoc_generator(
            run_id, storage, address, worker_id, owned, overrides, hidden_size=hidden_size, origin=origin
        )
    where = f"partitions {','.join(map(str, owned))}" if owned else "partitions from the group"
    logger.info("generator %s (transactional id %s): %s", worker_id, worker.transactional_id, where)
    live.watch_generator(worker)
    stats = worker.run(stop)
    console.print(
        f"generator {worker_id}: {stats.refs} samples, {stats.dropped} to the DLQ, "
        f"partitions ended {sorted(stats.ended_partitions)}"
    )


def train(config: ConfigOption, metrics_port: MetricsPortOption = None, verbose: VerboseOption = False,
          group: GroupOption = None) -> None:  # fmt: skip
    """Train the draft on the samples topic; under torchrun, one process per rank.

    torchrun --nproc-per-node N --no-python specstream train --config run.yaml [--group NAME]
    """
    setup_logging(verbose)
    from pipeline.app.metrics_server import start_metrics  # lazy: start-up, prometheus_client loads for the stages
    from pipeline.app.train_job import train_rank  # lazy: start-up, torch

    def warn(line: str) -> None:  # one line, never wrapped: scripts grep it
        console.print(f"[yellow]{escape(line)}", soft_wrap=True)

    cfg = load(config)
    stop = stop_on_signals()
    live = start_metrics(cfg.monitor.metrics_port, metrics_port, cfg.run_id, say=_say, per_local_rank=True)
    job = train_rank(cfg, stop, warn=warn, watch=live, group=group)
    if job.is_main:  # the summary line itself comes from the trainer, on rank 0
        console.print(f"{job.result.step} optimizer steps ({job.result.reason}); checkpoint {job.result.checkpoint}")


# --- tools ----------------------------------------------------------------------------------


def export(
    config: ConfigOption,
    checkpoint: Annotated[Optional[str], typer.Option(help="Checkpoint directory or URL; default the newest.")] = None,
    out: Annotated[Optional[str], typer.Option(help="Output directory or URL; default OUTPUT_DIR/export.")] = None,
    group: GroupOption = None,
) -> None:
    """Write an SGLang-loadable EAGLE3 draft (config.json + model.safetensors) from a checkpoint."""
    phases = Phases()
    from pipeline.app.export_job import export_run  # lazy: start-up, torch

    with phases.phase("export", "exporting the draft for SGLang..."):
        exported = export_run(load(config), checkpoint, out, group)
    typer.echo(exported)  # the last line, for scripts: the export's directory


def replay(
    config: ConfigOption,
    out: Annotated[Path, typer.Option(help="Where the replay's checkpoints and metrics go.")] = Path("./replay"),
    verbose: VerboseOption = False,
) -> None:
    """Train again from the retained samples and features; compare every step's loss with the ledger.

    Needs the run's features retained (storage.retention: retain); N ranks replay under torchrun
    with N ranks. With train.deterministic: true on CPU the losses are bit-identical to the live run's.
    """
    setup_logging(verbose)
    phases = Phases()
    from pipeline.app.replay import replay_run  # lazy: start-up, torch

    with phases.phase("replay", f"replaying the retained samples into {out}..."):
        report = replay_run(load(config), str(out), stop=stop_on_signals())
    if report.is_main:  # under torchrun, rank 0 compared
        typer.echo(report.line())
        phases.say(phases.summary())
    if report.first_difference is not None:
        raise typer.Exit(1)


def demo(
    samples: Annotated[int, typer.Option(help="How many samples to move.")] = 64,
    partitions: int = 4,
    tokens: Annotated[int, typer.Option(help="Tokens per sample.")] = 128,
    hidden_size: int = 256,
    storage: Annotated[Optional[str], typer.Option(help="Feature storage root; default a temp dir.")] = None,
    bootstrap: BootstrapOption = None,
) -> None:
    """The data plane end to end: prompts -> generator (transactions) -> verified samples."""
    setup_logging(False)
    from pipeline.app.demo import run_demo  # lazy: start-up, torch

    bootstrap = bootstrap or start_local_broker()
    root = storage or tempfile.mkdtemp(prefix="specstream-demo-")
    started = time.perf_counter()
    summary = run_demo(bootstrap, root, samples=samples, partitions=partitions, tokens=tokens, hidden_size=hidden_size)
    console.print(f"features in {root}")
    typer.echo(summary.line())
    console.print(f"{time.perf_counter() - started:.1f} s")
    if not summary.ok:
        raise typer.Exit(1)


@config_app.command("reference")
def config_reference() -> None:
    """Print every config key with its type, default and meaning (a markdown table)."""
    from pipeline.app.reference import render_reference  # lazy: start-up, pydantic + kafka-python

    typer.echo(render_reference(), nl=False)


@config_app.command("check")
def config_check(config: ConfigOption) -> None:
    """Validate a config file; print the run and its fingerprint (what every stage must share)."""
    cfg = load(config)
    typer.echo(f"{config}: valid; run {cfg.run_id}, fingerprint {cfg.fingerprint()}")


# Commands in the order --help shows them: the main job first, then the stages, then tools.
for command in (quickstart, run, source, generate, train, status, audit, dlq, sweep, export, replay, demo, acls):
    app.command()(command)


def _error(message: str) -> None:
    """One line, never wrapped, whatever the terminal width (scripts grep for `error:`)."""
    console.print(f"[red]error:[/red] {escape(' '.join(message.split()))}", soft_wrap=True, highlight=False)


def _kept_traceback(exc: BaseException) -> str:
    """An unexpected error's traceback: printed with --verbose, else written to a file the error
    line names (a disk that is full may refuse it: then only --verbose shows it)."""
    text = "".join(traceback.format_exception(exc))
    if verbose_on():
        sys.stderr.write(text)
        return ""
    try:
        fd, path = tempfile.mkstemp(prefix="specstream-traceback-", suffix=".txt")
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
    except OSError:
        return " (run again with --verbose for the traceback)"
    return f" (traceback: {path})"


def main() -> None:
    """Exit 0: done or cleanly stopped; 2: a setting or the broker is wrong (fix and rerun);
    1: the run failed while running, or another copy of it took over (look at the message, then
    restart or resume). Every failure is one `error:` line."""
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    # `kill -USR1 PID` prints every thread's stack to stderr, the process going on: what a stuck
    # process waits on, without a debugger (tests send it before killing a process that hangs).
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    prefix = f"rank {rank()}: " if os.environ.get("WORLD_SIZE") else ""
    try:
        app()
    except (ConfigError, BrokerError, RunMismatchError, PartitionsClaimedError) as exc:
        if rank() == "0":  # every rank finds the same setting wrong: say it once
            _error(str(exc))
        raise SystemExit(2) from None
    except FencedError as exc:  # the message says who took over
        _error(f"{prefix}{exc}")
        raise SystemExit(1) from None
    except SpecstreamError as exc:
        if isinstance(exc, TransportError):  # the broker's own failure: cause, what to do, traceback
            _error(f"{prefix}{explain(exc)}{_kept_traceback(exc)}")
        else:
            _error(f"{prefix}{type(exc).__name__}: {exc}")
        raise SystemExit(1) from None
    except Exception as exc:  # noqa: BLE001 - not ours (a full disk, a library's bug): its cause in one line
        _error(f"{prefix}{explain(exc) or f'{type(exc).__name__}: {exc}'}{_kept_traceback(exc)}")
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
