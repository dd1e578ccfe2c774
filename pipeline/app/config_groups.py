"""The ``train_groups`` section: several trainer groups, each its own draft, on one capture stream.

A group is a name and overrides of the ``train`` section (``{deep: {ttt_steps: 7}, shallow:
{ttt_steps: 3, lr: 3e-4}}``). Each group trains as its own trainer: its own consumer group and
ledger topic (``RunTopics(run, group)``), its checkpoints, metrics and export under
``<train.output_dir>/<group>`` (or the group's own ``output_dir``). The generators' backpressure
follows the slowest declared group and retention ``delete`` removes a feature only once every
declared group is done with it (:mod:`pipeline.train.group_retention`), so the set of groups is
part of the run's fingerprint: every stage must read the same one. A run without ``train_groups``
is the run of before (one trainer, ``<run>.ledger``, ``<run>.trainers``, ``output_dir`` itself).

Kept apart from :mod:`pipeline.app.config` (at its size cap); it takes the config object without
importing its class, so the two modules do not import each other.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from pipeline.core.errors import ConfigError
from pipeline.core.topic_plan import TopicPolicy

if TYPE_CHECKING:
    from pipeline.app.config import RunConfig, TrainSection

__all__ = ("GROUPS_HELP", "check_train_groups", "group_names", "group_config", "topic_policy", "widest_train")

GROUPS_HELP = (
    "several trainer groups on one stream: `{name: {train overrides}}` (e.g. `{deep: {ttt_steps: 7}, shallow: "
    "{ttt_steps: 3}}`); each has its own consumer group, ledger `<run>.ledger.<name>`, checkpoints and export "
    "under `<output_dir>/<name>`; backpressure follows the slowest, retention `delete` waits for all; "
    "empty: one trainer, as before"
)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,40}$")


def group_names(cfg: RunConfig) -> tuple[str | None, ...]:
    """The run's trainer groups; ``(None,)``: the one trainer of a run without ``train_groups``."""
    return tuple(cfg.train_groups) or (None,)


def _merged(cfg: RunConfig, name: str) -> dict[str, Any]:
    overrides = dict(cfg.train_groups[name])
    base = cfg.train.model_dump()
    for key in overrides:
        if key not in base:
            close = difflib.get_close_matches(key, list(base), n=1)
            hint = f"did you mean `{close[0]}`? " if close else ""
            raise ConfigError(f"train_groups.{name}.{key}", "unknown key", f"{hint}a group overrides keys of `train`")
    out = str(overrides.pop("output_dir", None) or f"{cfg.train.output_dir.rstrip('/')}/{name}")
    return {**base, **overrides, "output_dir": out}


def group_config(cfg: RunConfig, name: str | None) -> RunConfig:
    """The run as group ``name`` trains it: ``train`` with the group's overrides and output dir
    (None: ``cfg`` itself). Raises a ``ConfigError`` naming ``train_groups.<name>.<key>``."""
    if name is None:
        return cfg
    if name not in cfg.train_groups:
        declared = ", ".join(cfg.train_groups) or "none"
        raise ConfigError("--group", f"{name!r} is not a declared trainer group (declared: {declared})",
                          "name one of `train_groups`, or declare it there (every stage reads the same set)")  # fmt: skip
    data = cfg.model_dump(exclude={"train_groups"})
    data["train"] = _merged(cfg, name)
    try:
        return type(cfg).model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = [str(part) for part in err["loc"]]
        key = ".".join(loc[1:]) if loc[:1] == ["train"] else ".".join(loc)
        raise ConfigError(f"train_groups.{name}.{key}", err["msg"], "see `specstream config reference`") from None
    except ConfigError as exc:  # a whole-run check (window, partitions) keeps its key, naming the group
        if exc.key.startswith("train."):
            raise ConfigError(f"train_groups.{name}.{exc.key[6:]}", exc.problem, exc.fix) from None
        raise ConfigError(exc.key, f"with trainer group {name!r}: {exc.problem}", exc.fix) from None


def check_train_groups(cfg: RunConfig) -> RunConfig:
    """Every group's name and its ``train`` as a whole run would validate it (window, partitions)."""
    for name in cfg.train_groups:
        if not _NAME.match(name):
            raise ConfigError(f"train_groups.{name}", "is not a valid group name (it names topics and directories)",
                              "use letters, digits, `_` and `-` (no dots), at most 41 characters")  # fmt: skip
        group_config(cfg, name)
    outs = [_merged(cfg, name)["output_dir"] for name in cfg.train_groups]
    if len(set(outs)) != len(outs):
        raise ConfigError("train_groups", "two groups share an output_dir", "give each group its own output_dir")
    return cfg


def topic_policy(cfg: RunConfig) -> TopicPolicy:
    """The run's topic policy with every declared group's ledger topic."""
    return dataclasses.replace(cfg.topics.policy(), trainer_groups=tuple(cfg.train_groups))


def widest_train(cfg: RunConfig) -> TrainSection:
    """The ``train`` of the group that holds the most samples before it reports progress (its
    global batch plus its prefetch): the generators' flow control must leave room for it."""
    trains = [group_config(cfg, name).train for name in group_names(cfg)]
    return max(trains, key=lambda t: t.world_size * t.batch_size * (t.grad_accum + t.prefetch))
