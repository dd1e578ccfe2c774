"""``specstream export``: a checkpoint of the run -> an SGLang-loadable EAGLE3 draft directory.

The checkpoint is the one ``--checkpoint`` names or the run's newest; one that is not a
checkpoint directory is refused before anything is read or written, with the run's checkpoints
listed.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.app.config import RunConfig
from pipeline.app.config_groups import group_config
from pipeline.app.outputs import checkpoints, output_options, output_path
from pipeline.app.preflight import check_local
from pipeline.app.settings import model_spec
from pipeline.core.errors import ConfigError, OptionError
from pipeline.storage import FeatureStore
from pipeline.train.checkpoint import META_FILE, MODEL_FILE
from pipeline.train.export import export_checkpoint

__all__ = ("checkpoint_to_export", "export_run")

_LOOKS_LIKE = (
    f"a checkpoint is a directory `step-NNNNNNNNN` (`-end` for the last one) holding {META_FILE} and "
    f"{MODEL_FILE}, under train.output_dir/checkpoints (on an object store: a prefix `step-NNNNNNNNN` "
    "published by its MANIFEST.json)"
)


def export_run(cfg: RunConfig, checkpoint: str | Path | None, out: str | Path | None, group: str | None = None) -> str:
    """Export ``checkpoint`` (default: the newest, of trainer ``group`` when the run has groups) to
    ``out`` (default: OUTPUT_DIR/export, the group's own); returns it."""
    if group is None and cfg.train_groups:
        raise ConfigError("--group", f"the run declares trainer groups ({', '.join(cfg.train_groups)})",
                          "name the one to export: `specstream export --group NAME`")  # fmt: skip
    cfg = group_config(cfg, group)
    check_local(cfg, ("export",))
    chosen = checkpoint_to_export(cfg, checkpoint)
    store = FeatureStore(cfg.storage.root, cfg.run_id, storage_options=dict(cfg.storage.options))
    target = str(out) if out else output_path(cfg, "export")
    return export_checkpoint(chosen, model_spec(cfg, store.root_url), target, storage_options=output_options(cfg))


def checkpoint_to_export(cfg: RunConfig, checkpoint: str | Path | None) -> Path:
    """The named checkpoint directory, checked, or the run's newest one (a URL on an object store)."""
    manager = checkpoints(cfg)
    found = manager.list()
    if checkpoint is None:
        if not found:
            raise ConfigError("train.output_dir", f"holds no checkpoint under {manager.directory}", "train first")
        return found[-1].path
    if found:
        names = ", ".join(info.name for info in found[-5:])
        fix = f"pass one of this run's ({names} under {manager.directory}), or leave --checkpoint out for the newest"
    else:
        fix = f"this run has none yet under {manager.directory}: train first"
    if "://" in str(checkpoint):  # a checkpoint on an object store: one whose manifest matches its files
        published = manager.find(str(checkpoint))
        if published is None:
            raise OptionError("--checkpoint", f"{checkpoint} is not a complete checkpoint of this run; {_LOOKS_LIKE}", fix)
        return published.path
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        problem = f"{checkpoint} does not exist" if not checkpoint.exists() else f"{checkpoint} is not a directory"
    elif not ((checkpoint / META_FILE).is_file() and (checkpoint / MODEL_FILE).is_file()):
        problem = f"{checkpoint} is not a checkpoint directory"
    else:
        return checkpoint
    raise OptionError("--checkpoint", f"{problem}; {_LOOKS_LIKE}", fix)
