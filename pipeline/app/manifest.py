"""The run manifest: what a run is, so that its stages agree and another config cannot reuse it.

The source claims a run (its topics and the manifest, which stores the fingerprinted settings:
``RunConfig.fingerprint_values``); every stage that joins it (generators, trainers) and a rerun
of the source compare their own values with the stored ones. A mismatch names each key that
differs with both values.
"""

from __future__ import annotations

from pipeline.app.config import RunConfig, fingerprint_differences
from pipeline.core.errors import RunMismatchError
from pipeline.core.messages import RunManifest, decode, encode, now
from pipeline.core.topics import RunTopics, Transport, read_to_end

__all__ = ("claim_run", "verify_run", "read_manifest")


def claim_run(transport: Transport, config: RunConfig) -> RunManifest:
    """Create the run's topics and manifest; refuse a run id already used by another config."""
    topics = RunTopics(config.run_id)
    existing = read_manifest(transport, topics)
    if existing is not None:
        _refuse_mismatch(existing, config, fix="use a new run_id, or restore the original config to resume")
    with transport.admin() as admin:
        admin.ensure_run_topics(topics, config.data.partitions)
    if existing is not None:
        return existing
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


def verify_run(transport: Transport, config: RunConfig) -> None:
    """A stage joining a run (generate, train) refuses a run whose manifest has another config."""
    existing = read_manifest(transport, RunTopics(config.run_id))
    if existing is not None:
        _refuse_mismatch(existing, config, fix="give every stage the same config file")


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
