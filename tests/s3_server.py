"""A real S3-compatible server for the tests: moto's server mode (what s3fs tests itself against).

It runs as a subprocess on a free 127.0.0.1 port; every test gets its own bucket. The storage
options are passed explicitly (fsspec ``storage_options`` or a config's ``storage.options``), so
nothing reaches the server by ambient magic. MinIO's server is AGPL and not on PyPI: not used.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pipeline.transport.broker import free_port

__all__ = ("S3Root", "S3Server", "start_s3_server")


@dataclass(frozen=True)
class S3Server:
    """Where the server listens and the options an fsspec ``s3://`` client needs to reach it."""

    endpoint: str

    @property
    def options(self) -> dict[str, Any]:
        return {
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"endpoint_url": self.endpoint, "region_name": "eu-west-1"},
            "skip_instance_cache": True,  # a fresh client per store: no listing cached across them
        }

    def new_bucket(self) -> str:
        """A fresh bucket; returns its name."""
        import s3fs  # lazy: start-up (only the S3 tests)

        name = f"b{uuid.uuid4().hex[:12]}"
        s3fs.S3FileSystem(**self.options).mkdir(name)
        return name


@dataclass(frozen=True)
class S3Root:
    """One test's ``s3://bucket/prefix`` root and the fsspec storage options that reach it."""

    url: str
    options: dict[str, Any]

    def fs(self) -> Any:
        """A fresh s3fs client (no cached listings), as another machine would have."""
        import s3fs  # lazy: start-up (only the S3 tests)

        return s3fs.S3FileSystem(**self.options)



@contextmanager
def start_s3_server(timeout_s: float = 60.0) -> Iterator[S3Server]:
    """Start ``moto.server`` on 127.0.0.1, wait (bounded) until it answers, stop it afterwards."""
    port = free_port()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    # The server logs a line per request: into a file, never an unread pipe (once a pipe's 64 KB
    # filled, every request blocked on its log line and the suite hung in CI).
    log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed after the server stops
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"moto server exited with {proc.returncode}: {log.read()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2):
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"moto server did not answer on {endpoint} in {timeout_s} s") from None
                time.sleep(0.1)
        yield S3Server(endpoint)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()
