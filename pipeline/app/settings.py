"""Each stage's settings, derived from the one ``RunConfig`` in one function per stage.

The stages take plain dataclasses (``SourceConfig``, ``GeneratorConfig``, ``TrainerSettings``,
``ModelSpec``, ``KafkaSettings``); these functions are the only place that fills them from a run
config, so every default a run uses is the ``RunConfig`` default.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.app.config import RunConfig
from pipeline.app.config_budget import feature_budget, regenerates
from pipeline.app.config_file import bootstrap_origin
from pipeline.app.config_groups import widest_train
from pipeline.core.topics import RunTopics
from pipeline.generate.backpressure import TrainerWindow, Watermarks
from pipeline.generate.worker import GeneratorConfig
from pipeline.source.stage import SourceConfig
from pipeline.transport.kafka import KafkaSettings

if TYPE_CHECKING:
    from pipeline.train.config import TrainerSettings
    from pipeline.train.model import ModelSpec

__all__ = (
    "source_settings",
    "generator_settings",
    "trainer_settings",
    "model_spec",
    "kafka_settings",
    "vocab_mapping_url",
)


def kafka_settings(cfg: RunConfig, bootstrap_servers: str, *, origin: str | None = None) -> KafkaSettings:
    """The Kafka clients' settings: the broker's address, where it came from (default: the config),
    and the config's client options."""
    return KafkaSettings(
        bootstrap_servers,
        client_options=dict(cfg.broker.client_options),
        origin=origin or bootstrap_origin(),
        outage_budget_s=cfg.broker.outage_budget_s,
    )


def source_settings(cfg: RunConfig) -> SourceConfig:
    """The source stage: which conversations, how they are cut, how the draft vocab is sized."""
    return SourceConfig(
        run_id=cfg.run_id,
        data=cfg.data.path,
        tokenizer=str(cfg.target.model),
        partitions=cfg.data.partitions,
        storage_root=cfg.storage.root,
        max_length=cfg.data.max_length,
        on_malformed=cfg.data.on_malformed,
        draft_vocab_size=cfg.train.draft_vocab_size,
        limit=cfg.data.limit,
        transaction_timeout_ms=cfg.broker.transaction_timeout_ms,
        storage_options=dict(cfg.storage.options),
        max_line_bytes=cfg.data.max_line_bytes,
        dead_letters=cfg.dead_letters.limits(),
        eval_data=cfg.data.eval_path,
        heartbeat_interval_s=cfg.monitor.heartbeat_interval_s,
        topic_policy=cfg.topics.policy(),
    )


def generator_settings(cfg: RunConfig, worker_id: str, partitions: list[int] | None) -> GeneratorConfig:
    """One generator worker: capture batch, transactions, backpressure against the trainer's window."""
    g, t = cfg.generate, widest_train(cfg)
    return GeneratorConfig(
        run_id=cfg.run_id,
        worker_id=worker_id,
        partitions=partitions,
        batch_size=cfg.target.batch_size,
        transaction_timeout_ms=cfg.broker.transaction_timeout_ms,
        session_timeout_ms=cfg.broker.session_timeout_ms,
        backpressure=Watermarks(
            high=g.high_watermark,
            low=g.low_watermark,
            high_bytes=g.high_watermark_bytes,
            low_bytes=g.low_watermark_bytes,
        ),
        trainer=TrainerWindow(
            world_size=t.world_size,
            batch_size=t.batch_size,
            grad_accum=t.grad_accum,
            prefetch=t.prefetch * t.batch_size,
        ),
        queue_depth=g.queue_depth,
        drain_timeout_s=g.drain_timeout_s,
        dead_letters=cfg.dead_letters.limits(),
        max_prompt_tokens=cfg.data.max_length,
        wait_for_source_s=g.wait_for_source_s,
        eval_run_id=_eval_run_id(cfg),
        regen_run_id=_regen_run_id(cfg),
        heartbeat_interval_s=cfg.monitor.heartbeat_interval_s,
        storage_dtype=cfg.storage.dtype,
        trainer_groups=tuple(cfg.train_groups),
    )


