"""The run manifest: what a run is, so that its stages agree and another config cannot reuse it.

The source claims a run (its topics and the manifest, which stores the fingerprinted settings:
``RunConfig.fingerprint_values``); every stage that joins it (generators, trainers:
:func:`await_run`) and a rerun of the source compare their own values with the stored ones. A mismatch names each key that
differs with both values. A stage started before the source waits for the claim, bounded
(:func:`await_run`), and checks the manifest as soon as it appears.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from pipeline.app.config import RunConfig, fingerprint_differences
from pipeline.app.config_budget import regenerates
from pipeline.app.config_groups import topic_policy
from pipeline.core.errors import ConfigError, RunMismatchError, StreamError
from pipeline.core.messages import RunManifest, decode, encode, now
from pipeline.core.progress import read_source_counters
from pipeline.core.topics import RunTopics, Transport, read_to_end, wait_for
from pipeline.source.stage import VOCAB_MAPPING_URI
from pipeline.storage import FeatureStore

__all__ = ("await_run", "claim_run", "read_manifest", "write_manifest")


def claim_run(transport: Transport, config: RunConfig) -> RunManifest:
    """Create the run's topics and manifest; refuse a run id already used by another config."""
    topics = RunTopics(config.run_id)
    existing = read_manifest(transport, topics)
    if existing is not None:
        _refuse_mismatch(existing, config, fix="use a new run_id, or restore the original config to resume")
    with transport.admin() as admin:
        admin.ensure_run_topics(topics, config.data.partitions, topic_policy(config))
        if regenerates(config):  # created now: the generators wait on it from the end of their pass
            admin.ensure_run_topics(topics.regen, config.data.partitions, topic_policy(config))
    if existing is not None:
        return existing
    return write_manifest(transport, config)


def write_manifest(transport: Transport, config: RunConfig) -> RunManifest:
    """Record the run's manifest (its config fingerprint) in the run's manifest topic."""
    topics = RunTopics(config.run_id)
    manifest = RunManifest(
        run_id=config.run_id,
        config_hash=config.fingerprint(),
        config=config.fingerprint_values(),
        partitions=config.data.partitions,
        world_size=config.train.world_size,
        storage_root=config.storage.root,
        vocab_mapping_uri="vocab_mapping.safetensors",
        created_at=now(),
    )
    producer = transport.plain_producer()
    try:
        producer.send(topics.manifest, encode(manifest), partition=0, key=b"manifest")
        producer.flush()
    finally:
        producer.close()
    return manifest


def _needs_prompt_total(config: RunConfig) -> bool:
    """A decaying learning-rate schedule without ``max_steps`` is as long as the run's prompts."""
    return config.train.lr_schedule != "constant" and config.train.max_steps is None


def await_run(
    transport: Transport,
    config: RunConfig,
    *,
    timeout_s: float,
    key: str,
    stop: threading.Event | None,
    say: Callable[[str], object],
    vocab: FeatureStore | None = None,
) -> bool:
    """Wait until the source has claimed the run (its topics and manifest) and, with ``vocab``,
    stored the vocabulary mapping there; refuse another config's run as soon as its manifest
    is readable. ``say`` gets the one line saying what this stage waits for. False: ``stop`` was
    set while waiting; past ``timeout_s`` (the setting ``key``), a ``ConfigError`` naming what
    is missing and what to start."""
    claimed = threading.Event()
    lacking: list[str] = []
    topics, partitions = RunTopics(config.run_id), config.data.partitions

    def ready() -> bool | None:
        lacking.clear()
        if not claimed.is_set():
            manifest = read_manifest(transport, topics)
            if manifest is None:
                lacking.append("its topics and manifest" + (" and its vocabulary mapping" if vocab else ""))
                return None
            _refuse_mismatch(manifest, config, fix="give every stage the same config file")
            claimed.set()
        if vocab is None:
            return True
        ended = all(c.ended for c in read_source_counters(transport, topics, partitions).values())
        if not vocab.exists(VOCAB_MAPPING_URI):
            if ended:  # the mapping is stored before the partitions are closed: the source failed
                raise StreamError(f"the source of run {config.run_id} closed its partitions without storing "
                                  "the vocabulary mapping: it failed (see its error, the DLQ and `specstream "
                                  "audit`); fix the input and start a new run")  # fmt: skip
            lacking.append(f"its vocabulary mapping {vocab.resolve(VOCAB_MAPPING_URI)} (the source stores it "
                           "once it has read every conversation)")  # fmt: skip
            return None
        if not ended and _needs_prompt_total(config):  # the schedule's length must not depend on start order
            lacking.append("the end of its prompts (the source closes its partitions after storing the mapping)")
            return None
        return True

    def announce() -> None:
        say(f"waiting up to {timeout_s:.0f} s for the source of run {config.run_id}: {lacking[0]}")

    found = wait_for(ready, timeout_s=timeout_s, stop=stop, announce=announce)
    if found is None and not (stop is not None and stop.is_set()):
        raise ConfigError(
            key,
            f"run {config.run_id} still lacks {lacking[0]} after waiting {timeout_s:.0f} s",
            f"start `specstream source` with this run's config, or raise {key}",
        )
    return bool(found)


def read_manifest(transport: Transport, topics: RunTopics) -> RunManifest | None:
    """The run's newest manifest, or None when the run has not been claimed."""
    with transport.admin() as admin:
        if topics.manifest not in admin.topics():
            return None
    found = None
    for record in read_to_end(transport, topics.manifest, [0], timeout_s=30):
        message = decode(record.value or b"")
        if isinstance(message, RunManifest):
            found = message  # compacted topic: the newest manifest counts
    return found


def _refuse_mismatch(existing: RunManifest, config: RunConfig, *, fix: str) -> None:
    if existing.config_hash == config.fingerprint():
        return
    if existing.config is not None:
        differences = "; ".join(fingerprint_differences(dict(existing.config), config.fingerprint_values()))
    else:  # a manifest written before the values were stored
        differences = f"fingerprint {existing.config_hash} in the run, {config.fingerprint()} here"
    raise RunMismatchError(
        f"run {config.run_id} was started with another configuration ({differences}): {fix}"
    )
