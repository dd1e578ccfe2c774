"""``specstream demo``: a run of the data plane with a synthetic target, checked end to end."""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass

from pipeline.core.messages import Prompt, prompt_id_for
from pipeline.core.topics import RunTopics
from pipeline.generate.synthetic import SyntheticTarget
from pipeline.generate.worker import GeneratorConfig, GeneratorWorker
from pipeline.source.publisher import PromptPublisher
from pipeline.storage import FeatureStore
from pipeline.stream import SampleStream
from pipeline.transport.kafka import KafkaAdmin, KafkaSettings

__all__ = ("DemoSummary", "run_demo", "synthetic_prompts")


@dataclass(frozen=True)
class DemoSummary:
    """What the data-plane demo moved, for its one summary line."""

    prompts: int
    received: int
    duplicates: int
    dead_letters: int
    gigabytes: float

    @property
    def ok(self) -> bool:
        return self.received == self.prompts and self.duplicates == 0 and self.dead_letters == 0

    def line(self) -> str:
        missing = self.prompts - self.received - self.dead_letters
        return (
            f"{self.received} of {self.prompts} samples received, {missing} missing, "
            f"{self.duplicates} duplicates dropped, {self.dead_letters} dead letters "
            f"({self.gigabytes:.2f} GB of hidden states)"
        )


def synthetic_prompts(run_id: str, count: int, tokens: int) -> list[Prompt]:
    """Deterministic prompts of a given length, so the demo needs no tokenizer."""
    out = []
    for i in range(count):
        ids = [(i * 7919 + j * 104729) % 32000 for j in range(tokens)]
        out.append(
            Prompt(
                run_id=run_id,
                prompt_id=prompt_id_for(i, ids),
                input_ids=ids,
                loss_mask=[0] * (tokens // 4) + [1] * (tokens - tokens // 4),
            )
        )
    return out


def run_demo(
    bootstrap: str, root: str, *, samples: int, partitions: int, tokens: int, hidden_size: int
) -> DemoSummary:
    """Source -> two generator workers (threads) -> one reader of every partition."""
    settings = KafkaSettings(bootstrap)
    run_id = f"demo-{uuid.uuid4().hex[:8]}"
    with KafkaAdmin(settings) as admin:
        admin.ensure_run_topics(RunTopics(run_id), partitions)
    PromptPublisher(settings, run_id, partitions).publish(synthetic_prompts(run_id, samples, tokens))
    store = FeatureStore(root, run_id)
    halves = [list(range(partitions))[i::2] for i in range(2)]
    workers = [
        GeneratorWorker(
            settings,
            store,
            SyntheticTarget(hidden_size=hidden_size, dtype="bfloat16"),
            GeneratorConfig(run_id=run_id, worker_id=f"gen-{i}", partitions=owned, batch_size=8),
        )
        for i, owned in enumerate(halves)
        if owned
    ]
    errors: list[BaseException] = []

    def run(worker: GeneratorWorker) -> None:
        try:
            worker.run()
        except BaseException as exc:  # surfaced on the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(w,), daemon=True) for w in workers]
    for t in threads:
        t.start()
    stream = SampleStream(settings, store, run_id, range(partitions), idle_timeout_s=120)
    received, nbytes = 0, 0
    try:
        for item in stream:
            received += 1
            nbytes += item.ref.nbytes
    finally:
        stream.close()
        for t in threads:
            t.join(timeout=60)
    if errors:
        raise errors[0]
    s = stream.summary()
    return DemoSummary(samples, received, s.duplicates, stream.dead_letters, nbytes / 1e9)
