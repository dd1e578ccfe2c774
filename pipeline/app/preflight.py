"""Checks before a stage writes anything: each failure a user can fix is one ``ConfigError``.

A stage runs ``check_local`` before it starts or reaches a broker (model directory, data, storage
and its fsspec implementation, TLS files, devices), then ``check_broker`` once its transport
exists; only after both passed does it claim the run (topics, manifest) or write a file.
"""

from __future__ import annotations

import tempfile
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any, cast

import fsspec
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from pipeline.app.config import RunConfig
from pipeline.app.config_budget import feature_budget
from pipeline.core.errors import ConfigError
from pipeline.core.topics import Transport

__all__ = ("STAGES", "check_local", "check_broker", "preflight")

STAGES = ("source", "generate", "train")


def check_local(config: RunConfig, stages: Collection[str] = STAGES) -> None:
    """The model directory, a storage budget, the data (source), the storage root, the devices of
    the stages here.

    ``stages`` are the ones this process runs: ``source``, ``generate``, ``train``, or ``export``
    (which only reads the storage).
    """
    target = config.target
    if target.backend in ("hf", "sglang"):
        model = Path(str(target.model))
        if not (model / "config.json").is_file():
            raise ConfigError(
                "target.model",
                f"{model} is not a model directory (no config.json there)",
                "point it at a local Hugging Face model directory (downloaded beforehand: nothing is "
                "fetched at run time)",
            )
    feature_budget(config)  # a storage budget the run could not keep: refused before anything is written
    if "source" in stages:
        inputs = {"data.path": (config.data.path, "point it at a JSONL file of conversations")}
        if config.data.eval_path:
            inputs["data.eval_path"] = (config.data.eval_path, "point it at a JSONL file of held-out conversations, or unset it")
        for key, (url, fix) in inputs.items():
            fs, path = _filesystem(key, url, {})
            if not fs.exists(path):
                raise ConfigError(key, f"{url} does not exist", fix)
    fs, root = _filesystem("storage.root", config.storage.root, config.storage.options)
    if set(stages) & set(STAGES):  # a stage writes features and talks to Kafka; export only reads
        if isinstance(fs, LocalFileSystem):
            _check_writable(Path(root), config.storage.root)
        _check_client_files(config)
    if "train" in stages:
        _check_device("train.device", config.train.device)
    out = config.train.output_dir
    if {"train", "export"} & set(stages) and "://" in out:  # its fsspec package installed (s3fs, gcsfs)
        same = out.split("://", 1)[0] == config.storage.root.split("://", 1)[0]
        _filesystem("train.output_dir", out, config.storage.options if same else {})
    if "generate" in stages and target.backend == "hf":  # the synthetic backend ignores it; sglang picks its GPUs
        _check_device("target.device", target.device)


def _check_device(key: str, device: str | None) -> None:
    """A device the config names must exist here: ``cuda`` needs CUDA, ``cuda:N`` that many GPUs."""
    if device is None or device == "cpu":
        return
    import torch  # lazy: start-up, only a GPU device needs torch here; source and generate start faster

    if device == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(key, "is mps but MPS (Apple GPU) is not available here", f"use cpu{_NULL_HINT[key]}")
        return
    if not torch.cuda.is_available():
        raise ConfigError(key, f"is {device} but CUDA is not available here", f"use cpu{_NULL_HINT[key]}")
    index = int(device.partition(":")[2] or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise ConfigError(
            key, f"is {device} but this machine has {count} CUDA device(s)", f"use cuda:0 ... cuda:{count - 1}"
        )


def _check_client_files(config: RunConfig) -> None:
    """The TLS files the Kafka clients read must be here (kafka-python would only time out)."""
    for native in ("ssl_cafile", "ssl_certfile", "ssl_keyfile", "ssl_crlfile"):
        path = config.broker.client_options.get(native)
        if path and not Path(path).is_file():
            key = f"broker.client_options.{native.replace('_', '.')}"
            raise ConfigError(key, f"{path} is not a file", "point it at the PEM file on this machine")


_NULL_HINT = {"train.device": ", or null (cuda when available)", "target.device": ""}
# fsspec protocols whose implementation is one of specstream's extras.
_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}


def _filesystem(key: str, url: str, options: Mapping[str, Any]) -> tuple[AbstractFileSystem, str]:
    """The fsspec filesystem of ``url``; a missing implementation names its extra (s3fs, gcsfs)."""
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    try:
        return cast(tuple[AbstractFileSystem, str], fsspec.url_to_fs(url, **dict(options)))
    except ImportError as exc:
        extra = _EXTRAS.get(protocol)
        fix = f"pip install 'specstream[{extra}]'" if extra else f"install the fsspec implementation of {protocol}://"
        raise ConfigError(key, f"{url} needs a package that is not installed ({exc})", fix) from None
    except ValueError as exc:
        raise ConfigError(key, f"{url}: {exc}", "use a local path or an fsspec URL (s3://, gs://, ...)") from None


def check_broker(transport: Transport) -> None:
    """An unreachable broker fails here, with its address, before anything is written."""
    with transport.admin() as admin:
        admin.topics()


def preflight(config: RunConfig, transport: Transport, *, stages: Collection[str] = STAGES) -> None:
    """``check_local`` then ``check_broker``."""
    check_local(config, stages)
    check_broker(transport)


def _check_writable(root: Path, shown: str) -> None:
    """Create and remove a temp dir in the nearest existing ancestor: leaves nothing behind, and
    unlike ``os.access`` it also tells the truth for root and for read-only mounts."""
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
