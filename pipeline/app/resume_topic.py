"""A checkpoint of a samples topic that is gone is refused before the run touches the broker.

A checkpoint names the id of the samples topic it read (a re-created topic is another stream,
whose offsets mean nothing to it). The trainer refuses such a checkpoint when it restores it, but
the single-process run starts its source first: after ``specstream topics delete``, the run would
re-create the topics and publish every prompt again before the trainer said no. This check says
it first, with the way out.
"""

from __future__ import annotations

from pipeline.app.config import RunConfig
from pipeline.app.config_groups import group_config, group_names
from pipeline.app.outputs import resume_checkpoint
from pipeline.core.errors import RunMismatchError
from pipeline.core.topics import RunTopics, Transport

__all__ = ("refuse_a_checkpoint_of_another_topic",)


def refuse_a_checkpoint_of_another_topic(config: RunConfig, transport: Transport) -> None:
    """Raise ``RunMismatchError`` when a trainer group would resume from a checkpoint of a samples
    topic the broker no longer holds (deleted, or deleted and re-created)."""
    samples = RunTopics(config.run_id).samples
    for name in group_names(config):
        chosen = resume_checkpoint(group_config(config, name))
        if chosen is None:
            continue
        manager, info = chosen
        saved = manager.read_meta(info).get("config", {}).get("samples_topic_id")
        with transport.admin() as admin:
            now = admin.topic_id(samples)
        if saved is None or now == saved:
            continue
        gone = "is gone (deleted)" if now is None else f"was re-created since (id {now})"
        directory = str(info.path).rstrip("/").rsplit("/", 1)[0]  # a path or a URL
        raise RunMismatchError(
            f"checkpoint {info.path} was written while reading {samples} (topic id {saved}), and that topic "
            f"{gone}: its offsets mean nothing now. Move or remove the checkpoints in {directory} to start "
            "the run afresh, or use another train.output_dir"
        )