def trainer_settings(
    cfg: RunConfig, *, schedule_steps: int | None, group: str | None = None, groups: tuple[str, ...] = ()
) -> TrainerSettings:
    """The training loop. ``schedule_steps``: the cosine schedule's length (None: constant rate).
    ``group``: which of the run's trainer groups ``cfg`` (its ``group_config``) trains; ``groups``:
    every declared one (retention waits for all).

    Rank 0 shows a progress bar: tqdm when stderr is a terminal, a plain line per half minute in a log.
    """
    # The trainer's modules load torch and the whole training stack: imported here, so that a
    # source or generator process (which uses this module too) starts without them.
    from pipeline.train.config import TrainerSettings  # lazy: start-up, torch loads only when the trainer runs
    from pipeline.app.outputs import is_url, local_outputs, output_options, output_path  # lazy: start-up, as above

    t, budget = cfg.train, feature_budget(cfg)
    out = local_outputs(cfg)  # output_dir itself, or the local mirror of an output_dir URL
    cosine = t.lr_schedule == "cosine" and bool(schedule_steps or t.max_steps)
    return TrainerSettings(
        run_id=cfg.run_id,
        checkpoint_dir=output_path(cfg, "checkpoints"),
        batch_size=t.batch_size,
        grad_accum=t.grad_accum,
        lr=t.lr,
        betas=t.betas,
        weight_decay=t.weight_decay,
        warmup_ratio=t.warmup_ratio,
        schedule="cosine" if cosine else "constant",
        schedule_steps=schedule_steps if cosine else None,
        max_steps=t.max_steps,
        epochs=t.epochs,
        grad_clip=t.grad_clip,
        ttt_steps=t.ttt_steps,
        loss_decay=t.loss_decay,
        max_length=t.max_length or cfg.data.max_length,
        seed=t.seed,
        bf16=t.bf16,
        deterministic=t.deterministic,
        save_interval=t.save_interval,
        keep_last=t.keep_last,
        retention=cfg.storage.retention,
        resume=t.resume,
        prefetch=t.prefetch,
        idle_timeout_s=t.idle_timeout_s,
        drain_timeout_s=t.drain_timeout_s,
        collective_timeout_s=t.collective_timeout_s,
        metrics_path=str(out / "metrics.jsonl"),
        plot_path=str(out / "curves.png"),
        min_trained_fraction=t.min_trained_fraction,
        progress=True,
        dead_letters=cfg.dead_letters.limits(),
        eval_run_id=_eval_run_id(cfg),
        eval_interval=t.eval_interval,
        eval_metrics_path=str(out / "eval.jsonl"),
        heartbeat_interval_s=cfg.monitor.heartbeat_interval_s,
        report_to=tuple(t.report_to),  # written beside metrics_path: <output_dir>/tensorboard
        output_options=output_options(cfg),
        publish_url=t.output_dir if is_url(t.output_dir) else None,
        group=group,
        retention_groups=groups,
        keep_share=budget.keep_share if budget is not None else None,
        regen_window=budget.window if budget is not None else 1,
        transaction_timeout_ms=cfg.broker.transaction_timeout_ms,
    )


def _eval_run_id(cfg: RunConfig) -> str | None:
    """The held-out set's sub-run (``RunTopics.eval``), when ``data.eval_path`` gives one."""
    return RunTopics(cfg.run_id).eval.run_id if cfg.data.eval_path else None


def _regen_run_id(cfg: RunConfig) -> str | None:
    """The regeneration sub-run (``RunTopics.regen``): later epochs under a storage budget."""
    return RunTopics(cfg.run_id).regen.run_id if regenerates(cfg) else None


def vocab_mapping_url(cfg: RunConfig, storage_root_url: str) -> str:
    """Where the source stored the draft vocabulary mapping."""
    return f"{storage_root_url.rstrip('/')}/{cfg.run_id}/vocab_mapping.safetensors"


def model_spec(cfg: RunConfig, storage_root_url: str) -> ModelSpec:
    """Where the draft comes from: the target's directory, its aux layers and the vocab mapping."""
    from pipeline.train.model import ModelSpec  # lazy: start-up, see trainer_settings

    ids = cfg.target.aux_layer_ids
    return ModelSpec(
        target_model_path=str(cfg.target.model),
        vocab_mapping=vocab_mapping_url(cfg, storage_root_url),
        aux_layer_ids=(ids[0], ids[1], ids[2]) if ids else None,
        vocab_options=dict(cfg.storage.options),
    )

