"""Reading a run config: YAML -> ``${VAR}`` expansion -> environment overrides -> ``RunConfig``.

``${VAR}`` in any string value is replaced by the environment variable (a SASL password never sits
in the file; an unset variable is an error naming the key and the variable).
``KAFKA_BOOTSTRAP_SERVERS`` and ``SPECSTREAM_STORAGE`` override the broker and the storage root.
Every failure is one ``ConfigError`` with the key and the fix; a misspelt key gets a "did you
mean", a renamed one its new name.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from pipeline.app.config import RunConfig
from pipeline.core.errors import ConfigError

__all__ = ("load_config", "parse_config", "bootstrap_origin")


# Keys that were renamed: a file that still uses the old name is told the new one.
_RENAMED = {
    "train.keep_checkpoints": "train.keep_last",
    "train.amp": "train.bf16",
    "train.schedule": "train.lr_schedule",
    "train.idle_timeout": "train.idle_timeout_s",
    "train.collective_timeout": "train.collective_timeout_s",
}
_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def load_config(path: str | Path) -> RunConfig:
    """Read and validate a YAML run config; raises ``ConfigError`` naming the key and the fix."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read the config file ({exc.strerror})", "check the path") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise ConfigError(str(path), f"is not valid YAML{line}: {problem}", "fix the syntax there") from None
    return parse_config(data, source=str(path))


def parse_config(data: Any, *, source: str = "config") -> RunConfig:
    """Validate a mapping (``${VAR}`` expanded, environment overrides applied)."""
    if not isinstance(data, dict):
        raise ConfigError(source, "the file must hold a mapping of settings", "see examples/tiny-cpu.yaml")
    data = _apply_environment(_expand(data, ()))
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        loc = tuple(str(p) for p in err["loc"])
        key = ".".join(loc) or source
        if err["type"] == "extra_forbidden":
            renamed = _RENAMED.get(key)
            raise ConfigError(key, "unknown key", f"it is now `{renamed}`" if renamed else _suggest(loc)) from None
        if err["type"] == "missing":
            raise ConfigError(key, "is required", "add it to the config file") from None
        raise ConfigError(key, err["msg"], "see `specstream config reference` for every key") from None


def _expand(node: Any, loc: tuple[str, ...]) -> Any:
    """``${VAR}`` in every string value, from the environment; an unset variable is an error."""
    if isinstance(node, dict):
        return {k: _expand(v, (*loc, str(k))) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand(v, (*loc, str(i))) for i, v in enumerate(node)]
    if not isinstance(node, str):
        return node

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in os.environ:
            raise ConfigError(
                ".".join(loc),
                f"uses ${{{name}}} but the environment variable {name} is not set",
                f"export {name} (e.g. from your secret store) before starting, or write the value in the file",
            )
        return os.environ[name]

    return _ENV_REFERENCE.sub(substitute, node)


def bootstrap_origin() -> str:
    """Where a config's broker address comes from: the file, or the variable that overrides it."""
    return "KAFKA_BOOTSTRAP_SERVERS" if os.environ.get("KAFKA_BOOTSTRAP_SERVERS") else "broker.bootstrap_servers"


def _apply_environment(data: dict[str, Any]) -> dict[str, Any]:
    for variable, section, key in (
        ("KAFKA_BOOTSTRAP_SERVERS", "broker", "bootstrap_servers"),
        ("SPECSTREAM_STORAGE", "storage", "root"),
    ):
        if os.environ.get(variable):
            data[section] = {**(data.get(section) or {}), key: os.environ[variable]}
    return data


def _suggest(loc: tuple[str, ...]) -> str:
    """For an unknown key, the closest known key of its section."""
    model: type[BaseModel] = RunConfig
    for part in loc[:-1]:
        annotation = getattr(model.model_fields.get(part), "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return ""
        model = annotation
    known = list(model.model_fields)
    close = difflib.get_close_matches(loc[-1], known, n=1, cutoff=0.5)
    if close:
        return f"did you mean `{'.'.join((*loc[:-1], close[0]))}`?"
    return f"known keys: {', '.join(known)}"
