"""The ``/metrics`` endpoint of a long-running process: ``monitor.metrics_port`` or ``--metrics-port``.

The server is prometheus_client's own (a daemon thread, so it ends with the process) over a
registry holding only :class:`~pipeline.app.metrics.RunCollector`: every figure is read when
scraped, nothing runs between scrapes. It starts before the work, so a port that is taken
stops the command before anything is done.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server

from pipeline.app.metrics import LiveProcess, RunCollector
from pipeline.core.errors import ConfigError
from pipeline.core.topics import Transport

__all__ = ("MetricsServer", "metrics_port", "serve_metrics", "start_metrics")

logger = logging.getLogger(__name__)

KEY = "monitor.metrics_port"


@dataclass
class MetricsServer:
    """A started endpoint: its URL, and the live objects it reads (register them as they start)."""

    live: LiveProcess
    url: str
    _server: Any

    @property
    def port(self) -> int:
        return int(self._server.server_port)

    def close(self) -> None:
        """Stop serving (a process that exits need not: the thread is a daemon)."""
        self._server.shutdown()
        self._server.server_close()


def metrics_port(configured: int | None, override: int | None, *, per_local_rank: bool = False) -> int | None:
    """The port to serve on: ``--metrics-port`` over the config; None: off. A trainer rank under
    torchrun adds its ``LOCAL_RANK`` (ranks on one host need their own ports; 0 stays any free port)."""
    port = override if override is not None else configured
    if port is None:
        return None
    if not 0 <= port <= 65535:
        raise ConfigError(KEY, f"port {port} is out of range", "pass --metrics-port between 0 and 65535 (0: any free)")
    if per_local_rank and port:
        port += int(os.environ.get("LOCAL_RANK") or 0)
    return port


def serve_metrics(live: LiveProcess, port: int, *, addr: str = "0.0.0.0", say: Any = None) -> MetricsServer:
    """Serve ``live``'s metrics on ``addr:port`` (0: any free port) and log the URL once."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RunCollector(live))
    try:
        server, _thread = start_http_server(port, addr=addr, registry=registry)
    except OSError as exc:
        raise ConfigError(
            f"{KEY} (--metrics-port)",
            f"cannot serve metrics on {addr}:{port}: {exc.strerror or exc}",
            "pass another --metrics-port (or set monitor.metrics_port), 0 for any free port, or stop the "
            "process that holds it",
        ) from None
    host = socket.gethostname() if addr in ("0.0.0.0", "::", "") else addr
    url = f"http://{host}:{server.server_port}/metrics"
    (say or logger.info)(f"metrics at {url}")
    return MetricsServer(live, url, server)


def start_metrics(
    configured: int | None,
    override: int | None,
    run_id: str,
    *,
    transport: Transport | None = None,
    say: Any = None,
    per_local_rank: bool = False,
) -> LiveProcess:
    """The view a command registers its live objects in, served when a port is set (the
    config's, or ``--metrics-port``): commands register without asking whether metrics are on."""
    live = LiveProcess(run_id, transport)
    port = metrics_port(configured, override, per_local_rank=per_local_rank)
    if port is not None:
        serve_metrics(live, port, say=say)
    return live
